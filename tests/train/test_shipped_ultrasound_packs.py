"""The shipped key-frame pack: loads verified, names the segmentation pack its features come from, and
picks its key frames from the stretch of real frames of a loop whose other frames show nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.measure.keyframes import summarise_loop
from medseg.train.datasets import evenly, read_case_image
from medseg.train.packs import available_packs, load_pack, resources_dir
from medseg.train.recipes import get_recipe
from tests.conftest import data_dir

PACKS_DIR = resources_dir() / "packs"


def shipped(pack_id: str):
    folder = PACKS_DIR / pack_id
    if not (folder / "manifest.json").is_file():
        pytest.skip(f"pack '{pack_id}' is not shipped in {PACKS_DIR}")
    return load_pack(folder)  # verifies the sha256


def test_keyframes_pack_names_the_features_it_was_trained_on():
    pack = shipped("ultrasound-keyframes")
    seg = shipped("ultrasound-fhps")
    m = pack.manifest
    assert m["architecture"] == "fulltransnet" and m["weights"]["dtype"] == "float16" and m["kind"] == "sequence"
    assert "ultrasound-keyframes" not in available_packs() and "ultrasound-keyframes" in available_packs("sequence")
    assert m["features_from"]["pack"] == seg.id and m["features_from"]["sha256"] == seg.sha256
    assert pack.model.in_features == pack.in_channels == sum(seg.manifest["overrides"]["dims"])  # one pooled feature per channel of each encoder stage
    assert m["training"]["command"].startswith("python -m medseg.train.keyframes train")
    assert m["validation"]["fulltransnet"]["f_measure"] > m["validation"]["random"]["f_measure"]


def test_keyframes_pack_skips_stretches_without_anatomy_on_a_real_loop():
    torch.set_num_threads(1)
    recipe = get_recipe("psfhs")
    data_dir(recipe.folder)
    pack, seg = shipped("ultrasound-keyframes"), shipped("ultrasound-fhps")
    frames = [read_case_image(c)[0] for c in evenly(recipe.cases("val"), 8)]
    rng = np.random.default_rng(0)
    empty = [rng.integers(0, 30, frames[0].shape, dtype=np.uint8) for _ in range(4)]  # dark noise: the probe lost contact
    loop = np.stack(empty * 2 + frames + empty * 2)  # 8 frames without anatomy, 8 real frames, 8 without
    s = summarise_loop(loop, seg, pack)
    assert len(s.key_frames) == 4  # ceil(0.15 * 24)
    assert all(8 <= k < 16 for k in s.key_frames), f"key frames {s.key_frames} fall outside the real stretch 8-15"


def test_keyframes_pack_is_refused_as_a_segmentation_model():
    from medseg.engine.predictor import Predictor
    from medseg.errors import ModelError

    with pytest.raises(ModelError, match="not a segmentation pack"):
        Predictor(shipped("ultrasound-keyframes"))
