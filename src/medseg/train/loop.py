"""The training loop, written once as a generator that yields :class:`Progress` (spec §11.6).

AdamW, cosine schedule with linear warm-up, cross-entropy + soft Dice; validation with the same
Predictor users run, best-on-validation selection; checkpoints (model, optimiser, scheduler, scaler,
torch RNG, best weights, history) to ``<workdir>/<run>/ckpt.pt`` that resume exactly: the data
stream is a pure function of (seed, sample index), so a resumed run equals an uninterrupted one.
AMP and channels_last on GPU, optional bf16 autocast on the CPU. At the end the best weights are
rounded to fp16, evaluated on the whole validation split and written as a pack whose manifest
records the data, split, metrics, licence and the exact command.

Length: ``steps``, or ``epochs`` (passes over the training split), or a ``minutes`` budget, turned
into a step count once by timing a few steps on a throw-away copy of the model (so the schedule is
fixed; the run also stops at the deadline).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from medseg import models
from medseg.engine.devices import device_name, resolve_device
from medseg.engine.predictor import PredictConfig
from medseg.engine.progress import CancelToken, Job, Progress, run_sync
from medseg.errors import Cancelled, UsageError
from medseg.io.atomic import atomic_path
from medseg.normalise import Normaliser
from medseg.train.augment import NONE, AugmentConfig
from medseg.train.datasets import SegmentationDataset, TrainSamples, balance_sources, evenly, folder_cases
from medseg.train.evaluate import EvalOptions, evaluate_iter, headline, mean_dice, write_report
from medseg.train.losses import DiceCELoss, axis_end_weights
from medseg.train.packs import Pack, load_pack, save_pack
from medseg.train.recipes import Recipe, get_recipe

CHECKPOINT = "ckpt.pt"
RETIME_SKIP = 5  # steps not timed when re-timing (loader start-up, first kernels)
RETIME_MIN_S, RETIME_SHARE = 10.0, 0.04  # re-time after this much timed training (seconds, share of the budget)
VAL_SHARE = 0.15  # at most this share of a --minutes budget goes to validation during training


@dataclass
class TrainConfig:
    """Everything a training run depends on; a JSON config file holds the same keys."""

    dataset: str = "psfhs"  # recipe name or dataset folder
    data_root: str | None = None
    arch: str = "unet"
    config: str = "small"
    arch_overrides: dict[str, Any] | None = None  # constructor arguments on top of the config (recorded in the pack)
    init_from: str | None = None  # start from a pack's weights (id or folder): fine-tuning; matching keys and shapes are copied
    encoder_init: str | None = None  # start the encoder from an encoder pack of 'medseg pretrain' (medseg.pretrain.pack)
    classes: list[str] | None = None
    mask_kind: str | None = None
    threshold: float | None = None
    crop: int | None = None  # default: the recipe's
    batch_size: int | None = None  # default: the recipe's
    steps: int | None = None
    epochs: float | None = None
    minutes: float | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05  # fraction of the steps
    min_lr_ratio: float = 0.01
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on GPU
    cpu_bf16: bool = False  # bf16 autocast on the CPU
    deterministic: bool = True
    workers: int | None = None  # data loader processes (default 0 on CPU, 4 on GPU)
    augment: bool = True
    augment_overrides: dict[str, Any] | None = None  # fields replaced on the recipe's augmentation (e.g. {"hed": 0, "scale": [1, 1]})
    val_every: int | None = None  # steps (default: 10 validations per run)
    ckpt_every: int | None = None  # steps (default: at each validation)
    val_limit: int | None = 48  # validation cases used during training (all for the final report)
    train_limit: int | None = None  # use only this many training cases (tests, quick trials)
    train_folder: str | None = None  # train on this folder's images/ + masks/ (class indices) instead of the recipe's training split; validation stays the recipe's
    train_replay: bool = False  # with train_folder: also draw from the recipe's training split (the folder's cases repeated to make half the samples)
    val_folder: str | None = None  # validate (and select) on this folder's images/ + masks/ instead of the recipe's validation split
    freeze_norm: bool = False  # keep batch-norm statistics fixed (fine-tuning on a few images)
    balance_sources: bool = False  # repeat each acquisition source's training cases to an equal share of an epoch
    train_sources: list[str] | None = None  # keep only the recipe's training cases of these acquisition sources
    keep: str = "best"  # weights written to the pack: "best" on validation, or "last"
    workdir: str = "work"
    run: str | None = None
    resume: bool = False
    fresh: bool = False
    out: str | None = None  # pack folder (default <workdir>/<run>/pack)
    pack_id: str | None = None
    threads: int | None = None
    final_eval: bool = True
    final_eval_limit: int | None = None  # evaluate the pack on this many validation cases (default all)
    end_weight: float = 0.0  # extra cross-entropy weight at the two ends of class end_class's long axis (AoP hinges on them); 0 = off
    end_class: int = 1  # class index whose long-axis ends are weighted (1 = pubic symphysis in psfhs)
    end_radius: float = 4.0  # sigma in pixels (of the training crop) of the weight bump at each end
    interactive: str | None = None  # train a click-guided variant with this click encoding ("disks"): medseg.train.interactive
    command: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"Unknown training option(s) {', '.join(unknown)}: use {', '.join(sorted(known))}.")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TrainConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"Cannot read the training config '{path}' ({exc}): give a JSON file of training options.") from exc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def run_name(self) -> str:
        return self.run or f"{Path(self.dataset).name}-{self.arch}-{self.config}"

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) / self.run_name


@dataclass
class TrainResult:
    pack_path: Path | None
    run_dir: Path
    steps: int
    best_step: int
    best_score: float
    seconds: float
    train_seconds: float
    steps_per_minute: float
    images_per_second: float
    history: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] | None = None
    model: nn.Module | None = None


# --------------------------------------------------------------------------- pieces
def warmup_cosine(total: int, warmup: int, min_ratio: float):
    """lr factor per step: linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and normalisation weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        else:
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _autocast(device: torch.device, cfg: TrainConfig):
    import contextlib

    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if device.type == "cpu" and cfg.cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Batches(torch.utils.data.Dataset):
    """Step index -> whole batch, for DataLoader workers (same values as in-process batches)."""

    def __init__(self, samples: TrainSamples, batch_size: int) -> None:
        self.samples, self.batch_size = samples, batch_size

    def __len__(self) -> int:
        return 2**31

    def __getitem__(self, step: int):
        return self.samples.batch(step, self.batch_size)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _batch_stream(samples: TrainSamples, batch_size: int, start: int, stop: int, workers: int, pin: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if workers <= 0:
        for step in range(start, stop):
            yield samples.batch(step, batch_size)
        return
    loader = torch.utils.data.DataLoader(
        _Batches(samples, batch_size), batch_size=None, sampler=range(start, stop), num_workers=workers, pin_memory=pin, worker_init_fn=_worker_init, prefetch_factor=4
    )
    for x, y in loader:
        yield x, y


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _fp16_round(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a pack stores and loads back: floating tensors through fp16."""
    return {k: (v.half().float() if v.is_floating_point() else v) for k, v in state.items()}


# --------------------------------------------------------------------------- the loop
class _Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.recipe: Recipe = get_recipe(cfg.dataset, cfg.classes, cfg.mask_kind, cfg.threshold)
        self.device = resolve_device(cfg.device)
        self.crop = int(cfg.crop or self.recipe.crop)
        self.batch_size = int(cfg.batch_size or self.recipe.batch_size)
        if self.crop < 16 or self.batch_size < 1:
            raise UsageError(f"Crop {self.crop} and batch size {self.batch_size} must be at least 16 and 1.")
        self.workers = cfg.workers if cfg.workers is not None else (4 if self.device.type == "cuda" else 0)
        self.run_dir = cfg.run_dir
        self.ckpt_path = self.run_dir / CHECKPOINT
        if cfg.keep not in ("best", "last"):
            raise UsageError(f"Unknown --keep '{cfg.keep}': use best (the best weights on validation) or last (the final ones).")
        if cfg.end_weight < 0 or cfg.end_radius <= 0:
            raise UsageError(f"--end-weight {cfg.end_weight} and --end-radius {cfg.end_radius} must be at least 0 and above 0.")
        if cfg.end_weight > 0 and not 0 < cfg.end_class < self.recipe.num_classes:
            raise UsageError(f"--end-class {cfg.end_class} is not a foreground class of this dataset: use 1 to {self.recipe.num_classes - 1}.")
        train_cases = folder_cases(cfg.train_folder) if cfg.train_folder else self.recipe.cases("train", cfg.data_root)
        if cfg.train_sources:
            known = sorted({c.source for c in train_cases})
            train_cases = [c for c in train_cases if c.source in cfg.train_sources]
            if not train_cases:
                raise UsageError(f"No training case comes from {', '.join(cfg.train_sources)}: the sources of this training split are {', '.join(known)}.")
        if cfg.balance_sources and not cfg.train_folder:
            train_cases = balance_sources(train_cases)
        if cfg.train_folder and cfg.train_replay:
            original = self.recipe.cases("train", cfg.data_root)
            train_cases = original + train_cases * max(1, round(len(original) / len(train_cases)))
        self.train_cases = evenly(train_cases, cfg.train_limit)
        self.val_cases = folder_cases(cfg.val_folder) if cfg.val_folder else self.recipe.cases("val", cfg.data_root)
        if not self.val_cases:
            raise UsageError(f"Dataset '{self.recipe.name}' has no validation cases: best-on-validation selection needs a 'val' split.")
        self.val_quick = evenly(self.val_cases, cfg.val_limit)
        self.n_val = 10  # validations per run, unless --val-every says otherwise
        self.normaliser = Normaliser.from_spec(self.recipe.normalisation)
        self.augment_config = self.augmentation()
        self.dataset = SegmentationDataset(
            self.train_cases,
            self.recipe.in_channels,
            self.recipe.num_classes,
            self.normaliser,
            self.crop,
            self.augment_config,
            self.recipe.mpp,
            cache=True,
        )
        self.samples = TrainSamples(self.dataset, cfg.seed)
        self.loss_fn = DiceCELoss()
        self.scaler: torch.amp.GradScaler | None = None

    def augmentation(self) -> AugmentConfig:
        """The recipe's augmentation with the configured overrides (none with ``augment`` off)."""
        if not self.cfg.augment:
            return NONE
        if not self.cfg.augment_overrides:
            return self.recipe.augment
        merged = {**self.recipe.augment.to_dict(), **self.cfg.augment_overrides}
        unknown = sorted(set(self.cfg.augment_overrides) - set(self.recipe.augment.to_dict()))
        if unknown:
            raise UsageError(f"Unknown augmentation field(s) {', '.join(unknown)}: use {', '.join(sorted(self.recipe.augment.to_dict()))}.")
        return AugmentConfig.from_dict(merged)

    # ---------------------------------------------------------------- model and state
    def build(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed, cfg.deterministic, self.device)
        self.model = self.new_model().to(self.device)
        if cfg.init_from:
            self.init_info = self.init_weights(self.model, cfg.init_from)
        if cfg.encoder_init:
            from medseg.pretrain.pack import init_segmentation_encoder

            self.encoder_info = init_segmentation_encoder(self.model, cfg.encoder_init, cfg.arch, cfg.config)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
        if self.device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported():
            self.scaler = torch.amp.GradScaler("cuda")

    def new_model(self) -> nn.Module:
        """The network being trained, freshly initialised."""
        cfg, r = self.cfg, self.recipe
        return models.build(cfg.arch, in_channels=r.in_channels, num_classes=r.num_classes, config=cfg.config, **(cfg.arch_overrides or {}))

    def init_weights(self, model: nn.Module, name: str) -> dict[str, Any]:
        return init_from_pack(model, name)

    def final_report(self, pack: Pack) -> Job[dict[str, Any] | None]:
        """The full evaluation of the finished pack on the validation split (written next to the run)."""
        job = evaluate_iter(pack, self.recipe, evenly(self.val_cases, self.cfg.final_eval_limit), self.predict_config(), EvalOptions(), split="val")
        report = yield from _relay(job, "final validation")
        write_report(report, self.run_dir, "val_report")
        return report

    def make_scheduler(self, total: int, warmup_steps: int | None = None) -> None:
        self.total = int(total)
        self.warmup_steps = int(warmup_steps) if warmup_steps else max(1, int(round(self.cfg.warmup * self.total)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(self.total, self.warmup_steps, self.cfg.min_lr_ratio))

    def retime(self, step_s: float, deadline: float) -> int | None:
        """A new step count for a ``--minutes`` run from the step time measured on the real batch stream.

        The calibration times steps with batches made in the main process; with loader workers (or
        alongside other work) the real rate differs, and a run cut at its deadline never finishes
        its schedule. Called once, early: the schedule keeps its warm-up and stretches (or shrinks)
        its cosine to the new count. Returns the new count, or None when it is within 5 %.
        """
        remaining = max(0.0, deadline - self.elapsed())
        left = max(0.0, 1.0 - self.step / max(1, self.total))
        val_s = left * self.n_val * len(self.val_quick) * getattr(self, "val_case_s", 0.0)
        total = self.step + max(10, int(0.95 * (remaining - val_s) / max(step_s, 1e-6)))
        if abs(total - self.total) <= 0.05 * self.total:
            return None
        self.scheduler.lr_lambdas = [warmup_cosine(total, self.warmup_steps, self.cfg.min_lr_ratio) for _ in self.optimizer.param_groups]
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.retimed_from, self.total = self.total, total
        return total

    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": 1,
            "step": self.step,
            "total": self.total,
            "warmup_steps": self.warmup_steps,
            "retimed_from": getattr(self, "retimed_from", None),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "val_quick": [c.id for c in self.val_quick],
            "n_val": self.n_val,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "best_state": self.best_state,
            "history": self.history,
            "elapsed": self.elapsed(),
            "train_seconds": self.train_seconds,
            "config": self.cfg.to_dict(),
            "arch": self.cfg.arch,
            "arch_config": self.cfg.config,
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("arch") != self.cfg.arch or ckpt.get("arch_config") != self.cfg.config:
            raise UsageError(
                f"The checkpoint in '{self.run_dir}' is of {ckpt.get('arch')}/{ckpt.get('arch_config')}, not {self.cfg.arch}/{self.cfg.config}: "
                "resume with the same architecture or choose another --run."
            )
        self.model.load_state_dict(ckpt["model"])
        self.make_scheduler(ckpt["total"], ckpt.get("warmup_steps"))  # before the optimiser state: creating a scheduler resets the lr
        if ckpt.get("retimed_from"):
            self.retimed_from = int(ckpt["retimed_from"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        ids = set(ckpt.get("val_quick", [c.id for c in self.val_quick]))
        self.val_quick = [c for c in self.val_cases if c.id in ids]
        self.n_val = int(ckpt.get("n_val", 10))
        self.step = int(ckpt["step"])
        self.best_score, self.best_step, self.best_state = ckpt["best_score"], ckpt["best_step"], ckpt["best_state"]
        self.history = list(ckpt["history"])
        self.elapsed_before = float(ckpt["elapsed"])
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.t0)

    # ---------------------------------------------------------------- steps
    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: Any, y: Any, scheduler=None) -> float:
        model.train()
        if self.cfg.freeze_norm:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        x = torch.as_tensor(x).to(self.device, non_blocking=True)
        y = torch.as_tensor(y).to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, self.cfg):
            logits = model(x)
        weight = axis_end_weights(y, self.cfg.end_class, self.cfg.end_weight, self.cfg.end_radius) if self.cfg.end_weight > 0 else None
        loss = self.loss_fn(logits, y, weight)
        if self.scaler is not None and model is self.model:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return float(loss.detach())

    def live_pack(self, model: nn.Module, pack_id: str = "validation") -> Pack:
        r = self.recipe
        return Pack(pack_id, model, self.cfg.arch, self.cfg.config, r.in_channels, r.classes(), self.normaliser, "softmax", r.mpp, r.tile, r.overlap)

    def predict_config(self) -> PredictConfig:
        return PredictConfig(tile=self.recipe.tile, overlap=self.recipe.overlap, batch_size=8 if self.device.type == "cuda" else 4, device=str(self.device))

    def validate(self, model: nn.Module, cases) -> float:
        options = EvalOptions(distances=False, objects=False, biometry=False, keep_cases=False)
        report = run_sync(evaluate_iter(self.live_pack(model), self.recipe, cases, self.predict_config(), options, split="val"))
        model.train()
        return mean_dice(report)

    def calibrate(self, budget_s: float) -> tuple[int, int, int]:
        """(steps, validations, validation cases) that fit ``budget_s`` seconds, timed on a copy of the model.

        Validation gets at most ``VAL_SHARE`` of the budget: up to 10 validations on up to
        ``val_limit`` cases, fewer cases (not below 4) and then fewer validations (not below 2) when
        predicting is slow compared with training.
        """
        rng_state = torch.get_rng_state()
        model = copy.deepcopy(self.model)
        opt = make_optimizer(model, self.cfg.lr, self.cfg.weight_decay)
        probe = TrainSamples(self.dataset, self.cfg.seed + 7919)
        times = []
        for step in range(4):
            t = time.perf_counter()
            x, y = probe.batch(step, self.batch_size)
            self.train_step(model, opt, x, y)
            times.append(time.perf_counter() - t)
        step_s = float(np.median(times[1:]))
        probe_cases = self.val_quick[:2]
        t = time.perf_counter()
        self.validate(model, probe_cases)
        val_case_s = self.val_case_s = (time.perf_counter() - t) / max(1, len(probe_cases))
        torch.set_rng_state(rng_state)
        remaining = max(0.0, budget_s - self.elapsed())
        val_budget = VAL_SHARE * remaining
        n_val, k = 10, len(self.val_quick)
        if n_val * k * val_case_s > val_budget:
            k = max(min(4, k), int(val_budget / (n_val * val_case_s)))
        if n_val * k * val_case_s > val_budget:
            n_val = max(2, int(val_budget / (k * val_case_s)))
        steps = int(0.95 * (remaining - n_val * k * val_case_s) / step_s)
        return max(10, steps), n_val, k

    # ---------------------------------------------------------------- run
    def run(self, cancel: CancelToken | None) -> Job[TrainResult]:
        cfg = self.cfg
        self.t0 = time.perf_counter()
        self.elapsed_before = 0.0
        self.train_seconds = 0.0
        if self.ckpt_path.exists() and not (cfg.resume or cfg.fresh):
            raise UsageError(f"Run '{cfg.run_name}' already has a checkpoint ({self.ckpt_path}): add --resume to continue it, --fresh to start over, or choose another --run.")
        self.build()
        self.step, self.best_score, self.best_step, self.best_state, self.history = 0, -1.0, 0, None, []
        yield Progress(0, 1, "preparing")
        retime = False  # a --minutes run measures its real step time once, early, and fits its step count to it
        if cfg.resume and self.ckpt_path.exists():
            self.restore(torch.load(self.ckpt_path, map_location="cpu", weights_only=False))
        else:
            if cfg.steps:
                total = int(cfg.steps)
            elif cfg.epochs:
                total = int(math.ceil(cfg.epochs * len(self.train_cases) / self.batch_size))
            elif cfg.minutes:
                yield Progress(0, 1, "timing a few steps")
                total, self.n_val, n_cases = self.calibrate(cfg.minutes * 60.0)
                self.val_quick = evenly(self.val_quick, n_cases)
                retime = True
            else:
                raise UsageError("Say how long to train: give --steps, --epochs or --minutes.")
            self.make_scheduler(total)
        total = self.total
        val_every = max(1, int(cfg.val_every or math.ceil(total / self.n_val)))
        ckpt_every = max(1, int(cfg.ckpt_every or val_every))
        deadline = cfg.minutes * 60.0 if cfg.minutes else math.inf
        log = self.run_dir / "log.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.step == 0 and log.exists():
            log.unlink()  # a fresh start: the old run's log goes with its checkpoint
        losses: list[float] = []
        last_val = float("nan")
        stream = _batch_stream(self.samples, self.batch_size, self.step, total, self.workers, self.device.type == "cuda")
        t_train = time.perf_counter()
        steps_this_session = 0
        timed_s, timed_n = 0.0, 0
        retime_after_s = max(RETIME_MIN_S, RETIME_SHARE * deadline) if retime else math.inf
        try:
            while self.step < total:
                if cancel is not None and cancel.cancelled:
                    self.train_seconds += time.perf_counter() - t_train
                    _save(self.ckpt_path, self.checkpoint())
                    raise Cancelled(f"Training cancelled at step {self.step} of {total}; checkpoint saved in '{self.run_dir}': continue with --resume.")
                if self.elapsed() > deadline:
                    break
                t_it = time.perf_counter()
                x, y = next(stream)
                losses.append(self.train_step(self.model, self.optimizer, x, y, self.scheduler))
                self.step += 1
                steps_this_session += 1
                if steps_this_session > RETIME_SKIP:
                    timed_s, timed_n = timed_s + time.perf_counter() - t_it, timed_n + 1
                if timed_s >= retime_after_s and timed_n >= 20:
                    retime_after_s = math.inf
                    before = self.total
                    if self.retime(timed_s / timed_n, deadline) is not None:
                        total = self.total
                        val_every = max(1, int(cfg.val_every or math.ceil(total / self.n_val)))
                        ckpt_every = max(1, int(cfg.ckpt_every or val_every))
                        stream.close()
                        stream = _batch_stream(self.samples, self.batch_size, self.step, total, self.workers, self.device.type == "cuda")
                        yield Progress(self.step, total, f"re-timed on the real batch stream: {before} -> {total} steps")
                if not math.isfinite(losses[-1]):
                    raise UsageError(f"The loss became {losses[-1]} at step {self.step}: lower --lr (now {cfg.lr}) or check the data.")
                if self.step % val_every == 0 or self.step == total:
                    self.train_seconds += time.perf_counter() - t_train
                    last_val = self.validate(self.model, self.val_quick)
                    if last_val > self.best_score:
                        self.best_score, self.best_step, self.best_state = last_val, self.step, _state_copy(self.model)
                    entry = {"step": self.step, "loss": float(np.mean(losses[-val_every:])), "val_dice": last_val, "lr": self.scheduler.get_last_lr()[0], "elapsed_s": round(self.elapsed(), 2)}
                    self.history.append(entry)
                    with open(log, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(entry) + "\n")
                    t_train = time.perf_counter()
                if self.step % ckpt_every == 0 or self.step == total:
                    self.train_seconds += time.perf_counter() - t_train
                    _save(self.ckpt_path, self.checkpoint())
                    t_train = time.perf_counter()
                recent = float(np.mean(losses[-20:]))
                yield Progress(self.step, total, f"loss {recent:.3f} val {last_val:.3f} best {max(self.best_score, 0):.3f}")
        finally:
            stream.close()
        if self.step < total:  # stopped at the deadline: keep a resumable state
            self.train_seconds += time.perf_counter() - t_train
            last_val = self.validate(self.model, self.val_quick)
            if last_val > self.best_score:
                self.best_score, self.best_step, self.best_state = last_val, self.step, _state_copy(self.model)
            _save(self.ckpt_path, self.checkpoint())
        return (yield from self.finish())

    def finish(self) -> Job[TrainResult]:
        cfg, r = self.cfg, self.recipe
        best = self.best_state if self.best_state is not None and cfg.keep == "best" else _state_copy(self.model)
        model = self.new_model()
        model.load_state_dict(_fp16_round(best))
        model.eval()
        pack_id = cfg.pack_id or f"{Path(cfg.dataset).name}-{cfg.arch}-{cfg.config}"
        pack = self.live_pack(model.to(self.device), pack_id)
        report = None
        if cfg.final_eval:
            report = yield from self.final_report(pack)
        model.to("cpu")
        train_s = max(self.train_seconds, 1e-9)
        images = self.step * self.batch_size
        training = {
            "dataset": r.name,
            "data_folder": r.folder,
            "split_rule": r.split_rule,
            "train_cases": len(self.train_cases),
            "val_cases": len(self.val_cases),
            "steps": self.step,
            "epochs": round(images / max(1, len(self.train_cases)), 2),
            "batch_size": self.batch_size,
            "crop": self.crop,
            "mpp": r.mpp,
            "optimiser": f"AdamW (lr {cfg.lr}, weight decay {cfg.weight_decay}, none on 1-D parameters)",
            "schedule": f"linear warm-up {self.warmup_steps} steps, cosine to {cfg.min_lr_ratio} x lr",
            "loss": "cross-entropy + soft Dice (foreground classes, batch Dice)"
            + (f"; cross-entropy weighted 1 + {cfg.end_weight} x a Gaussian (sigma {cfg.end_radius} px) at the long-axis ends of class {cfg.end_class}" if cfg.end_weight > 0 else ""),
            "augmentation": self.augment_config.to_dict() if cfg.augment else None,
            "seed": cfg.seed,
            "best_step": self.best_step,
            **({"steps_calibrated": self.retimed_from} if getattr(self, "retimed_from", None) else {}),
            "best_val_dice_quick": round(self.best_score, 4),
            "seconds": round(self.elapsed(), 1),
            "steps_per_minute": round(60.0 * self.step / train_s, 2),
            "images_per_second": round(images / train_s, 3),
            "device": device_name(self.device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "amp": bool(self.device.type == "cuda" and cfg.amp) or bool(self.device.type == "cpu" and cfg.cpu_bf16),
            "config": {k: v for k, v in cfg.to_dict().items() if k not in ("command",)},
        }
        extra = {
            "title": f"{r.title} — {cfg.arch} ({cfg.config})",
            "task": "2-D semantic segmentation",
            "modality": r.modality,
            "training": training,
            "metrics": headline(report) if report else {},
            "licence": r.licence,
            "attribution": r.attribution,
            "command": cfg.command,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if cfg.arch_overrides:
            extra["overrides"] = dict(cfg.arch_overrides)
        if cfg.init_from:
            training["init_from"] = getattr(self, "init_info", {"pack": cfg.init_from})
        if cfg.encoder_init:
            training["encoder_init"] = getattr(self, "encoder_info", {"encoder": cfg.encoder_init})
        if r.min_object_area_um2:
            extra["postprocess"] = {"min_object_area_um2": r.min_object_area_um2}
        out = Path(cfg.out) if cfg.out else self.run_dir / "pack"
        pack.model = model
        path = save_pack(pack, out, dtype=torch.float16, extra=extra)
        return TrainResult(
            pack_path=path,
            run_dir=self.run_dir,
            steps=self.step,
            best_step=self.best_step,
            best_score=self.best_score,
            seconds=self.elapsed(),
            train_seconds=self.train_seconds,
            steps_per_minute=training["steps_per_minute"],
            images_per_second=training["images_per_second"],
            history=self.history,
            report=report,
            model=model,
        )


def init_from_pack(model: nn.Module, name: str) -> dict[str, Any]:
    """Copy a pack's weights into ``model`` where keys and shapes match; refuse when nothing matches."""
    from medseg.models.blocks import load_matching_state_dict

    source = load_pack(name)
    loaded, skipped = load_matching_state_dict(model, source.model.state_dict())
    if not loaded:
        raise UsageError(f"Pack '{name}' ({source.architecture}/{source.config}) shares no weights with this network: start from a pack of the same architecture.")
    return {"pack": source.id, "sha256": source.sha256, "loaded_tensors": len(loaded), "skipped_tensors": len(skipped)}


def _relay(job: Job, label: str) -> Job:
    """Re-yield a sub-job's progress under a label; return its result."""
    while True:
        try:
            ev = next(job)
        except StopIteration as stop:
            return stop.value
        yield Progress(ev.done, ev.total, f"{label}: {ev.message}")


def train_iter(config: TrainConfig, cancel: CancelToken | None = None) -> Job[TrainResult]:
    """Generator: yields :class:`Progress` per step, returns the :class:`TrainResult` (pack written).

    Deterministic algorithms are switched on for the run (CPU) and back to what they were after it.
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if config.interactive:
        from medseg.train.interactive import InteractiveTrainer

        trainer: _Trainer = InteractiveTrainer(config)
    else:
        trainer = _Trainer(config)
    try:
        return (yield from trainer.run(cancel))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def train(config: TrainConfig) -> TrainResult:
    return run_sync(train_iter(config))


__all__ = ["TrainConfig", "TrainResult", "make_optimizer", "train", "train_iter", "warmup_cosine"]
