"""FullTransNet training on pseudo-loops: a synthetic frame bank, resumable steps, the evaluation's oracle and baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.train.keyframes import KeyframeConfig, evaluate_loops, f_measure, sample_loop, train_iter
from medseg.engine.progress import run_sync


@pytest.fixture
def bank():
    rng = np.random.default_rng(0)
    n, v, f = 40, 4, 12
    quality = rng.uniform(0.5, 1.0, (n, v)).astype(np.float32)
    quality[:, 3] = 0.0  # one degraded variant never shows both structures
    features = rng.standard_normal((n, v, f)).astype(np.float32)
    features[..., 0] = quality * 4  # the quality is readable from the features
    return {"features": features, "quality": quality, "kinds": np.tile(np.arange(v), (n, 1)), "ids": np.arange(n).astype(str)}


def test_pseudo_loops_follow_the_bank(bank):
    f, q = sample_loop(bank, np.random.default_rng(1), 24, 30)
    assert 24 <= len(q) <= 30 and f.shape == (len(q), 12)
    assert all(any(np.allclose(row, bank["features"][i, j]) for i in range(40) for j in range(4)) for row in f[:3])


def test_training_resumes_and_evaluation_ranks_the_oracle_first(bank, tmp_path):
    torch.set_num_threads(1)
    cfg = KeyframeConfig(workdir=str(tmp_path), run="kf", steps=3, batch_size=2, ckpt_every=1)
    run_sync(train_iter(cfg, bank))
    resumed_cfg = KeyframeConfig(workdir=str(tmp_path), run="kf", steps=5, batch_size=2, ckpt_every=1)
    model = run_sync(train_iter(resumed_cfg, bank))
    ckpt = torch.load(tmp_path / "kf" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 5 and [h["step"] for h in ckpt["history"]] == [1, 2, 3, 4, 5]
    report = evaluate_loops(model, bank, n_loops=6)
    assert report["oracle"]["f_measure"] == 1.0 and report["oracle"]["both_structures"] == 1.0
    assert set(report) == {"fulltransnet", "oracle", "evenly spaced", "random", "loops"}
    assert f_measure([1, 2], [2, 3]) == 0.5 and f_measure([1], [2]) == 0.0
