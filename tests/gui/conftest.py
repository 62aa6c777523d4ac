"""Fixtures for tests that drive a real napari viewer (run them under Xvfb, e.g. `make test`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# napari reads its settings file on first use: keep test runs out of the home folder.
os.environ.setdefault("NAPARI_CONFIG", str(Path(tempfile.mkdtemp(prefix="napari-config-")) / "napari.yaml"))

TEST_PACK = "test-unet"
CLASS_NAMES = ["background", "pubic symphysis", "fetal head"]
CLASS_COLOURS = ["#000000", "#ff0000", "#00ff00"]


@pytest.fixture(scope="session")
def pack_folder(tmp_path_factory) -> Path:
    """A folder of small untrained packs, so tests never depend on the shipped packs."""
    from medseg.train.packs import ClassInfo, save_pack, untrained_pack

    root = tmp_path_factory.mktemp("packs")
    pack = untrained_pack("unet", 1, 3)
    pack.id = TEST_PACK
    pack.tile = 64
    pack.classes = [ClassInfo(i, n, c) for i, (n, c) in enumerate(zip(CLASS_NAMES, CLASS_COLOURS))]
    save_pack(pack, root / TEST_PACK)
    return root


@pytest.fixture
def medseg_models(pack_folder, monkeypatch) -> Path:
    """MEDSEG_MODELS pointing at the test packs."""
    monkeypatch.setenv("MEDSEG_MODELS", str(pack_folder))
    return pack_folder
