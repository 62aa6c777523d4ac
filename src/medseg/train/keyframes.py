"""FullTransNet key-frame training on pseudo-loops built from PSFHS frames (spec §7, adapted to cine loops).

PSFHS has single frames, not annotated loops, so loops are simulated and their key frames are defined
by a measurable quality:

1. **Frame bank** (:func:`build_bank`): every frame of a split (train for training, val for
   validation; never the hold-out) in ``V = 4`` variants: the frame itself and three degraded copies,
   each drawn with ``default_rng([seed, 7, frame index, variant])`` as one of
   *probe drift* (:func:`medseg.train.multitask.displace`, translation up to 45% of each side, zero
   fill: a structure may leave the field), *defocus* (Gaussian blur sigma 2-5 plus multiplicative
   speckle noise sigma 0.3) or *shadow* (contrast x0.15-0.4 and a dark band over 30-60% of the width).
   Each variant goes once through the segmentation pack (``ultrasound-fhps``), which gives its
   features (pooled encoder stages, :func:`medseg.measure.keyframes.features_and_probs`) and its
   **quality** (:func:`medseg.measure.keyframes.frame_quality`: 0 unless both PS and FH are
   predicted, else the mean winning softmax probability over the predicted PS and FH pixels).
2. **Pseudo-loop** (:func:`sample_loop`): ``T`` uniform in [24, 64] positions over a random run of
   consecutive frame IDs of the split (neighbouring IDs come from the same or adjacent cine
   loops): at each position the frame pointer advances with probability 0.6 (else the frame is
   held); a two-state chain (good / degraded, switching with probability 0.25 per frame, starting
   good with probability 0.5) picks the variant: 0 when good, one variant fixed per degraded episode.
3. **Target**: the ``ceil(0.15 T)`` positions of highest quality among those with quality > 0
   (earlier first on ties), in temporal order (the 15% knapsack of §7.5 with one-frame shots). Loops
   with no measurable frame are skipped. Global tokens: first, middle and last frame of each 8-frame
   segment.
4. **Training**: teacher forcing with BOS and right shift, BCE pointer loss, Adam lr 1.3e-3, weight
   decay 5e-6 (spec §7.7), batches of 8 loops, fixed steps, checkpoints in ``<workdir>/<run>``.
5. **Evaluation** (:func:`evaluate_loops`) on 200 validation pseudo-loops (seed fixed): F-measure of
   the predicted key frames against the target, mean quality of the picks and the share of picks
   showing both structures, next to the oracle (the target), evenly spaced frames and random frames.

``python -m medseg.train.keyframes bank|train|evaluate ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from medseg import models
from medseg.engine.progress import Job, Progress, run_sync
from medseg.io.atomic import atomic_path
from medseg.measure.keyframes import DEFAULT_RATIO, frame_features_iter, score_loop, select_key_frames
from medseg.models.fulltransnet import FullTransNet, pointer_loss, segment_global_mask
from medseg.train.datasets import read_case_image
from medseg.train.loop import seed_everything
from medseg.train.multitask import checkpoint, displace, resume
from medseg.train.packs import ClassInfo, Pack, resolve, save_pack
from medseg.train.recipes import get_recipe

VARIANTS = ("original", "drift", "defocus", "shadow")


@dataclass
class KeyframeConfig:
    dataset: str = "psfhs"
    seg_pack: str = "ultrasound-fhps"
    workdir: str = "work"
    run: str = "keyframes"
    variants: int = 4
    seed: int = 2021
    steps: int = 1500
    batch_size: int = 8
    lr: float = 1.3e-3
    weight_decay: float = 5e-6
    config: str = "small"
    segment: int = 8
    min_len: int = 24
    max_len: int = 64
    ratio: float = DEFAULT_RATIO
    threads: int | None = 1
    ckpt_every: int = 100
    out: str | None = None
    pack_id: str = "ultrasound-keyframes"
    command: str = ""

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) / self.run


def degrade(image: np.ndarray, variant: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Variant 0: the frame; otherwise one of drift / defocus / shadow drawn from ``rng`` (see the module doc)."""
    if variant == 0:
        return image, "original"
    kind = VARIANTS[1 + int(rng.integers(3))]
    img = image.astype(np.float32)
    if kind == "drift":
        img, _ = displace(img, None, rng, 0.45)
    elif kind == "defocus":
        img = ndimage.gaussian_filter(img, rng.uniform(2, 5))
        img = img * (1 + 0.3 * rng.standard_normal(img.shape).astype(np.float32))
    else:
        img = img.mean() + (img - img.mean()) * rng.uniform(0.15, 0.4)
        w = img.shape[1]
        width = int(rng.uniform(0.3, 0.6) * w)
        start = int(rng.integers(0, w - width + 1))
        img[:, start : start + width] *= 0.1
    return np.clip(img, 0, 255).astype(image.dtype), kind


def build_bank(cfg: KeyframeConfig, split: str) -> Job[dict[str, Any]]:
    """Features, qualities and kinds of every frame of ``split`` in ``cfg.variants`` variants (cached in the run folder)."""
    path = cfg.run_dir / f"bank-{split}.npz"
    if path.is_file():
        data = np.load(path)
        return {k: data[k] for k in data.files}
    recipe = get_recipe(cfg.dataset)
    cases = recipe.cases(split)
    pack = resolve(cfg.seg_pack)
    feats, quality, kinds = [], [], []
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        image, _ = read_case_image(case)
        stack, names = [], []
        for v in range(cfg.variants):
            img, kind = degrade(image, v, np.random.default_rng([cfg.seed, 7, i, v]))
            stack.append(img)
            names.append(VARIANTS.index(kind))
        f, q = run_sync(frame_features_iter(np.stack(stack), pack))
        feats.append(f)
        quality.append(q)
        kinds.append(names)
        yield Progress(i + 1, len(cases), f"bank {split} {case.id} ({time.perf_counter() - t0:.0f} s)")
    bank = {"features": np.stack(feats).astype(np.float32), "quality": np.stack(quality).astype(np.float32),
            "kinds": np.asarray(kinds, np.int8), "ids": np.asarray([c.id for c in cases])}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **bank)
    return bank


def sample_loop(bank: dict[str, Any], rng: np.random.Generator, min_len: int = 24, max_len: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """One pseudo-loop: (features (T, F), quality (T,)) as the module doc describes."""
    n, v = bank["quality"].shape
    t = int(rng.integers(min_len, max_len + 1))
    frame = int(rng.integers(0, n))
    good = rng.random() < 0.5
    variant = 0 if good else int(rng.integers(1, v))
    idx, var = [], []
    for _ in range(t):
        idx.append(frame)
        var.append(variant)
        if rng.random() < 0.6:
            frame = min(n - 1, frame + 1)
        if rng.random() < 0.25:
            good = not good
            variant = 0 if good else int(rng.integers(1, v))
    idx_a, var_a = np.asarray(idx), np.asarray(var)
    return bank["features"][idx_a, var_a], bank["quality"][idx_a, var_a]


def target_frames(quality: np.ndarray, ratio: float = DEFAULT_RATIO) -> list[int]:
    """The ``ceil(ratio T)`` best frames among those with quality > 0, in temporal order."""
    k = max(1, math.ceil(ratio * len(quality)))
    measurable = np.flatnonzero(quality > 0)
    order = measurable[np.argsort(-quality[measurable], kind="stable")][:k]
    return sorted(int(i) for i in order)


def _batch(bank, rng, cfg: KeyframeConfig):
    loops = []
    while len(loops) < cfg.batch_size:
        f, q = sample_loop(bank, rng, cfg.min_len, cfg.max_len)
        tgt = target_frames(q, cfg.ratio)
        if tgt:
            loops.append((f, tgt))
    t = max(len(f) for f, _ in loops)
    k = max(len(g) for _, g in loops)
    x = torch.zeros(len(loops), t, loops[0][0].shape[1])
    targets = torch.full((len(loops), k), -1, dtype=torch.long)
    lengths = torch.tensor([len(f) for f, _ in loops])
    for i, (f, g) in enumerate(loops):
        x[i, : len(f)] = torch.from_numpy(f)
        targets[i, : len(g)] = torch.tensor(g)
    glob = torch.stack([segment_global_mask(int(n), cfg.segment, t) for n in lengths])
    return x, targets, lengths, glob


def train_iter(cfg: KeyframeConfig, bank: dict[str, Any]) -> Job[FullTransNet]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, True, torch.device("cpu"))
    feats = bank["features"].reshape(-1, bank["features"].shape[-1])
    model: FullTransNet = models.build("fulltransnet", in_channels=feats.shape[1], config=cfg.config, segment=cfg.segment)
    model.feature_mean.copy_(torch.from_numpy(feats.mean(0)))
    model.feature_std.copy_(torch.from_numpy(feats.std(0) + 1e-6))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    path = cfg.run_dir / "ckpt.pt"
    step, history = resume(path, model, opt)
    running: list[float] = []
    while step < cfg.steps:
        rng = np.random.default_rng([cfg.seed, 8, step])
        x, targets, lengths, glob = _batch(bank, rng, cfg)
        model.train()
        logits = model(x, targets, lengths, glob)
        loss = pointer_loss(logits, targets, x.shape[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running.append(loss.item())
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            history.append({"step": step, "loss": float(np.mean(running))})
            running = []
            checkpoint(path, model, opt, None, step, history)
            yield Progress(step, cfg.steps, f"loss {history[-1]['loss']:.5f}")
    model.eval()
    return model


def f_measure(pred: list[int], ref: list[int]) -> float:
    overlap = len(set(pred) & set(ref))
    if overlap == 0:
        return 0.0
    p, r = overlap / len(pred), overlap / len(ref)
    return 2 * p * r / (p + r)


def evaluate_loops(model: FullTransNet, bank: dict[str, Any], n_loops: int = 200, seed: int = 99, ratio: float = DEFAULT_RATIO, min_len: int = 24,
                   max_len: int = 64) -> dict[str, Any]:
    """F-measure vs the quality target and quality of the picks: FullTransNet, oracle, evenly spaced, random."""
    rng = np.random.default_rng([seed, 9])
    rows: dict[str, list[tuple[float, float, float]]] = {"fulltransnet": [], "oracle": [], "evenly spaced": [], "random": []}
    done = 0
    while done < n_loops:
        f, q = sample_loop(bank, rng, min_len, max_len)
        tgt = target_frames(q, ratio)
        if not tgt:
            continue
        done += 1
        t = len(q)
        k = max(1, math.ceil(ratio * t))
        picks = {
            "fulltransnet": select_key_frames(score_loop(model, f, ratio), ratio),
            "oracle": tgt,
            "evenly spaced": sorted({int(round(v)) for v in np.linspace(0, t - 1, k)}),
            "random": sorted(int(v) for v in rng.choice(t, k, replace=False)),
        }
        for name, p in picks.items():
            rows[name].append((f_measure(p, tgt), float(q[p].mean()), float((q[p] > 0).mean())))
    return {name: {"f_measure": float(np.mean([r[0] for r in v])), "mean_quality": float(np.mean([r[1] for r in v])),
                   "both_structures": float(np.mean([r[2] for r in v]))} for name, v in rows.items()} | {"loops": n_loops}


def export_pack(model: FullTransNet, cfg: KeyframeConfig, report: dict[str, Any]) -> Path:
    seg = resolve(cfg.seg_pack)
    pack = Pack(cfg.pack_id, model, "fulltransnet", cfg.config, model.in_features, [ClassInfo(0, "key frame", "#ffd700")], activation="none",
                tile=seg.tile)
    pack.manifest = {
        "title": "Key frames of intrapartum ultrasound loops — FullTransNet (small) on ultrasound-fhps encoder features",
        "kind": "sequence",  # not a segmentation pack: it takes per-frame features (medseg.measure.keyframes)
        "task": "key-frame summary of a frame sequence",
        "modality": "ultrasound",
        "overrides": {"segment": cfg.segment},
        "features_from": {"pack": seg.id, "sha256": seg.sha256, "features": "global average of each encoder stage, concatenated", "frame_size": seg.tile},
        "ratio": cfg.ratio,
        "training": {**{k: v for k, v in asdict(cfg).items() if k != "command"}, "command": cfg.command,
                     "data": "pseudo-loops from the PSFHS train split (see medseg.train.keyframes)"},
        "validation": report,
        "licence": get_recipe(cfg.dataset).licence,
        "attribution": get_recipe(cfg.dataset).attribution,
    }
    return save_pack(pack, cfg.out or cfg.run_dir / "pack")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medseg.train.keyframes", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=("bank", "train", "evaluate"))
    parser.add_argument("--workdir", default="work")
    parser.add_argument("--run", default="keyframes")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default=None)
    parser.add_argument("--pack", default=None, help="summariser pack to evaluate")
    args = parser.parse_args(argv)
    cfg = KeyframeConfig(workdir=args.workdir, run=args.run, steps=args.steps, out=args.out,
                         command="python -m medseg.train.keyframes " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    torch.set_num_threads(1)

    def show(p: Progress) -> None:
        print(f"[{p.done}/{p.total}] {p.message}", flush=True)

    if args.stage == "bank":
        for split in ("train", "val"):
            run_sync(build_bank(cfg, split), show)
        return 0
    val = run_sync(build_bank(cfg, "val"), show)
    if args.stage == "train":
        model = run_sync(train_iter(cfg, run_sync(build_bank(cfg, "train"), show)), show)
        report = evaluate_loops(model, val)
        print(json.dumps(report, indent=2))
        print(export_pack(model, cfg, report))
    else:
        report = evaluate_loops(resolve(args.pack or cfg.run_dir / "pack").model, val)
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
