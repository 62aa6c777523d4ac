"""Training a click-guided variant on a few real PSFHS frames: the pack is interactive, records its
click encoding and its click metrics, starts from the automatic pack's weights, and loads back."""

from __future__ import annotations

import json

from medseg.engine.progress import run_sync
from medseg.interactive.clicks import DISKS
from medseg.models.guided import GuidedNet
from medseg.train.loop import TrainConfig, train_iter
from medseg.train.packs import load_pack, save_pack, untrained_pack
from tests.conftest import data_dir


def test_a_tiny_interactive_run_writes_an_interactive_pack(tmp_path):
    root = data_dir("psfhs").parent
    start = untrained_pack("unet", in_channels=1, num_classes=3)
    save_pack(start, tmp_path / "auto")
    cfg = TrainConfig(dataset="psfhs", data_root=str(root), arch="unet", config="small", crop=64, batch_size=2, steps=3, val_every=3,
                      train_limit=4, val_limit=1, final_eval_limit=1, workdir=str(tmp_path / "work"), run="click", device="cpu",
                      interactive="disks", init_from=str(tmp_path / "auto"), pack_id="toy-click")
    result = run_sync(train_iter(cfg))
    manifest = json.loads((result.pack_path / "manifest.json").read_text())
    assert manifest["interactive"] is True and manifest["click_encoding"] == DISKS and manifest["id"] == "toy-click"
    assert [c["name"] for c in manifest["classes"]] == ["background", "object"]
    assert manifest["training"]["init_from"]["skipped_tensors"] == 0 and manifest["training"]["init_from"]["loaded_tensors"] > 0
    assert {"fetal head", "pubic symphysis"} <= set(manifest["metrics"]) and manifest["metrics"]["fetal head"]["objects"] == 1
    pack = load_pack(result.pack_path)
    assert pack.interactive and isinstance(pack.model, GuidedNet) and pack.model.in_channels == 4
