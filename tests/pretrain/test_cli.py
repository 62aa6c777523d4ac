"""``medseg pretrain``, ``medseg similar`` (build and query) and ``medseg train --encoder-init``, end to end."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest

from medseg.cli import main
from tests.pretrain.synthetic import FINDINGS, pattern, write_archive


def _segmentation_folder(root):
    """A tiny folder dataset (images/, masks/, splits.csv) for 'medseg train'."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["name,split"]
    for i in range(4):
        image = pattern(list(FINDINGS)[i % 3], 500 + i, 32)
        iio.imwrite(root / "images" / f"c{i}.png", image)
        iio.imwrite(root / "masks" / f"c{i}.png", (image > 120).astype(np.uint8))
        rows.append(f"c{i},{'val' if i == 3 else 'train'}")
    (root / "splits.csv").write_text("\n".join(rows) + "\n")
    return root


def test_pretrain_index_query_and_encoder_init(tmp_path, capsys):
    csv = write_archive(tmp_path / "archive")
    enc = tmp_path / "encoder"
    work = str(tmp_path / "work")
    rc = main(["pretrain", "--pairs", str(csv), "-o", str(enc), "--image-size", "32", "--dim", "32", "--batch-size", "4",
               "--stage1-epochs", "1", "--stage2-epochs", "1", "--workdir", work, "--device", "cpu"])
    assert rc == 0
    manifest = json.loads((enc / "manifest.json").read_text())
    assert manifest["training"]["steps"] > 0 and manifest["command"].startswith("medseg pretrain --pairs")
    assert "encoder pack written" in capsys.readouterr().err

    # the same run again without --resume is refused in one sentence
    rc = main(["pretrain", "--pairs", str(csv), "-o", str(enc), "--image-size", "32", "--dim", "32", "--workdir", work])
    assert rc == 2 and "--resume" in capsys.readouterr().err

    index = tmp_path / "index"
    assert main(["similar", "--build", "--pairs", str(csv), "--encoder", str(enc), "--index", str(index)]) == 0
    assert "indexed 12 cases" in capsys.readouterr().err
    query = csv.parent / "images" / "effusion-2.png"
    assert main(["similar", str(query), "--index", str(index), "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and [line.split("\t")[0] for line in lines] == ["1", "2", "3"]
    assert all(line.split("\t")[2] in FINDINGS for line in lines)
    assert main(["similar", str(query), "--index", str(index), "-k", "2", "--region", "0,0,30,30", "--json"]) == 0
    cases = json.loads(capsys.readouterr().out)
    assert [c["rank"] for c in cases] == [1, 2] and {"score", "finding", "text", "image"} <= set(cases[0])

    data = _segmentation_folder(tmp_path / "seg")
    pack = tmp_path / "pack"
    rc = main(["train", "--dataset", str(data), "--arch", "unet", "--config", "small", "--encoder-init", str(enc), "--steps", "2", "--crop", "32",
               "--batch-size", "2", "--val-limit", "1", "--workdir", work, "--device", "cpu", "-o", str(pack)])
    assert rc == 0, capsys.readouterr().err
    trained = json.loads((pack / "manifest.json").read_text())
    assert trained["training"]["encoder_init"]["loaded_tensors"] == 60  # 5 blocks x (2 convs + 2 batch norms x 5 tensors)
    assert trained["training"]["encoder_init"]["sha256"] == manifest["weights"]["sha256"]


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["pretrain", "--pairs", "{csv}", "--text-col", "report", "-o", "{tmp}/e"], 2, "no column 'report'"),
        (["pretrain", "--pairs", "{tmp}/none.csv", "-o", "{tmp}/e"], 1, "does not exist"),
        (["similar", "{tmp}/x.png", "--index", "{tmp}"], 1, "does not exist"),
        (["similar", "{img}", "--index", "{tmp}"], 2, "not a similar-case index"),
        (["similar", "--index", "{tmp}"], 2, "Give the IMAGE"),
        (["similar", "--build", "--index", "{tmp}/i", "--pairs", "{csv}"], 2, "--encoder"),
        (["similar", "{img}", "--index", "{tmp}", "--region", "1,2,3"], 2, "four numbers"),
        (["train", "--dataset", "psfhs", "--encoder-init", "{tmp}", "--steps", "1"], 2, "not an encoder pack"),
    ],
)
def test_bad_input_is_one_sentence(tmp_path, capsys, args, code, words):
    csv = write_archive(tmp_path / "archive", per_finding=1)
    img = csv.parent / "images" / "normal-0.png"
    filled = [a.format(csv=csv, tmp=tmp_path, img=img) for a in args]
    assert main(filled) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0]
