"""TAP-SLF training on PSFHS: masked-image-modelling pre-training, then joint multi-task adaptation (spec §6).

Two stages, each a generator yielding :class:`~medseg.engine.Progress`, resumable from
``<workdir>/<run>/ckpt.pt`` (model, optimiser, scheduler, step, history; the data stream is a pure
function of (seed, sample index), as in :mod:`medseg.train.loop`):

1. :func:`pretrain_iter` — no foundation weights are available offline, so the ViT encoder is
   pre-trained by masked-image modelling (MAE: 75% of the 16x16 patches hidden, the encoder sees the
   rest, a 2-block decoder reconstructs the hidden patches' per-patch-normalised pixels) on the
   **PSFHS training split only** (never the validation or hold-out blocks), with the recipe's
   ultrasound augmentation. The result is ``encoder.pt``.
2. :func:`train_iter` — the encoder is loaded and frozen; prompts, LoRA (top 30% of the blocks),
   adapter, neck and heads train jointly on three PSFHS tasks derived from the reference masks:
   FH/PS **segmentation**, **plane classification** (:func:`medseg.measure.ultrasound.plane_class`
   of the mask) and **keypoint regression** of the three points that define the AoP (symphysis vertex
   V, its other end E, tangent point T, from :func:`medseg.measure.biometry.aop_hsd` of the mask).
   Task-homogeneous batches (one task per step, drawn with probability proportional to its
   samples: equal here), the spec's losses (Dice + focal + boundary CE; cross-entropy; SmoothL1
   beta 0.5), per-task weights (seg 2.0 with the 2 -> 1 epoch factor, cls 2.5, reg 3.0), one AdamW with
   the §6.8 learning-rate groups, linear warm-up then cosine (one cycle: the run is short), gradient
   clipping at 1.0. Nearly every PSFHS frame shows both structures, so a **probe-drift**
   augmentation (:func:`displace`) translates a third of the training crops by up to 45% of the frame
   (zero fill); the plane class and keypoints are then taken from the displaced mask, which gives
   the classifier "no head" / "no symphysis" examples. The final weights are written as a pack
   (fp16, architecture ``tapslf``) whose ``forward`` is the segmentation; :func:`predict_frame` runs
   all three heads.

``python -m medseg.train.multitask pretrain|train|evaluate ...`` runs a stage (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg import models
from medseg.engine.progress import CancelToken, Job, Progress, check_cancel, run_sync
from medseg.errors import UsageError
from medseg.io.atomic import atomic_path
from medseg.measure.biometry import aop_from_points, aop_hsd
from medseg.measure.ultrasound import PLANES, plane_class
from medseg.metrics import dice
from medseg.models.tapslf import TAPSLF, Block, trainable_fraction
from medseg.normalise import Normaliser
from medseg.train.datasets import SegmentationDataset, TrainSamples, read_case_image, read_mask
from medseg.train.loop import seed_everything, warmup_cosine
from medseg.train.losses import soft_dice_loss
from medseg.train.packs import Pack, save_pack
from medseg.train.recipes import get_recipe

CHECKPOINT = "ckpt.pt"
ENCODER = "encoder.pt"
KEYPOINTS = ("vertex", "other_end", "tangent")
TASKS = ("seg", "cls", "reg")


# --------------------------------------------------------------------------- targets from masks
def displace(x: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, max_shift: float = 0.45) -> tuple[np.ndarray, np.ndarray | None]:
    """Probe drift: translate an image (``(..., H, W)``: a normalised ``(C, H, W)`` crop or a raw frame) and its
    mask by up to ``max_shift`` of each side. Uncovered pixels take the image's minimum (the black outside the
    ultrasound fan) and background in the mask."""
    h, w = x.shape[-2:]
    dy, dx = (int(round(v)) for v in rng.uniform(-max_shift, max_shift, 2) * (h, w))
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out_x = np.full_like(x, x.min())
    out_x[..., yd, xd] = x[..., ys, xs]
    if mask is None:
        return out_x, None
    out_m = np.zeros_like(mask)
    out_m[yd, xd] = mask[ys, xs]
    return out_x, out_m


def keypoint_targets(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """The AoP key points (V, E, T) of a label map as normalised (x, y), ``(3, 2)``, and whether the AoP is measurable."""
    b = aop_hsd(mask)
    if not b.ok:
        return np.zeros((len(KEYPOINTS), 2), np.float32), False
    h, w = mask.shape
    pts = [b.vertex, b.other_end, b.tangent]
    return np.array([[c / w, r / h] for r, c in pts], np.float32), True


def plane_index(mask: np.ndarray) -> int:
    return PLANES.index(plane_class(mask))


def keypoints_to_rc(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Normalised (x, y) -> (row, col) pixels of a ``shape`` frame."""
    h, w = shape
    return np.stack([points[..., 1] * h, points[..., 0] * w], axis=-1)


# --------------------------------------------------------------------------- config
@dataclass
class MultitaskConfig:
    """Both stages' options; ``stage`` picks what :func:`run` does."""

    dataset: str = "psfhs"
    data_root: str | None = None
    config: str = "small"
    workdir: str = "work"
    run: str = "tapslf"
    encoder: str | None = None  # encoder.pt from the pre-training run (train stage)
    steps: int = 600
    max_minutes: float | None = 15.0  # stop (with a checkpoint) at this wall-clock budget per invocation
    batch_size: int = 8
    seed: int = 42
    threads: int | None = 1
    ckpt_every: int = 25
    warmup: float = 0.05
    # pre-training
    mask_ratio: float = 0.75
    mim_lr: float = 1e-3
    mim_decoder_dim: int = 96
    # adaptation (spec §6.8 groups)
    lr_adapt: float = 1e-4 * 5  # prompts, LoRA, adapter (x5 over the spec: a short run on a small encoder)
    lr_neck: float = 5e-4
    lr_seg_head: float = 1e-3
    lr_heads: float = 2.5e-4 * 4
    weight_decay: float = 0.01
    task_weights: dict[str, float] = field(default_factory=lambda: {"seg": 2.0, "cls": 2.5, "reg": 3.0})
    displace_p: float = 0.33
    overrides: dict[str, Any] = field(default_factory=dict)  # TAPSLF constructor flags (ablations)
    out: str | None = None  # pack folder (train stage)
    pack_id: str = "ultrasound-tapslf"
    command: str = ""

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) / self.run


def _dataset(cfg: MultitaskConfig, split: str = "train") -> tuple[Any, SegmentationDataset]:
    recipe = get_recipe(cfg.dataset)
    cases = recipe.cases(split, cfg.data_root)
    ds = SegmentationDataset(cases, recipe.in_channels, recipe.num_classes, Normaliser.from_spec(recipe.normalisation), recipe.crop, recipe.augment)
    return recipe, ds


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> tuple[int, list[dict[str, Any]]]:
    """Restore a run's checkpoint if there is one; returns (step, history), (0, []) for a fresh run."""
    if not path.is_file():
        return 0, []
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    return int(ckpt["step"]), list(ckpt["history"])


def checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: int, history: list[dict[str, Any]]) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "history": history}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    _save(path, state)


# --------------------------------------------------------------------------- stage 1: masked-image modelling
class MaskedAutoencoder(nn.Module):
    """MAE around a :class:`~medseg.models.tapslf.ViTEncoder`: 2-block decoder, per-patch normalised pixel targets."""

    def __init__(self, model: TAPSLF, decoder_dim: int = 96, decoder_depth: int = 2) -> None:
        super().__init__()
        self.encoder = model.encoder
        enc = self.encoder
        self.patch = enc.patch
        self.embed = nn.Linear(enc.dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.pos = nn.Parameter(torch.zeros(1, enc.grid * enc.grid, decoder_dim))
        self.blocks = nn.ModuleList([Block(decoder_dim, 4) for _ in range(decoder_depth)])
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.head = nn.Linear(decoder_dim, self.patch * self.patch)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def loss(self, x: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
        """Mean squared error on the hidden patches of a ``(B, 1, H, W)`` batch at the encoder's native grid."""
        b = x.shape[0]
        n = self.encoder.grid ** 2
        n_keep = max(1, int(round(n * (1 - ratio))))
        order = torch.argsort(torch.rand(b, n, generator=generator), dim=1)
        keep, hidden = order[:, :n_keep], order[:, n_keep:]
        z = self.embed(self.encoder.forward_visible(x.expand(-1, 3, -1, -1), keep))
        full = self.mask_token.expand(b, n, -1).clone()
        full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, z.shape[-1]), z)
        y = full + self.pos
        for blk in self.blocks:
            y = blk(y)
        pred = self.head(self.norm(y))
        target = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # (B, N, p*p)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        idx = hidden.unsqueeze(-1).expand(-1, -1, target.shape[-1])
        return F.mse_loss(torch.gather(pred, 1, idx), torch.gather(target, 1, idx))


def pretrain_iter(cfg: MultitaskConfig, cancel: CancelToken | None = None) -> Job[Path]:
    """Stage 1: MAE pre-training of the encoder on the training split; returns the path of ``encoder.pt``."""
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    seed_everything(cfg.seed, True, torch.device("cpu"))
    recipe, ds = _dataset(cfg)
    samples = TrainSamples(ds, cfg.seed)
    mae = MaskedAutoencoder(models.build("tapslf", recipe.in_channels, recipe.num_classes, cfg.config, **cfg.overrides), cfg.mim_decoder_dim)
    for p in mae.parameters():
        p.requires_grad = True
    opt = torch.optim.AdamW(mae.parameters(), lr=cfg.mim_lr, weight_decay=0.05, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps, max(1, int(cfg.warmup * cfg.steps)), 0.01))
    path = cfg.run_dir / CHECKPOINT
    step, history = resume(path, mae, opt, sched)
    t0 = time.perf_counter()
    running = []
    while step < cfg.steps:
        check_cancel(cancel)
        x, _ = samples.batch(step, cfg.batch_size)
        mae.train()
        loss = mae.loss(torch.from_numpy(x), cfg.mask_ratio, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(mae.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        running.append(loss.item())
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            history.append({"step": step, "loss": float(np.mean(running)), "seconds": time.perf_counter() - t0})
            running = []
            checkpoint(path, mae, opt, sched, step, history)
            yield Progress(step, cfg.steps, f"MIM loss {history[-1]['loss']:.4f}")
            if cfg.max_minutes and time.perf_counter() - t0 > cfg.max_minutes * 60 and step < cfg.steps:
                return path  # resumable: run again to continue
    out = cfg.run_dir / ENCODER
    _save(out, {"encoder": mae.encoder.state_dict(), "config": cfg.config, "overrides": cfg.overrides, "steps": step, "history": history,
                "data": f"{cfg.dataset} train split ({len(ds)} frames)", "command": cfg.command})
    return out


# --------------------------------------------------------------------------- stage 2: joint adaptation
def seg_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Dice (all classes) + per-pixel focal + boundary-weighted CE (spec §6.7)."""
    d = soft_dice_loss(logits, target, include_background=True)
    logp = F.log_softmax(logits.float(), dim=1)
    logp_t = logp.gather(1, target.unsqueeze(1)).squeeze(1)
    focal = (-(1 - logp_t.exp()) ** gamma * logp_t).mean()
    t = target.float().unsqueeze(1)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx = F.conv2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), sobel.view(1, 1, 3, 3))
    gy = F.conv2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), sobel.t().reshape(1, 1, 3, 3))
    edge = (gx.abs() + gy.abs()).clamp(0, 1).squeeze(1)
    boundary = (-logp_t * edge).sum() / target.numel()
    return d + focal + boundary


class MultitaskSamples:
    """Training sample ``k`` for a task: augmented crop (:class:`TrainSamples`), probe drift, targets from the mask."""

    def __init__(self, samples: TrainSamples, seed: int, displace_p: float) -> None:
        self.samples, self.seed, self.displace_p = samples, int(seed), float(displace_p)

    def item(self, k: int, task: str) -> tuple[np.ndarray, Any]:
        x, mask = self.samples[k]
        rng = np.random.default_rng([self.seed, 3, int(k)])
        if rng.random() < self.displace_p:
            x, mask = displace(x, mask, rng)
        if task == "seg":
            return x, mask
        if task == "cls":
            return x, plane_index(mask)
        return x, keypoint_targets(mask)

    def batch(self, step: int, batch_size: int, task: str) -> tuple[torch.Tensor, Any]:
        items = [self.item(step * batch_size + j, task) for j in range(batch_size)]
        x = torch.from_numpy(np.stack([a for a, _ in items]))
        if task == "seg":
            return x, torch.from_numpy(np.stack([b for _, b in items]).astype(np.int64))
        if task == "cls":
            return x, torch.tensor([b for _, b in items])
        return x, (torch.from_numpy(np.stack([b[0] for _, b in items])), torch.tensor([b[1] for _, b in items]))


def task_of_step(seed: int, step: int) -> str:
    """Task-homogeneous batches: each step draws one task (probability proportional to its samples: all equal on PSFHS)."""
    return TASKS[int(np.random.default_rng([seed, 4, step]).integers(len(TASKS)))]


def task_loss(model: TAPSLF, task: str, x: torch.Tensor, y: Any) -> torch.Tensor:
    out = model.forward_task(x, task)
    if task == "seg":
        return seg_loss(out, y)
    if task == "cls":
        return F.cross_entropy(out, y)
    points, valid = y
    if not bool(valid.any()):
        return out.sum() * 0.0
    return F.smooth_l1_loss(out[valid], points[valid], beta=0.5)


def new_model(cfg: MultitaskConfig, encoder: str | Path | None) -> TAPSLF:
    recipe = get_recipe(cfg.dataset)
    model = models.build("tapslf", recipe.in_channels, recipe.num_classes, cfg.config, **cfg.overrides)
    if encoder:
        state = torch.load(encoder, map_location="cpu", weights_only=False)
        missing, unexpected = _load_encoder(model, state["encoder"])
        if missing or unexpected:
            raise UsageError(f"The encoder '{encoder}' does not fit tapslf/{cfg.config}: re-run the pre-training with the same config.")
    return model


def _load_encoder(model: TAPSLF, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy pre-trained encoder weights into ``model.encoder`` (LoRA-wrapped layers keep theirs under ``.base``)."""
    target = model.encoder.state_dict()
    mapped = {}
    for k, v in state.items():
        key = k if k in target else k.replace(".qkv.", ".qkv.base.").replace(".proj.", ".proj.base.")
        mapped[key] = v
    result = model.encoder.load_state_dict(mapped, strict=False)
    missing = [k for k in result.missing_keys if "lora_" not in k]
    return missing, list(result.unexpected_keys)


def train_iter(cfg: MultitaskConfig, cancel: CancelToken | None = None) -> Job[TAPSLF]:
    """Stage 2: joint adaptation; returns the model (the pack is written by :func:`export_pack`)."""
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    seed_everything(cfg.seed, True, torch.device("cpu"))
    recipe, ds = _dataset(cfg)
    data = MultitaskSamples(TrainSamples(ds, cfg.seed), cfg.seed, cfg.displace_p)
    model = new_model(cfg, cfg.encoder)
    groups = model.parameter_groups()
    lrs = {"adapt": cfg.lr_adapt, "neck": cfg.lr_neck, "seg_head": cfg.lr_seg_head, "heads": cfg.lr_heads, "backbone": cfg.lr_adapt}
    opt = torch.optim.AdamW([{"params": groups[g], "lr": lrs[g]} for g in groups if groups[g]], weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps, max(1, int(cfg.warmup * cfg.steps)), 0.005))
    path = cfg.run_dir / CHECKPOINT
    step, history = resume(path, model, opt, sched)
    steps_per_epoch = max(1, len(ds) // cfg.batch_size)
    t0 = time.perf_counter()
    running: dict[str, list[float]] = {t: [] for t in TASKS}
    while step < cfg.steps:
        check_cancel(cancel)
        task = task_of_step(cfg.seed, step)
        x, y = data.batch(step, cfg.batch_size, task)
        model.train()
        weight = cfg.task_weights.get(task, 1.0)
        if task == "seg":
            epoch = step / steps_per_epoch
            weight *= 2.0 - min(1.0, epoch / 10.0)  # 2 -> 1 over the first 10 epochs
        loss = task_loss(model, task, x, y)
        opt.zero_grad(set_to_none=True)
        (weight * loss).backward()
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        step += 1
        running[task].append(loss.item())
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            history.append({"step": step, "seconds": time.perf_counter() - t0, **{t: float(np.mean(v)) for t, v in running.items() if v}})
            running = {t: [] for t in TASKS}
            checkpoint(path, model, opt, sched, step, history)
            yield Progress(step, cfg.steps, " ".join(f"{k} {v:.3f}" for k, v in history[-1].items() if k in TASKS))
            if cfg.max_minutes and time.perf_counter() - t0 > cfg.max_minutes * 60 and step < cfg.steps:
                return model
    model.eval()
    model.history = history  # type: ignore[attr-defined]
    model.finished = True  # type: ignore[attr-defined]
    return model


def export_pack(model: TAPSLF, cfg: MultitaskConfig, extra: dict[str, Any] | None = None) -> Path:
    """Write the adapted model as an fp16 pack (segmentation via ``forward``; the other heads ride along)."""
    recipe = get_recipe(cfg.dataset)
    trainable, total = trainable_fraction(model)
    encoder_info = torch.load(cfg.encoder, map_location="cpu", weights_only=False) if cfg.encoder else {}
    pack = Pack(cfg.pack_id, model.eval(), "tapslf", cfg.config, recipe.in_channels, recipe.classes(), Normaliser.from_spec(recipe.normalisation),
                tile=recipe.tile, overlap=recipe.overlap)
    pack.manifest = {
        "title": "Pubic symphysis and fetal head, plane class and AoP key points (PSFHS) — TAP-SLF (small)",
        "task": "2-D semantic segmentation + plane classification + keypoint regression",
        "modality": "ultrasound",
        "overrides": cfg.overrides,
        "heads": {"cls": list(PLANES), "reg": list(KEYPOINTS), "reg_format": "normalised (x, y) per key point"},
        "parameters": {"trainable": trainable, "total": total, "fraction": trainable / total},
        "training": {
            "pretraining": f"masked-image modelling (MAE, {cfg.mask_ratio:.0%} hidden) on the {cfg.dataset} train split, "
                           f"{encoder_info.get('steps', '?')} steps; no foundation-model weights",
            "adaptation": {k: v for k, v in asdict(cfg).items() if k not in ("command",)},
            "pretrain_command": encoder_info.get("command", ""),
            "command": cfg.command,
            "split": recipe.split_rule,
        },
        "licence": recipe.licence,
        "attribution": recipe.attribution,
    }
    return save_pack(pack, cfg.out or cfg.run_dir / "pack", extra=extra)


# --------------------------------------------------------------------------- evaluation
@dataclass
class FramePrediction:
    labels: np.ndarray
    plane: str
    keypoints_rc: np.ndarray  # (3, 2) V, E, T as (row, col)

    @property
    def keypoint_aop(self) -> float | None:
        v, e, t = (tuple(p) for p in self.keypoints_rc)
        return aop_from_points(v, e, t)


@torch.no_grad()
def predict_frame(pack: Pack, image: np.ndarray) -> FramePrediction:
    """All three heads of a TAP-SLF pack on one ``(H, W)`` grey frame."""
    model: TAPSLF = pack.model  # type: ignore[assignment]
    frame = image[..., None] if image.ndim == 2 else image
    x = torch.from_numpy(pack.normaliser.apply(frame, pack.normaliser.frame_stats(frame)))[None]
    labels = model.forward_task(x, "seg").argmax(1)[0].numpy().astype(np.uint8)
    plane = PLANES[int(model.forward_task(x, "cls").argmax(1)[0])]
    points = keypoints_to_rc(model.forward_task(x, "reg")[0].numpy(), image.shape[:2])
    return FramePrediction(labels, plane, points)


def evaluate_iter(pack: Pack, cases, cancel: CancelToken | None = None) -> Job[dict[str, Any]]:
    """Per-frame Dice (PS, FH), plane accuracy, keypoint error (px) and |ΔAoP| from the masks and from the key points, |ΔHSD|."""
    rows = []
    yield Progress(0, len(cases), "evaluating")
    for i, case in enumerate(cases):
        check_cancel(cancel)
        image, _ = read_case_image(case)
        ref = read_mask(case, 3)
        p = predict_frame(pack, image)
        rb, pb = aop_hsd(ref), aop_hsd(p.labels)
        row: dict[str, Any] = {"id": case.id, "dice_ps": dice(p.labels == 1, ref == 1), "dice_fh": dice(p.labels == 2, ref == 2),
                               "plane_ok": p.plane == plane_class(ref), "ref_aop": rb.aop, "ref_hsd": rb.hsd}
        if rb.ok:
            ref_pts = np.array([rb.vertex, rb.other_end, rb.tangent], float)
            row["kp_error_px"] = float(np.linalg.norm(p.keypoints_rc - ref_pts, axis=1).mean())
            kp_aop = p.keypoint_aop
            row["aop_err_keypoints"] = None if kp_aop is None else abs(kp_aop - rb.aop)
            row["aop_err_mask"] = abs(pb.aop - rb.aop) if pb.ok else None
        if rb.hsd is not None and pb.hsd is not None:
            row["hsd_err_mask"] = abs(pb.hsd - rb.hsd)
        rows.append(row)
        yield Progress(i + 1, len(cases), case.id)
    return {"rows": rows, "summary": summarise(rows)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float | None:
        v = [float(r[key]) for r in rows if r.get(key) is not None]
        return float(np.mean(v)) if v else None

    def count(key: str) -> int:
        return sum(1 for r in rows if r.get(key) is not None)

    return {"frames": len(rows), "dice_ps": mean("dice_ps"), "dice_fh": mean("dice_fh"), "plane_accuracy": mean("plane_ok"),
            "kp_error_px": mean("kp_error_px"), "aop_err_keypoints": mean("aop_err_keypoints"), "aop_err_mask": mean("aop_err_mask"),
            "hsd_err_mask": mean("hsd_err_mask"), "measured_keypoints": count("aop_err_keypoints"), "measured_mask": count("aop_err_mask")}


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    import shlex
    import sys

    parser = argparse.ArgumentParser(prog="python -m medseg.train.multitask", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=("pretrain", "train", "evaluate"))
    parser.add_argument("--config", default="small")
    parser.add_argument("--workdir", default="work")
    parser.add_argument("--run", default=None)
    parser.add_argument("--encoder", default=None, help="encoder.pt of the pre-training run (train)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="pack folder (train; default <workdir>/<run>/pack)")
    parser.add_argument("--pack", default=None, help="pack to evaluate (evaluate)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--freeze-percent", type=float, default=None,
                        help="ablation: freeze only the first share of the encoder blocks (the official code's 0.7); default: all frozen")
    args = parser.parse_args(argv)
    cfg = MultitaskConfig(config=args.config, workdir=args.workdir, encoder=args.encoder, max_minutes=args.max_minutes, threads=args.threads, out=args.out,
                          command="python -m medseg.train.multitask " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    if args.freeze_percent is not None:
        cfg.overrides = {"freeze_percent": args.freeze_percent}
    cfg.run = args.run or {"pretrain": "tapslf-mim", "train": "tapslf", "evaluate": "tapslf"}[args.stage]
    if args.steps:
        cfg.steps = args.steps
    elif args.stage == "pretrain":
        cfg.steps = 3000
    if args.batch_size:
        cfg.batch_size = args.batch_size
    elif args.stage == "pretrain":
        cfg.batch_size = 16

    def show(p: Progress) -> None:
        print(f"[{p.done}/{p.total}] {p.message}", flush=True)

    if args.stage == "pretrain":
        out = run_sync(pretrain_iter(cfg), show)
        print(out)
    elif args.stage == "train":
        if not cfg.encoder:
            raise SystemExit("give --encoder (encoder.pt of the pre-training run)")
        model = run_sync(train_iter(cfg), show)
        if getattr(model, "finished", False):
            trainable, total = trainable_fraction(model)
            print(f"trainable parameters {trainable} of {total} ({trainable / total:.1%})")
            print(export_pack(model, cfg))
        else:
            print("stopped at the time budget; run the same command again to resume")
    else:
        from medseg.train.packs import load_pack

        recipe = get_recipe(cfg.dataset)
        report = run_sync(evaluate_iter(load_pack(args.pack or cfg.run_dir / "pack"), recipe.cases(args.split)))
        print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
