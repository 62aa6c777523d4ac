"""The training loop on a few real PSFHS frames: the loss falls, a pack is written, and a run
interrupted and resumed from its checkpoint ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from medseg.engine.progress import CancelToken, run_sync
from medseg.errors import Cancelled, UsageError
from medseg.train.loop import TrainConfig, train_iter, warmup_cosine

DATA = Path(os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


@pytest.fixture
def psfhs_root():
    if not (DATA / "psfhs").is_dir():
        pytest.skip(f"real data folder {DATA / 'psfhs'} is absent (set MEDSEG_DATA to the shared data folder to run this test)")
    return str(DATA)


def _tiny(tmp_path, data_root, **kw) -> TrainConfig:
    base = dict(
        dataset="psfhs",
        data_root=data_root,
        arch="unet",
        config="small",
        crop=48,
        batch_size=2,
        train_limit=4,
        val_limit=1,
        final_eval_limit=1,
        workdir=str(tmp_path / "work"),
        device="cpu",
        seed=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_schedule_warms_up_then_decays():
    f = warmup_cosine(total=100, warmup=10, min_ratio=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.505) and f(100) == pytest.approx(0.01)


def test_tiny_run_lowers_the_loss_and_writes_a_pack(tmp_path, psfhs_root):
    cfg = _tiny(tmp_path, psfhs_root, steps=24, val_every=8, lr=3e-3, run="tiny", command="medseg train --steps 24")
    result = run_sync(train_iter(cfg))
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result.steps == 24 and result.pack_path.is_dir() and result.steps_per_minute > 0
    manifest = json.loads((result.pack_path / "manifest.json").read_text())
    assert manifest["architecture"] == "unet" and manifest["licence"] == "CC-BY-4.0" and manifest["command"] == "medseg train --steps 24"
    assert manifest["training"]["dataset"] == "psfhs" and manifest["training"]["steps"] == 24 and "split_rule" in manifest["training"]
    assert set(manifest["metrics"]["dice"]) == {"pubic symphysis", "fetal head", "all"}
    assert (result.run_dir / "val_report.json").is_file() and (result.run_dir / "val_report.md").is_file()
    from medseg.train.packs import load_pack

    pack = load_pack(result.pack_path)
    assert pack.in_channels == 1 and [c.name for c in pack.classes] == ["background", "pubic symphysis", "fetal head"]


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path, psfhs_root):
    straight = run_sync(train_iter(_tiny(tmp_path, psfhs_root, steps=6, val_every=3, run="straight")))

    cancel = CancelToken()
    interrupted = _tiny(tmp_path, psfhs_root, steps=6, val_every=3, run="resumed")
    with pytest.raises(Cancelled, match="resume"):
        run_sync(train_iter(interrupted, cancel), lambda e: cancel.cancel() if e.done == 3 and e.total == 6 else None)
    ckpt = torch.load(Path(interrupted.workdir) / "resumed" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 3
    with pytest.raises(UsageError, match="--resume"):
        run_sync(train_iter(interrupted))
    interrupted.resume = True
    resumed = run_sync(train_iter(interrupted))

    assert resumed.steps == straight.steps == 6
    last_a = torch.load(Path(interrupted.workdir) / "straight" / "ckpt.pt", weights_only=False)
    last_b = torch.load(Path(interrupted.workdir) / "resumed" / "ckpt.pt", weights_only=False)
    for key, value in last_a["model"].items():
        assert torch.allclose(value.float(), last_b["model"][key].float(), atol=1e-6, rtol=0), key
    assert [h["val_dice"] for h in straight.history] == pytest.approx([h["val_dice"] for h in resumed.history], abs=1e-6)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_cli_trains_from_a_json_config_and_evaluates(tmp_path, psfhs_root):
    from medseg.cli import main

    config = tmp_path / "train.json"
    config.write_text(json.dumps({"dataset": "psfhs", "crop": 32, "batch_size": 2, "train_limit": 2, "val_limit": 1, "final_eval_limit": 1, "device": "cpu"}))
    pack = tmp_path / "pack"
    code = main(["train", "--config-file", str(config), "--data-root", psfhs_root, "--steps", "2", "--workdir", str(tmp_path / "w"), "--run", "cli", "-o", str(pack)])
    assert code == 0
    manifest = json.loads((pack / "manifest.json").read_text())
    assert manifest["command"].startswith("medseg train --config-file") and "--steps 2" in manifest["command"]
    assert manifest["training"]["config"]["crop"] == 32

    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(pack), "--dataset", "psfhs", "--split", "val", "--data-root", psfhs_root, "--limit", "2", "-o", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / f"{manifest['id']}-psfhs-val.json").read_text())
    assert report["n_cases"] == 2 and {"pubic symphysis", "fetal head", "all"} <= set(report["structures"])
    assert "biometry" in report and len(report["cases"]) == 2
    assert "| structure |" in (out / f"{manifest['id']}-psfhs-val.md").read_text()
    assert main(["evaluate", "--model", str(pack), "--dataset", "psfhs", "--split", "nope", "--data-root", psfhs_root]) == 2


def test_keep_last_writes_the_final_weights_and_best_the_best(tmp_path, psfhs_root):
    from medseg.train.loop import _fp16_round
    from medseg.train.packs import load_pack

    for keep in ("last", "best"):
        cfg = _tiny(tmp_path, psfhs_root, steps=6, val_every=2, lr=3e-3, run=f"keep-{keep}", keep=keep)
        result = run_sync(train_iter(cfg))
        ckpt = torch.load(result.run_dir / "ckpt.pt", weights_only=False)
        expected = _fp16_round(ckpt["model"] if keep == "last" else ckpt["best_state"])
        written = load_pack(result.pack_path).model.state_dict()
        assert all(torch.equal(written[k].float(), expected[k].float()) for k in expected), keep
        assert json.loads((result.pack_path / "manifest.json").read_text())["training"]["config"]["keep"] == keep
    with pytest.raises(UsageError, match="--keep"):
        run_sync(train_iter(_tiny(tmp_path, psfhs_root, steps=2, run="bad", keep="first")))


def test_train_sources_and_folders_choose_the_cases(tmp_path, psfhs_root):
    """--train-sources keeps one source's training cases (an unknown one is refused, naming those there are);
    --val-folder validates on a folder (with its µm/px from splits.csv) instead of the recipe's split."""
    import imageio.v3 as iio
    import numpy as np

    from medseg.train.loop import _Trainer
    from medseg.train.recipes import RECIPES

    sources = {c.source for c in RECIPES["psfhs"].cases("train", psfhs_root)}
    one = sorted(sources)[0]
    t = _Trainer(_tiny(tmp_path, psfhs_root, steps=1, train_limit=None, train_sources=[one]))
    assert t.train_cases and {c.source for c in t.train_cases} == {one}
    with pytest.raises(UsageError, match="sources of this training split are"):
        _Trainer(_tiny(tmp_path, psfhs_root, steps=1, train_sources=["no-such-source"]))
    folder = tmp_path / "val"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for k in range(2):
        iio.imwrite(folder / "images" / f"t{k}.png", np.full((64, 64), 40 * k, np.uint8))
        iio.imwrite(folder / "masks" / f"t{k}.png", np.zeros((64, 64), np.uint8))
    (folder / "splits.csv").write_text("name,split,group,source,mpp\nt0,val,t0,mine,0.5\nt1,val,t1,mine,\n")
    t = _Trainer(_tiny(tmp_path, psfhs_root, steps=1, val_folder=str(folder)))
    assert [(c.id, c.mpp, c.source) for c in t.val_cases] == [("t0", 0.5, "mine"), ("t1", None, "mine")]


def test_augment_overrides_replace_fields_of_the_recipe_augmentation(tmp_path, psfhs_root):
    from medseg.train.loop import _Trainer
    from medseg.train.recipes import RECIPES

    base = RECIPES["psfhs"].augment
    t = _Trainer(_tiny(tmp_path, psfhs_root, steps=1, augment_overrides={"contrast": 0.5, "scale": [1.0, 1.0]}))
    assert t.dataset.augment_config == t.augmentation() and t.augmentation().contrast == 0.5 and t.augmentation().scale == (1.0, 1.0)
    assert {k: v for k, v in t.augmentation().to_dict().items() if k not in ("contrast", "scale")} == {k: v for k, v in base.to_dict().items() if k not in ("contrast", "scale")}
    assert _Trainer(_tiny(tmp_path, psfhs_root, steps=1, augment=False, augment_overrides={"contrast": 0.5})).augmentation().contrast == 0.0
    with pytest.raises(UsageError, match="Unknown augmentation field"):
        _Trainer(_tiny(tmp_path, psfhs_root, steps=1, augment_overrides={"colour": 1}))


def test_retime_stretches_the_cosine_keeps_the_warm_up_and_survives_a_checkpoint(tmp_path, psfhs_root):
    from medseg.train.loop import _Trainer

    def trainer():
        t = _Trainer(_tiny(tmp_path, psfhs_root, minutes=1, run="retime"))
        t.build()
        t.make_scheduler(100)
        t.n_val, t.val_quick, t.val_case_s = 10, [], 0.0
        t.step, t.best_score, t.best_step, t.best_state, t.history = 0, -1.0, 0, None, []
        t.t0, t.elapsed_before, t.train_seconds = 0.0, 0.0, 0.0
        return t

    t = trainer()
    for _ in range(20):
        t.optimizer.step()
        t.scheduler.step()
    t.step = 20
    t.elapsed = lambda: 10.0
    assert t.retime(step_s=0.1, deadline=40.0) == 20 + int(0.95 * 30.0 / 0.1)  # 30 s left at 0.1 s a step
    assert t.total == 305 and t.retimed_from == 100 and t.warmup_steps == 5
    curve = warmup_cosine(305, 5, t.cfg.min_lr_ratio)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(t.cfg.lr * curve(20))
    t.optimizer.step()
    t.scheduler.step()
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(t.cfg.lr * curve(21))
    assert t.retime(step_s=0.1, deadline=40.0) is None  # within 5 %: unchanged

    ckpt = t.checkpoint()
    assert ckpt["total"] == 305 and ckpt["warmup_steps"] == 5 and ckpt["retimed_from"] == 100
    again = trainer()
    again.restore(ckpt)
    assert again.total == 305 and again.warmup_steps == 5 and again.retimed_from == 100
    again.optimizer.step()
    again.scheduler.step()
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(t.cfg.lr * curve(22))


def test_end_weight_trains_records_its_loss_and_refuses_bad_values(tmp_path, psfhs_root):
    result = run_sync(train_iter(_tiny(tmp_path, psfhs_root, steps=2, val_every=2, run="ends", end_weight=4.0, end_radius=3.0)))
    manifest = json.loads((result.pack_path / "manifest.json").read_text())
    assert "weighted 1 + 4.0 x a Gaussian (sigma 3.0 px) at the long-axis ends of class 1" in manifest["training"]["loss"]
    from medseg.train.loop import _Trainer

    with pytest.raises(UsageError, match="not a foreground class"):
        _Trainer(_tiny(tmp_path, psfhs_root, steps=1, end_weight=1.0, end_class=3))
    with pytest.raises(UsageError, match="must be at least 0"):
        _Trainer(_tiny(tmp_path, psfhs_root, steps=1, end_weight=-1.0))
