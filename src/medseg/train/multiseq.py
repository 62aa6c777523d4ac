"""Training and evaluation for multi-sequence cardiac MRI with missing sequences (MyoPS, spec §5).

One loop (a generator yielding :class:`Progress`, resumable from ``<workdir>/<run>/ckpt.pt``) trains
either **DMAF-Net** with its full objective or a **plain network on the concatenated sequences**
(absent ones zero-filled) as the baseline, on the same data stream, missing-sequence draws and step
budget.

Data (§5.2, MyoPS protocol [choice]): 2-D short-axis slices of the training subjects of
``myops/split.json`` (the validation subjects never enter training); each sequence z-scored per slice
and resampled to ``spacing_mm`` (1.5) in-plane, padded or cropped to ``size`` (128) around the centre;
labels 0/200/500/600/1220/2221 -> class indices 0..5 (area vote when shrinking). Augmentation:
``medseg.train.augment.random_crop`` (flips, 90-degree turns, +-15 degrees, zoom 0.9-1.1: subjects come in
different in-plane orientations, see the data README) and a per-sequence intensity scale/shift.

Missing sequences: each sample gets an availability pattern drawn with imbalanced absence rates
(default C0 0.6, LGE 0.2, T2 0.4; an empty draw is redrawn), per step (``sampling="draw"``) or fixed per
training subject by PASSION's "i.i.d.-expected" allocation (``sampling="fixed"``, §5.2). DMAF-Net
always also sees the complete input, as the teacher.

DMAF-Net objective per step (§5.5-5.8; ``L_seg`` = :class:`medseg.train.losses.DiceCELoss`, the
project's CE + soft Dice, in place of PASSION's weighted CE + Dice):

* fused prediction of the incomplete input and of the complete input, each with deep supervision
  ``sum_s 2^-s L_seg``;
* unimodal (shared decoder) ``sum_m delta_m r_m beta_m w_m L_seg(z^m)``;
* relation distillation, teacher = the fused deepest features of the complete input (stop-gradient):
  covariance consistency + masked graph attention alignment for the fused features of the incomplete
  input and for each present sequence's features (through ``W_c``), weighted ``beta_m w_m``, x 0.5;
* prototype distillation (masked average pooling on the deepest grid) for the same students, weighted
  ``r_m w_m``, x 0.1.

Dynamic Training Monitoring (§5.7, :class:`TrainingMonitor`): per-step gaps ``g_m`` (the sequence's
distillation losses, detached) with an EMA, the relative preference gate ``r_m``, availability
compensation ``w_m = 1 / P(m present)``, per-epoch loss weights ``beta`` and per-step gradient scaling
of each sequence's encoder ``k_m = 1 - tanh(alpha max(0, s_m - 1))`` (fast-converging sequences slowed).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg import models
from medseg.engine.devices import device_name, resolve_device
from medseg.engine.progress import CancelToken, Job, Progress, run_sync
from medseg.errors import Cancelled, InputError, UsageError
from medseg.models.dmafnet import (
    DMAFNet,
    as_tokens,
    attention_alignment_loss,
    covariance_loss,
    prototype_loss,
    soft_class_masks,
)
from medseg.multiseq import DEFAULT_SPACING_MM, SEQUENCES, model_grid, prepare_slice, segment_study_iter, study_from_arrays
from medseg.resample import resample_mask
from medseg.train.augment import AugmentConfig, random_crop
from medseg.train.loop import make_optimizer, seed_everything, warmup_cosine
from medseg.train.losses import DiceCELoss
from medseg.train.packs import ClassInfo, Pack, save_pack

MYOPS_CLASSES = [
    ClassInfo(0, "background", "#000000"),
    ClassInfo(200, "LV normal myocardium", "#3cb44b"),
    ClassInfo(500, "LV blood pool", "#e6194b"),
    ClassInfo(600, "RV blood pool", "#4363d8"),
    ClassInfo(1220, "LV myocardial oedema", "#ffe119"),
    ClassInfo(2221, "LV myocardial scar", "#f032e6"),
]
MYOPS_FILES = {"C0": "C0.nii.gz", "LGE": "DE.nii.gz", "T2": "T2.nii.gz"}
# Dice regions reported (label values that make each region)
REGIONS = {
    "scar": (2221,),
    "scar+oedema": (1220, 2221),
    "LV myocardium": (200, 1220, 2221),
    "LV blood pool": (500,),
    "RV blood pool": (600,),
}
AUGMENT = AugmentConfig(hflip=True, vflip=True, rot90=True, rotate_deg=15.0, scale=(0.9, 1.1))
CHECKPOINT = "ckpt.pt"


@dataclass
class MultiseqConfig:
    """Everything a multi-sequence training run depends on (a JSON file holds the same keys)."""

    data_root: str | None = None  # the myops folder (default $MEDSEG_DATA/myops)
    arch: str = "dmafnet"  # or a plain network ("unet") on the zero-filled concatenation
    config: str = "small"
    steps: int = 400
    minutes: float | None = None  # stop (resumable) after this much time in this session
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05
    min_lr_ratio: float = 0.01
    grad_clip: float | None = 5.0
    size: int = 128
    spacing_mm: float = DEFAULT_SPACING_MM
    absent_rates: dict[str, float] = field(default_factory=lambda: {"C0": 0.6, "LGE": 0.2, "T2": 0.4})
    sampling: str = "draw"  # "draw": a pattern per sample per step; "fixed": one per subject (PASSION idt)
    lambda_rel: float = 0.5
    lambda_proto: float = 0.1
    monitor: bool = True  # Dynamic Training Monitoring (loss re-weighting and gradient scaling)
    alpha: float = 0.5
    ema: float = 0.9
    seed: int = 1037
    threads: int | None = 1
    device: str = "auto"  # auto (a CUDA GPU when there is one), cpu, cuda[:n] or mps
    ckpt_every: int = 25
    workdir: str = "work/multiseq"
    run: str | None = None
    resume: bool = False
    fresh: bool = False
    out: str | None = None
    pack_id: str = "cardiac-myops"
    train_limit: int | None = None  # use only this many training subjects (tests)
    evaluate: bool = True
    stop_early: bool = False  # with resume: export the checkpoint's weights now, before the schedule ends
    init_from: str | None = None  # start from a pack of the same architecture (a further schedule: warm restart)
    command: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MultiseqConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UsageError(f"Unknown option(s) {', '.join(unknown)} for multi-sequence training.")
        return cls(**d)

    @property
    def run_name(self) -> str:
        return self.run or f"myops-{self.arch}-{self.config}"

    @property
    def root(self) -> Path:
        if self.data_root:
            return Path(self.data_root)
        return Path(os.environ.get("MEDSEG_DATA", "../shared/data")) / "myops"


# --------------------------------------------------------------------------- data
def read_split(root: Path) -> dict[str, list[int]]:
    path = root / "split.json"
    if not path.is_file():
        raise InputError(f"'{path}' is missing: point data_root (or MEDSEG_DATA) at the MyoPS folder with split.json.")
    split = json.loads(path.read_text(encoding="utf-8"))
    return {"train": [int(s) for s in split["training"]], "val": [int(s) for s in split["validation"]]}


def read_subject(root: Path, subject: int) -> tuple[dict[str, Any], np.ndarray]:
    """The NIfTI volumes of one subject (``{"C0": NiftiVolume, ...}``) and its label volume (values)."""
    from medseg.io.nifti import read_nifti

    folder = root / f"subject_{subject}"
    vols = {s: read_nifti(folder / f) for s, f in MYOPS_FILES.items()}
    return vols, read_nifti(folder / "gd.nii.gz").array


def value_to_index(labels: np.ndarray, classes: list[ClassInfo] = MYOPS_CLASSES) -> np.ndarray:
    out = np.zeros(labels.shape, np.int64)
    for i, c in enumerate(classes):
        out[labels == c.value] = i
    return out


def centre_fit(x: np.ndarray, size: int) -> np.ndarray:
    """Pad (zeros) or crop the last two axes to ``size`` around the centre."""
    for axis in (-2, -1):
        n = x.shape[axis]
        if n > size:
            start = (n - size) // 2
            x = np.take(x, range(start, start + size), axis=axis)
        elif n < size:
            before = (size - n) // 2
            pad = [(0, 0)] * x.ndim
            pad[axis] = (before, size - n - before)
            x = np.pad(x, pad)
    return x


@dataclass
class SliceSet:
    """Training slices on the network grid: images (N, M, S, S) float32, labels (N, S, S), subject per slice."""

    images: np.ndarray
    labels: np.ndarray
    subjects: np.ndarray


def load_slices(root: Path, subjects: list[int], size: int, spacing_mm: float) -> SliceSet:
    images, labels, owners = [], [], []
    for subject in subjects:
        vols, gd = read_subject(root, subject)
        ref = vols["C0"]
        sp = (ref.spacing[0], ref.spacing[1])
        target = index = None
        for k in range(gd.shape[2]):
            stack = np.stack([prepare_slice(vols[s].array[:, :, k], sp, spacing_mm) for s in SEQUENCES])
            target = model_grid(gd.shape[:2], sp, spacing_mm)
            index = resample_mask(value_to_index(gd[:, :, k]), target, len(MYOPS_CLASSES))
            images.append(centre_fit(stack, size))
            labels.append(centre_fit(index, size))
            owners.append(subject)
    return SliceSet(np.stack(images).astype(np.float32), np.stack(labels).astype(np.int64), np.asarray(owners))


# --------------------------------------------------------------------------- missing-sequence patterns
def subset_probability(subset: tuple[bool, ...], rates: list[float]) -> float:
    return float(np.prod([(1 - p) if on else p for on, p in zip(subset, rates)]))


def presence_probability(rates: list[float]) -> np.ndarray:
    """P(sequence m present) under independent absence draws with empty draws redrawn."""
    empty = float(np.prod(rates))
    return np.array([(1 - p) / (1 - empty) for p in rates])


def draw_patterns(rng: np.random.Generator, n: int, rates: list[float]) -> np.ndarray:
    """``n`` availability patterns (n, M) with independent absence rates; an empty draw is redrawn."""
    out = np.zeros((n, len(rates)), bool)
    for i in range(n):
        while not out[i].any():
            out[i] = rng.random(len(rates)) >= np.asarray(rates)
    return out


def fixed_allocation(n: int, rates: list[float], seed: int) -> np.ndarray:
    """PASSION's "i.i.d.-expected" allocation (§5.2): one fixed pattern per case, shuffled."""
    rng = np.random.default_rng(seed)
    m = len(rates)
    subsets = [s for s in itertools.product([False, True], repeat=m) if any(s)]
    rows: list[tuple[bool, ...]] = []
    for s in subsets:
        rows.extend([s] * max(1, int(math.floor(n * subset_probability(s, rates)))))
    rows = rows[:n]
    while len(rows) < n:
        rows.append(tuple(draw_patterns(rng, 1, rates)[0]))
    out = np.array(rows, bool)
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- Dynamic Training Monitoring
class TrainingMonitor:
    """Gap tracking, relative preference gate, availability compensation, loss weights and gradient scaling (§5.7)."""

    def __init__(self, rates: list[float], ema: float = 0.9, alpha: float = 0.5, enabled: bool = True) -> None:
        self.m = len(rates)
        self.ema, self.alpha, self.enabled = ema, alpha, enabled
        self.gap = np.full(self.m, np.nan)  # EMA of the distillation gaps
        self.beta = np.ones(self.m)
        self.availability = 1.0 / presence_probability(rates)  # w_m = N_train / N_m in expectation
        self.epoch = 0

    def eta(self) -> float:
        return 0.01 * 1.5 ** sum(self.epoch >= e for e in (0, 100, 200))

    def observe(self, gaps: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """Update the EMA with this step's gaps (sequences in ``seen``); return the gate ``r_m``."""
        for i in np.flatnonzero(seen):
            self.gap[i] = gaps[i] if np.isnan(self.gap[i]) else self.ema * self.gap[i] + (1 - self.ema) * gaps[i]
        gate = np.zeros(self.m)
        if seen.any():
            mean = gaps[seen].mean()
            rho = gaps / max(mean, 1e-12) - 1.0
            gate[seen] = (rho[seen] > 0).astype(float)
        if not self.enabled:
            gate[:] = 1.0
        return gate

    def end_epoch(self) -> None:
        """``beta <- clip(beta - eta rp, 0.1, 4)`` rescaled to norm sqrt(M), ``rp_m = (mean gap - gap_m) / mean gap``."""
        if self.enabled and not np.isnan(self.gap).any():
            mean = self.gap.mean()
            rp = (mean - self.gap) / max(mean, 1e-12)
            beta = np.clip(self.beta - self.eta() * rp, 0.1, 4.0)
            self.beta = beta * math.sqrt(self.m) / np.linalg.norm(beta)
        self.epoch += 1

    def gradient_scales(self, weights: np.ndarray | None = None) -> np.ndarray:
        """``k_m = 1 - tanh(alpha max(0, s_m - 1))`` with ``s_m`` the relative convergence speed (x fusion weight)."""
        if not self.enabled or np.isnan(self.gap).any():
            return np.ones(self.m)
        inv = 1.0 / np.maximum(self.gap, 1e-12)
        s = inv / inv.mean()
        if weights is not None:
            s = s * weights / max(weights.mean(), 1e-12)
        return 1.0 - np.tanh(self.alpha * np.maximum(0.0, s - 1.0))

    def state_dict(self) -> dict[str, Any]:
        return {"gap": self.gap.tolist(), "beta": self.beta.tolist(), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gap, self.beta, self.epoch = np.array(state["gap"], float), np.array(state["beta"], float), int(state["epoch"])


# --------------------------------------------------------------------------- losses
def deep_supervision(loss_fn: nn.Module, deep: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """``sum_s 2^-s L_seg(up(p_s), Y)``: s = 1 for the shallowest deep output, larger s for deeper ones."""
    total = target.new_zeros((), dtype=torch.float32)
    for s, logits in enumerate(reversed(deep), start=1):
        up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        total = total + 2.0**-s * loss_fn(up, target)
    return total


@dataclass
class StepLosses:
    total: torch.Tensor
    parts: dict[str, float]
    gaps: np.ndarray
    seen: np.ndarray


def dmaf_losses(model: DMAFNet, x: torch.Tensor, y: torch.Tensor, present: torch.Tensor, monitor: TrainingMonitor,
                loss_fn: nn.Module, lambda_rel: float, lambda_proto: float) -> tuple[StepLosses, np.ndarray]:
    """The full DMAF-Net objective for one batch; returns the losses and the fusion weights ``omega_L``."""
    complete = torch.ones_like(present)
    feats = model.encode(x, complete)
    teacher = model.fuse(feats, complete)
    student = model.fuse(model.drop(feats, present), present)
    seg = loss_fn(student.logits, y) + deep_supervision(loss_fn, student.deep, y)
    seg_teacher = loss_fn(teacher.logits, y) + deep_supervision(loss_fn, teacher.deep, y)

    t_map = teacher.fused[-1]
    grid = t_map.shape[-2:]
    t_tok = as_tokens(t_map)
    masks = soft_class_masks(y, model.num_classes, grid)
    rel_head = model.relation

    def relation(student_map: torch.Tensor, project: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tok = as_tokens(student_map)
        if project:
            tok = rel_head.project(tok)
        cov = covariance_loss(tok, t_tok)
        att = attention_alignment_loss(rel_head.graph_attention(tok, t_tok, grid), t_tok)
        return cov + att, cov

    fused_rel, _ = relation(student.fused[-1], project=False)
    fused_proto = prototype_loss(student.fused[-1], t_map, masks)
    rel_total = fused_rel.mean()
    proto_total = fused_proto.mean()

    m = model.modalities
    gaps, seen = np.zeros(m), present.any(dim=0).cpu().numpy()
    per_seq: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for i in range(m):
        mask = present[:, i]
        if not bool(mask.any()):
            per_seq.append((x.new_zeros(()), x.new_zeros(()), mask))
            continue
        deepest = feats[i][-1]
        rel_i, _ = relation(deepest, project=True)
        projected = rel_head.project(as_tokens(deepest)).transpose(1, 2).reshape_as(deepest)
        proto_i = prototype_loss(projected, t_map, masks)
        gaps[i] = float((rel_i[mask] + proto_i[mask]).mean().detach())
        per_seq.append((rel_i, proto_i, mask))
    gate = monitor.observe(gaps, seen)
    uni_total = x.new_zeros(())
    for i, (rel_i, proto_i, mask) in enumerate(per_seq):
        if not bool(mask.any()):
            continue
        w, beta, share = monitor.availability[i], monitor.beta[i], mask.float()
        rel_total = rel_total + beta * w * (rel_i * share).mean()
        proto_total = proto_total + gate[i] * w * (proto_i * share).mean()
        if gate[i] > 0:  # the shared decoder on this sequence, for the samples that have it
            uni_total = uni_total + beta * w * loss_fn(model.unimodal([f[mask] for f in feats[i]]), y[mask]) * share.mean()
    total = seg + seg_teacher + uni_total + lambda_rel * rel_total + lambda_proto * proto_total
    parts = {"seg": float(seg.detach()), "teacher": float(seg_teacher.detach()), "unimodal": float(uni_total.detach()),
             "relation": float(rel_total.detach()), "prototype": float(proto_total.detach())}
    return StepLosses(total, parts, gaps, seen), student.weights.detach().mean(dim=0).cpu().numpy()


# --------------------------------------------------------------------------- the loop
class _Run:
    def __init__(self, cfg: MultiseqConfig) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        if cfg.arch != "dmafnet" and cfg.arch not in models.names():
            raise UsageError(f"Unknown architecture '{cfg.arch}': use dmafnet or one of {', '.join(models.names())}.")
        self.rates = [float(cfg.absent_rates[s]) for s in SEQUENCES]
        if any(not 0 <= p < 1 for p in self.rates):
            raise UsageError(f"Absence rates must lie in [0, 1): got {cfg.absent_rates}.")
        self.split = read_split(cfg.root)
        train = self.split["train"][: cfg.train_limit] if cfg.train_limit else self.split["train"]
        if set(train) & set(self.split["val"]):
            raise UsageError("A validation subject is listed for training: fix split.json.")
        self.train_subjects = train
        self.data = load_slices(cfg.root, train, cfg.size, cfg.spacing_mm)
        self.fixed = fixed_allocation(len(train), self.rates, cfg.seed) if cfg.sampling == "fixed" else None
        if cfg.sampling not in ("draw", "fixed"):
            raise UsageError(f"sampling must be 'draw' or 'fixed', not '{cfg.sampling}'.")
        self.loss_fn = DiceCELoss()
        self.monitor = TrainingMonitor(self.rates, cfg.ema, cfg.alpha, cfg.monitor and cfg.arch == "dmafnet")
        self.steps_per_epoch = max(1, math.ceil(len(self.data.labels) / cfg.batch_size))
        self.run_dir = Path(cfg.workdir) / cfg.run_name
        self.ckpt_path = self.run_dir / CHECKPOINT
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def build(self) -> nn.Module:
        seed_everything(self.cfg.seed, True, self.device)
        model = models.build(self.cfg.arch, in_channels=len(SEQUENCES), num_classes=len(MYOPS_CLASSES), config=self.cfg.config)
        return model.to(self.device)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch of ``step``: a pure function of (seed, step), so a resumed run equals an uninterrupted one."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.integers(len(self.data.labels), size=cfg.batch_size)
        xs, ys = [], []
        for i in idx:
            img, lab = random_crop(self.data.images[i].transpose(1, 2, 0), self.data.labels[i], cfg.size, AUGMENT, rng)
            img = img * rng.uniform(0.9, 1.1, 3).astype(np.float32) + rng.uniform(-0.1, 0.1, 3).astype(np.float32)
            xs.append(img.transpose(2, 0, 1))
            ys.append(lab)
        if self.fixed is not None:
            owner = {s: j for j, s in enumerate(self.train_subjects)}
            present = self.fixed[[owner[int(self.data.subjects[i])] for i in idx]]
        else:
            present = draw_patterns(rng, cfg.batch_size, self.rates)
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), torch.from_numpy(present)

    def step(self, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, present: torch.Tensor) -> dict[str, float]:
        model.train()
        x, y, present = x.to(self.device), y.to(self.device), present.to(self.device)
        opt.zero_grad(set_to_none=True)
        weights = None
        if isinstance(model, DMAFNet):
            losses, weights = dmaf_losses(model, x, y, present, self.monitor, self.loss_fn, self.cfg.lambda_rel, self.cfg.lambda_proto)
            loss, parts = losses.total, losses.parts
        else:
            from medseg.multiseq import network_logits

            loss = self.loss_fn(network_logits(model, x, present), y)
            parts = {"seg": float(loss.detach())}
        loss.backward()
        if isinstance(model, DMAFNet):
            scales = self.monitor.gradient_scales(weights)
            for k, encoder in zip(scales, model.encoders):
                if k != 1.0:
                    for p in encoder.parameters():
                        if p.grad is not None:
                            p.grad.mul_(float(k))
            parts["k"] = [round(float(k), 3) for k in scales]  # type: ignore[assignment]
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
        opt.step()
        parts["loss"] = float(loss.detach())
        return parts

    def run(self, cancel: CancelToken | None) -> Job["MultiseqTrainResult"]:
        cfg = self.cfg
        if self.ckpt_path.exists() and not (cfg.resume or cfg.fresh):
            raise UsageError(f"Run '{cfg.run_name}' already has a checkpoint ({self.ckpt_path}): resume it, start fresh, or choose another run name.")
        model = self.build()
        opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps, max(1, int(cfg.warmup * cfg.steps)), cfg.min_lr_ratio))
        step, elapsed_before, history = 0, 0.0, []
        if cfg.init_from:
            from medseg.train.packs import load_pack

            source = load_pack(cfg.init_from)
            if source.architecture != cfg.arch:
                raise UsageError(f"Pack '{cfg.init_from}' is a {source.architecture}, not a {cfg.arch}: start from a pack of the same architecture.")
            model.load_state_dict(source.model.state_dict())
            earlier = source.manifest.get("training", {})
            self.init_info = {"pack": str(cfg.init_from), "sha256": source.sha256, "steps": earlier.get("steps"),
                              "command": source.manifest.get("command"), "init_from": earlier.get("init_from")}
        if cfg.resume and self.ckpt_path.exists():
            ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            if ckpt["arch"] != cfg.arch or ckpt["steps"] != cfg.steps:
                raise UsageError(f"The checkpoint in '{self.run_dir}' is of {ckpt['arch']} with {ckpt['steps']} steps: resume with the same settings.")
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            self.monitor.load_state_dict(ckpt["monitor"])
            torch.set_rng_state(ckpt["torch_rng"])
            step, elapsed_before, history = int(ckpt["step"]), float(ckpt["elapsed"]), list(ckpt["history"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if step == 0 and (self.run_dir / "log.jsonl").exists():
            (self.run_dir / "log.jsonl").unlink()  # a fresh start: the old run's log goes with its checkpoint
        t0 = time.perf_counter()
        deadline = cfg.minutes * 60.0 if cfg.minutes else math.inf

        def save() -> None:
            from medseg.io.atomic import atomic_path

            state = {"arch": cfg.arch, "steps": cfg.steps, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "monitor": self.monitor.state_dict(), "torch_rng": torch.get_rng_state(),
                     "elapsed": elapsed_before + time.perf_counter() - t0, "history": history, "config": asdict(cfg)}
            with atomic_path(self.ckpt_path) as tmp:
                torch.save(state, tmp)

        recent: list[float] = []
        while step < cfg.steps and not cfg.stop_early:
            if cancel is not None and cancel.cancelled:
                save()
                raise Cancelled(f"Training cancelled at step {step} of {cfg.steps}; checkpoint saved in '{self.run_dir}': resume it to continue.")
            if time.perf_counter() - t0 > deadline:
                save()
                return None
            x, y, present = self.batch(step)
            parts = self.step(model, opt, x, y, present)
            sched.step()
            step += 1
            if not math.isfinite(parts["loss"]):
                raise UsageError(f"The loss became {parts['loss']} at step {step}: lower the learning rate (now {cfg.lr}).")
            recent.append(parts["loss"])
            if step % self.steps_per_epoch == 0:
                self.monitor.end_epoch()
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                entry = {"step": step, "loss": float(np.mean(recent)), "beta": [round(b, 3) for b in self.monitor.beta],
                         "gap": [None if np.isnan(g) else round(float(g), 4) for g in self.monitor.gap], "elapsed_s": round(elapsed_before + time.perf_counter() - t0, 1),
                         **{k: v for k, v in parts.items() if k != "loss"}}
                history.append(entry)
                with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(entry) + "\n")
                recent = []
                save()
            yield Progress(step, cfg.steps, f"loss {parts['loss']:.3f}")
        seconds = elapsed_before + time.perf_counter() - t0
        return (yield from self.finish(model, step, seconds, history))

    def finish(self, model: nn.Module, step: int, seconds: float, history: list) -> Job["MultiseqTrainResult"]:
        cfg = self.cfg
        model = model.eval()
        state = {k: (v.half().float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        model.load_state_dict(state)  # what the pack stores (fp16)
        pack = Pack(cfg.pack_id, model, cfg.arch, cfg.config, len(SEQUENCES), list(MYOPS_CLASSES))
        extra = {
            "title": "Myocardial pathology from multi-sequence cardiac MRI (MyoPS) — " + ("DMAF-Net" if cfg.arch == "dmafnet" else f"{cfg.arch} on the zero-filled concatenation"),
            "task": "2-D segmentation of short-axis slices from any non-empty subset of C0 / LGE / T2",
            "modality": "cardiac MRI",
            "sequences": list(SEQUENCES),
            "input": "DMAF-Net with an availability mask" if cfg.arch == "dmafnet" else "concatenated sequences, absent ones zero-filled",
            "spacing_mm": cfg.spacing_mm,
            "normalisation_note": "each sequence z-scored per slice",
            "training": {
                "data": "MyoPS 2020 labelled subjects (../shared/data/myops)",
                "train_subjects": self.train_subjects,
                "validation_subjects": self.split["val"],
                "slices": int(len(self.data.labels)),
                "augmentation": AUGMENT.to_dict(),
                "steps": step,
                "epochs": round(step * cfg.batch_size / len(self.data.labels), 1),
                "seconds": round(seconds, 1),
                "threads": torch.get_num_threads(),
                "device": device_name(self.device),
                "init_from": getattr(self, "init_info", None),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "config": {k: v for k, v in asdict(cfg).items() if k != "command"},
            },
            "licence": "MyoPS 2020 data: research use only, with citation (no open licence); the weights were trained on it",
            "attribution": "X. Zhuang, MyoPS 2020 (zmiclab.github.io/zxh/0/myops20/); Lan et al., DMAF-Net, arXiv:2506.11691",
            "command": cfg.command,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        out = Path(cfg.out) if cfg.out else self.run_dir / "pack"
        report = None
        if cfg.evaluate:
            report = yield from evaluate_subsets_iter(pack, cfg.root, self.split["val"], extra, device=str(self.device))
            extra["metrics"] = {"validation": report["summary"]}
        pack.model.to("cpu")
        pack.manifest.update(extra)
        path = save_pack(pack, out, dtype=torch.float16, extra=extra)
        return MultiseqTrainResult(path, step, seconds, history, report)


@dataclass
class MultiseqTrainResult:
    pack_path: Path
    steps: int
    seconds: float
    history: list
    report: dict[str, Any] | None


# --------------------------------------------------------------------------- evaluation over the 7 subsets
def subsets(sequences: tuple[str, ...] = SEQUENCES) -> list[tuple[str, ...]]:
    """Every non-empty subset, largest first (all three, then the three pairs, then singles)."""
    out = [c for r in range(len(sequences), 0, -1) for c in itertools.combinations(sequences, r)]
    return out


def region_dice(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    from medseg.metrics import dice

    return {name: dice(np.isin(pred, values), np.isin(ref, values)) for name, values in REGIONS.items()}


def evaluate_subsets_iter(pack: Pack, root: Path, subjects: list[int], manifest_extra: dict[str, Any] | None = None,
                          device: str = "cpu", tta: bool = False) -> Job[dict[str, Any]]:
    """Dice per region, per subject (3-D, on the original grid) and per sequence subset, through the user path."""
    if manifest_extra:
        pack.manifest.update(manifest_extra)
    cases = [(subj, *read_subject(root, subj)) for subj in subjects]
    rows: dict[str, dict[str, Any]] = {}
    combos = subsets()
    total, done = len(combos) * len(cases), 0
    for combo in combos:
        per_subject = {}
        for subj, vols, gd in cases:
            ref = next(iter(vols.values()))
            study = study_from_arrays({s: vols[s].array for s in combo}, ref.spacing, affine=ref.affine)
            result = run_sync(segment_study_iter(study, pack, device, tta=tta))
            per_subject[subj] = region_dice(result.labels, gd)
            done += 1
            yield Progress(done, total, f"{'+'.join(combo)} subject {subj}")
        key = "+".join(combo)
        rows[key] = {
            "per_subject": per_subject,
            "mean": {r: float(np.mean([d[r] for d in per_subject.values()])) for r in REGIONS},
            "std": {r: float(np.std([d[r] for d in per_subject.values()])) for r in REGIONS},
        }
    summary = {key: {r: round(v, 4) for r, v in row["mean"].items()} for key, row in rows.items()}
    return {"pack": pack.id, "architecture": pack.architecture, "subjects": subjects, "subsets": rows, "summary": summary}


def train_iter(cfg: MultiseqConfig, cancel: CancelToken | None = None) -> Job[MultiseqTrainResult | None]:
    """Generator: train (or resume) a run; returns the result, or ``None`` when stopped at ``minutes`` (resumable)."""
    was = torch.are_deterministic_algorithms_enabled()
    try:
        return (yield from _Run(cfg).run(cancel))
    finally:
        torch.use_deterministic_algorithms(was)


def main(argv: list[str] | None = None) -> int:
    """``python -m medseg.train.multiseq --arch dmafnet --steps 400 --minutes 14 --run NAME [--resume]``."""
    import argparse
    import shlex
    import sys

    from medseg.cli import drive

    p = argparse.ArgumentParser(prog="python -m medseg.train.multiseq", description="Train DMAF-Net or the zero-filled baseline on MyoPS.")
    p.add_argument("--arch", default="dmafnet")
    p.add_argument("--config", default="small")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--minutes", type=float)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--sampling", default="draw", choices=["draw", "fixed"])
    p.add_argument("--no-monitor", action="store_true", help="switch off Dynamic Training Monitoring")
    p.add_argument("--workdir", default="work/multiseq")
    p.add_argument("--run")
    p.add_argument("--out")
    p.add_argument("--pack-id", default="cardiac-myops")
    p.add_argument("--data-root")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one; default), cpu, cuda[:n] or mps")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--stop-early", action="store_true", help="with --resume: write the pack from the checkpoint now")
    p.add_argument("--init-from", help="start from this pack's weights (same architecture) with a new schedule")
    p.add_argument("--seed", type=int, default=1037)
    args = p.parse_args(argv)
    if args.stop_early and not args.resume:
        p.error("--stop-early needs --resume")
    cfg = MultiseqConfig(data_root=args.data_root, arch=args.arch, config=args.config, steps=args.steps, batch_size=args.batch_size,
                         minutes=args.minutes, lr=args.lr, sampling=args.sampling, monitor=not args.no_monitor, workdir=args.workdir,
                         run=args.run, out=args.out, pack_id=args.pack_id, threads=args.threads, device=args.device, resume=args.resume, fresh=args.fresh,
                         stop_early=args.stop_early, init_from=args.init_from, seed=args.seed,
                         command="python -m medseg.train.multiseq " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    from medseg.errors import MedsegError

    try:
        result = drive(train_iter(cfg), desc=cfg.run_name, unit="step")
    except MedsegError as exc:
        print(f"medseg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if result is None:
        print(f"stopped at the time limit; continue with --resume (run '{cfg.run_name}')", file=sys.stderr)
        return 3
    print(json.dumps({"pack": str(result.pack_path), "steps": result.steps, "seconds": round(result.seconds, 1),
                      "validation": result.report["summary"] if result.report else None}, indent=1))
    return 0


__all__ = [
    "MYOPS_CLASSES",
    "MultiseqConfig",
    "MultiseqTrainResult",
    "REGIONS",
    "TrainingMonitor",
    "draw_patterns",
    "evaluate_subsets_iter",
    "fixed_allocation",
    "load_slices",
    "presence_probability",
    "region_dice",
    "subsets",
    "train_iter",
]

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
