"""Key frames of a loop: top-scored selection, frame quality, the summary through real packs (tiny, untrained), pseudo-loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medseg.errors import InputError
from medseg.measure.keyframes import LoopSummary, frame_quality, select_key_frames, summarise_loop
from medseg.train.keyframes import target_frames
from medseg.train.multitask import displace


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """An untrained MSLAU-Net segmentation pack (tile 64) and a FullTransNet summariser on its 240 encoder features."""
    from medseg import models
    from medseg.train.packs import ClassInfo, Pack, load_pack, save_pack, untrained_pack

    root = tmp_path_factory.mktemp("kf-packs")
    torch.manual_seed(0)
    seg = untrained_pack("mslaunet", 1, 3, tile=64)
    seg.id = "test-mslaunet"
    seg.classes = [ClassInfo(0, "background", "#000000"), ClassInfo(1, "pubic symphysis", "#ff0000"), ClassInfo(2, "fetal head", "#00ff00")]
    save_pack(seg, root / seg.id)
    summariser = Pack("test-keyframes", models.build("fulltransnet", in_channels=240, config="small").eval(), "fulltransnet", "small", 240,
                      [ClassInfo(0, "key frame", "#ffd700")], activation="none", tile=64)
    summariser.manifest = {"kind": "sequence"}
    save_pack(summariser, root / summariser.id)
    return load_pack(root / seg.id), load_pack(root / summariser.id)


def test_select_key_frames_takes_the_top_scored_in_temporal_order():
    scores = [0.1, 0.9, 0.3, 0.8, 0.8, 0.0, 0.2, 0.95, 0.4, 0.1]
    assert select_key_frames(scores, 0.3) == [1, 3, 7]  # 0.8 tie: the earlier frame wins
    assert select_key_frames(scores, 0.05) == [7]  # at least one
    assert select_key_frames([], 0.15) == []


def test_frame_quality_needs_both_structures():
    probs = np.zeros((3, 40, 40), np.float32)
    probs[0] = 1.0
    assert frame_quality(probs) == 0.0
    probs[:, 5:10, 5:10] = np.array([0.2, 0.7, 0.1])[:, None, None]  # PS, 25 px
    assert frame_quality(probs) == 0.0  # no head
    probs[:, 20:35, 20:35] = np.array([0.1, 0.0, 0.9])[:, None, None]  # FH, 225 px
    assert frame_quality(probs) == pytest.approx((25 * 0.7 + 225 * 0.9) / 250)


def test_summary_picks_the_top_scored_frames_of_a_loop(packs):
    seg, summariser = packs
    stack = np.random.default_rng(0).integers(0, 255, (12, 48, 40), dtype=np.uint8)
    s = summarise_loop(stack, seg, summariser, ratio=0.2)
    assert isinstance(s, LoopSummary) and s.scores.shape == (12,) and s.quality.shape == (12,)
    assert len(s.key_frames) == math.ceil(0.2 * 12)
    assert s.key_frames == select_key_frames(s.scores, 0.2)
    assert min(s.scores[s.key_frames]) >= max(np.delete(s.scores, s.key_frames))
    assert s.next_key(s.key_frames[0]) == s.key_frames[1] and s.previous_key(s.key_frames[0]) == s.key_frames[-1]


def test_summary_refuses_a_single_frame(packs):
    seg, summariser = packs
    with pytest.raises(InputError, match="stack of at least 2 frames"):
        summarise_loop(np.zeros((48, 40), np.uint8), seg, summariser)


def test_pseudo_loop_targets_and_probe_drift():
    q = np.array([0.0, 0.9, 0.5, 0.0, 0.95, 0.6, 0.7, 0.0, 0.0, 0.8])
    assert target_frames(q, 0.3) == [1, 4, 9]
    assert target_frames(np.zeros(10), 0.3) == []  # nothing measurable: the loop is skipped
    img = np.arange(100, dtype=np.float32).reshape(1, 10, 10) + 1
    mask = np.ones((10, 10), np.uint8)
    out, m = displace(img, mask, np.random.default_rng(3), 0.45)
    assert out.shape == img.shape and (m == 0).any() and set(np.unique(out[0][m == 0])) == {1.0}
