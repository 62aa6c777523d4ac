"""Shared fixtures: real data locations (tests skip cleanly without them) and tiny packs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def data_dir(name: str) -> Path:
    """The shared data folder ``name``, or skip the test with the reason."""
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set MEDSEG_DATA to the shared data folder to run this test)")
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def one_thread():
    """One torch thread and a fixed torch seed for the test, restored afterwards (small CPU models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def unet_pack():
    """An untrained small U-Net pack (1 channel, 3 classes): fast and deterministic."""
    from medseg.train.packs import untrained_pack

    torch.manual_seed(0)
    return untrained_pack("unet", in_channels=1, num_classes=3)


@pytest.fixture
def saved_pack(tmp_path, monkeypatch, unet_pack):
    """The untrained U-Net saved as pack 'test-unet' in a MEDSEG_MODELS folder."""
    from medseg.train.packs import save_pack

    folder = tmp_path / "packs"
    unet_pack.id = "test-unet"
    save_pack(unet_pack, folder / "test-unet")
    monkeypatch.setenv("MEDSEG_MODELS", str(folder))
    return folder / "test-unet"
