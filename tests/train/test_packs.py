"""Packs: a saved pack loads back to the same outputs; tampered or mismatched packs are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medseg.errors import ModelError
from medseg.train.packs import ClassInfo, Pack, load_pack, save_pack
from medseg.normalise import Normaliser
from medseg import models


def _pack(tmp_path):
    torch.manual_seed(0)
    model = models.build("unet", in_channels=1, num_classes=3, config="small").eval()
    pack = Pack(
        id="roundtrip",
        model=model,
        architecture="unet",
        config="small",
        in_channels=1,
        classes=[ClassInfo(0, "background", "#000000"), ClassInfo(1, "pubic symphysis", "#e6194b"), ClassInfo(2, "fetal head", "#3cb44b")],
        normaliser=Normaliser.from_spec({"kind": "zscore"}),
        mpp=None,
        tile=64,
    )
    return pack, save_pack(pack, tmp_path / "roundtrip", extra={"licence": "CC-BY-4.0", "metrics": {"dice": {"fetal head": 0.9}}})


def test_round_trip_gives_the_same_outputs(tmp_path):
    pack, folder = _pack(tmp_path)
    loaded = load_pack(folder)
    x = torch.randn(2, 1, 48, 40)
    with torch.no_grad():
        # the pack stores fp16 weights: compare with the original rounded the same way
        ref_model = models.build("unet", in_channels=1, num_classes=3, config="small").eval()
        ref_model.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in pack.model.state_dict().items()})
        assert torch.equal(loaded.model(x), ref_model(x))
        assert torch.allclose(loaded.model(x), pack.model(x), atol=5e-2)
    assert loaded.classes == pack.classes and loaded.tile == 64 and loaded.normaliser.kind == "zscore"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["licence"] == "CC-BY-4.0" and manifest["weights"]["dtype"] == "float16"
    from medseg.engine import Predictor

    image = np.random.default_rng(0).integers(0, 255, (70, 90), dtype=np.uint8)
    assert np.array_equal(Predictor(loaded).predict(image).labels, Predictor(load_pack(folder)).predict(image).labels)


def test_tampered_weights_are_refused(tmp_path):
    _, folder = _pack(tmp_path)
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="integrity"):
        load_pack(folder)


def test_manifest_naming_another_architecture_is_refused(tmp_path):
    _, folder = _pack(tmp_path)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"] = "full"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="does not match"):
        load_pack(folder)
    manifest["config"] = "small"
    manifest["classes"] = manifest["classes"][:2]  # wrong number of outputs
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="does not match"):
        load_pack(folder)


def test_available_packs_lists_segmentation_packs_unless_asked_for_every_kind(saved_pack):
    import json

    from medseg.train.packs import available_packs, find_pack

    encoder = saved_pack.parent / "report-encoder"
    encoder.mkdir()
    (encoder / "manifest.json").write_text(json.dumps({"id": "report-encoder", "kind": "cmcgns-encoder"}))
    broken = saved_pack.parent / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    listed = available_packs()
    assert "test-unet" in listed and "broken" in listed  # a broken pack is listed so that loading it says why
    assert "report-encoder" not in listed
    assert "report-encoder" in available_packs(kind=None)
    assert available_packs(kind="cmcgns-encoder").keys() >= {"report-encoder"}
    assert find_pack("report-encoder") == encoder


def test_a_pack_that_names_sequences_is_a_multisequence_pack(saved_pack):
    import json

    from medseg.train.packs import available_packs

    manifest = json.loads((saved_pack / "manifest.json").read_text())
    (saved_pack / "manifest.json").write_text(json.dumps({**manifest, "sequences": ["C0", "LGE", "T2"]}))
    assert "test-unet" not in available_packs()  # not offered where one image is segmented
    assert "test-unet" in available_packs(kind="multisequence")
