"""Weight averaging of packs (medseg average): the mean is exact, mismatched packs are refused, the CLI writes a pack."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medseg.cli import main
from tests.conftest import data_dir
from medseg.errors import UsageError
from medseg.train.average import average_packs
from medseg.train.packs import load_pack, save_pack, untrained_pack


def _pack(tmp_path, name: str, seed: int, **kwargs):
    torch.manual_seed(seed)
    pack = untrained_pack("unet", in_channels=1, num_classes=kwargs.pop("num_classes", 3), **kwargs)
    pack.id = name
    pack.manifest = {"version": f"1.{seed}.0", "metrics": {"dice": {"x": 0.5}}, "training": {"dataset": "psfhs"}}
    return save_pack(pack, tmp_path / name, dtype=torch.float32)


def test_the_average_is_the_weighted_mean_of_the_weights(tmp_path):
    a, b = load_pack(_pack(tmp_path, "a", 1)), load_pack(_pack(tmp_path, "b", 2))
    mixed = average_packs([a, b], [3, 1])  # normalised to 0.75 / 0.25
    sa, sb, sm = a.model.state_dict(), b.model.state_dict(), mixed.model.state_dict()
    floats = [k for k in sa if sa[k].is_floating_point()]
    assert floats and any(not torch.equal(sa[k], sb[k]) for k in floats)
    for k in floats:
        torch.testing.assert_close(sm[k], 0.75 * sa[k] + 0.25 * sb[k], rtol=0, atol=1e-6)
    for k in set(sa) - set(floats):  # integer buffers: the first pack's
        assert torch.equal(sm[k], sa[k])
    assert [s["weight"] for s in mixed.manifest["averaged_from"]] == [0.75, 0.25]
    assert [s["sha256"] for s in mixed.manifest["averaged_from"]] == [a.sha256, b.sha256]
    assert "metrics" not in mixed.manifest and mixed.manifest["training"] == {"dataset": "psfhs"}
    # the sources are untouched
    assert torch.equal(a.model.state_dict()[floats[0]], sa[floats[0]])


def test_an_average_of_an_average_keeps_the_whole_tree(tmp_path):
    a, b, c = (load_pack(_pack(tmp_path, n, k)) for k, n in ((1, "a"), (2, "b"), (3, "c")))
    ab = load_pack(save_pack(average_packs([a, b]), tmp_path / "ab", dtype=torch.float32))
    abc = average_packs([ab, c])
    first, second = abc.manifest["averaged_from"]
    assert first["sha256"] == ab.sha256 and [x["sha256"] for x in first["averaged_from"]] == [a.sha256, b.sha256]
    assert "averaged_from" not in second and second["sha256"] == c.sha256


def test_a_pack_averaged_with_itself_predicts_the_same(tmp_path):
    folder = _pack(tmp_path, "a", 3)
    a = load_pack(folder)
    mixed = average_packs([folder, folder])
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(mixed.model(x), a.model(x))


def test_packs_that_differ_in_more_than_weights_are_refused(tmp_path):
    a = _pack(tmp_path, "a", 1)
    with pytest.raises(UsageError, match="they differ in classes "):
        average_packs([a, _pack(tmp_path, "two-classes", 2, num_classes=2)])
    other = untrained_pack("mslaunet", in_channels=1, num_classes=3)
    with pytest.raises(UsageError, match="they differ in architecture "):
        average_packs([load_pack(a), other])
    with pytest.raises(UsageError, match="they differ in pixel size "):
        average_packs([a, _pack(tmp_path, "mpp", 2, mpp=0.5)])
    with pytest.raises(UsageError, match="2 weights were given for 3 packs"):
        average_packs([a, a, a], [1, 2])
    with pytest.raises(UsageError, match="positive"):
        average_packs([a, a], [1, 0])
    with pytest.raises(UsageError, match="at least two packs"):
        average_packs([a])


def test_cli_writes_a_loadable_pack_and_says_what_it_averaged(tmp_path, capsys):
    a, b = _pack(tmp_path, "a", 1), _pack(tmp_path, "b", 2)
    out = tmp_path / "soup"
    assert main(["average", str(a), str(b), "--weights", "0.7,0.3", "--pack-id", "soup", "--version", "2.1.0", "-o", str(out)]) == 0
    assert f"averaged {a} 0.7, {b} 0.3" in capsys.readouterr().err
    pack = load_pack(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert pack.id == "soup" and manifest["version"] == "2.1.0"
    assert manifest["command"] == f"medseg average {a} {b} --weights 0.7,0.3 --pack-id soup --version 2.1.0 -o {out}"
    assert [s["given_as"] for s in manifest["averaged_from"]] == [str(a), str(b)]
    wa = load_pack(a).model.state_dict()
    wb = load_pack(b).model.state_dict()
    k = next(k for k, v in wa.items() if v.is_floating_point() and v.numel() > 10)
    np.testing.assert_allclose(pack.model.state_dict()[k].numpy(), (0.7 * wa[k] + 0.3 * wb[k]).half().float().numpy(), atol=1e-3)


def test_cli_refuses_bad_input_in_one_sentence(tmp_path, capsys):
    a = _pack(tmp_path, "a", 1)
    b = _pack(tmp_path, "two-classes", 2, num_classes=2)
    assert main(["average", str(a), str(b), "-o", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be averaged" in err[0]
    assert not (tmp_path / "x").exists()
    assert main(["average", str(a), str(a), "--weights", "a,b", "-o", str(tmp_path / "y")]) != 0
    assert "not a list of weights" in capsys.readouterr().err


def test_validate_scores_the_average_on_its_training_recipes_validation_split(tmp_path, capsys):


    data_dir("psfhs")
    a, b = _pack(tmp_path, "a", 1), _pack(tmp_path, "b", 2)
    out = tmp_path / "soup"
    assert main(["average", str(a), str(b), "-o", str(out), "--validate"]) == 0
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["split"] == "val" and metrics["n_cases"] > 100
    assert set(metrics["dice"]) == {"class 1", "class 2", "all"} and "aop_error_deg" in metrics
    assert json.loads(capsys.readouterr().out)["n_cases"] == metrics["n_cases"]


def test_validate_scores_the_written_fp16_weights(tmp_path, monkeypatch):
    """--validate must measure what the pack holds (fp16), not the float32 mean it was rounded from."""
    import medseg.train.average as average

    a, b = _pack(tmp_path, "a", 1), _pack(tmp_path, "b", 2)
    seen = {}

    def fake_validate(pack, data_root=None):
        seen.update({k: v.clone() for k, v in pack.model.state_dict().items()})
        return {"split": "val"}
        yield

    monkeypatch.setattr(average, "validate_iter", fake_validate)
    out = tmp_path / "soup"
    assert main(["average", str(a), str(b), "--weights", "0.37,0.63", "-o", str(out), "--validate"]) == 0
    written = load_pack(out).model.state_dict()
    assert seen and all(torch.equal(seen[k], written[k]) for k in written)
