"""What simulating clicks costs in a click-guided training step, against the network's own step.

Each training step of an interactive pack (``medseg train --interactive disks``) picks one object per
crop, draws the first click far inside it, runs 0-3 corrective rounds (each: a forward pass without
gradients, then the next click at the interior point of the largest error region) and writes the
guidance channels into the batch. All of that runs in the training process, between two network steps.
This benchmark times it on a batch of real training crops with the project's functions (distances on
each region's bounding box, guidance written into the batch) and with the whole-image reference they
replaced (a distance transform over the whole crop, guidance stacked and concatenated), checks that
both give the same clicks and the same batch, and, for scale, times one forward + backward of the
small click-guided MSLAU-Net on the same batch (one thread, bf16 autocast, as CPU training runs it).

    python benchmarks/click_simulation.py [--batch 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import table, write_section  # noqa: E402

from medseg import models  # noqa: E402
from medseg.interactive.clicks import Click, disk_map, next_click, random_inside  # noqa: E402
from medseg.models.guided import GuidedNet  # noqa: E402
from medseg.train.datasets import read_mask  # noqa: E402
from medseg.train.interactive import guided_batch, pick_object  # noqa: E402
from medseg.train.recipes import get_recipe  # noqa: E402

SMALL_CLICK_NET = {"dims": [32, 64, 128, 256], "depths": [1, 1, 2, 1]}  # the shipped click packs' size


# ----------------------------------------------------------------------------- whole-image reference
def _whole_distance(region: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]


def reference_random_inside(target: np.ndarray, rng: np.random.Generator, far: float = 0.5) -> Click | None:
    if not target.any():
        return None
    dist = _whole_distance(target.astype(bool))
    rows, cols = np.nonzero(dist >= far * dist.max())
    i = int(rng.integers(len(rows)))
    return Click(float(cols[i]), float(rows[i]), True)


def reference_next_click(target: np.ndarray, prediction: np.ndarray) -> Click | None:
    target, prediction = target.astype(bool), prediction.astype(bool)
    best = None
    for error, positive in ((target & ~prediction, True), (prediction & ~target, False)):
        if not error.any():
            continue
        labels, n = ndimage.label(error)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), labels == k + 1, positive)
    if best is None:
        return None
    dist = _whole_distance(best[1])
    rows, cols = np.nonzero(dist >= dist.max() - 1e-6)
    i = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return Click(float(cols[i]), float(rows[i]), best[2])


def reference_guided_batch(x, clicks, previous, radius) -> torch.Tensor:
    shape = x.shape[-2:]
    guide = np.stack(
        [np.stack([disk_map([c for c in cs if c.positive], shape, radius), disk_map([c for c in cs if not c.positive], shape, radius), p.astype(np.float32)]) for cs, p in zip(clicks, previous)]
    )
    return torch.from_numpy(np.concatenate([np.asarray(x, np.float32), guide], axis=1))


# ----------------------------------------------------------------------------- the batch
def crops(dataset: str, n: int, size: int = 256) -> np.ndarray:
    """Class-index crops of ``size`` from the first training images that hold foreground."""
    out = []
    for case in get_recipe(dataset).cases("train"):
        y = read_mask(case, get_recipe(dataset).num_classes)
        if y.shape[0] < size or y.shape[1] < size:
            y = np.pad(y, ((0, max(0, size - y.shape[0])), (0, max(0, size - y.shape[1]))))
        r0, c0 = (y.shape[0] - size) // 2, (y.shape[1] - size) // 2
        y = y[r0 : r0 + size, c0 : c0 + size]
        if (y > 0).sum() >= 64:
            out.append(y)
        if len(out) == n:
            break
    return np.stack(out)


def stand_ins(y: np.ndarray, rounds: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """The step's targets and, per corrective round, a stand-in prediction (the targets eroded and shifted)."""
    rng = np.random.default_rng(seed)
    targets = np.stack([pick_object(t, rng) for t in y])
    return targets, [np.roll(ndimage.binary_erosion(targets, iterations=2 + r), 3 + r, axis=-1) for r in range(rounds)]


def simulate(y: np.ndarray, preds: list[np.ndarray], random_first: Callable, next_fn: Callable, batch_fn: Callable, seed: int = 0):
    """One step's click simulation (object choice, first click, corrective clicks, guidance batch)."""
    rng = np.random.default_rng(seed)
    targets = np.stack([pick_object(t, rng) for t in y])
    clicks = [[c] if (c := random_first(t, rng)) is not None else [] for t in targets]
    previous = np.zeros(targets.shape, np.float32)
    x = np.zeros((len(y), 3, *y.shape[-2:]), np.float32)
    for pred in preds:
        for b in range(len(targets)):
            c = next_fn(targets[b], pred[b])
            if c is not None:
                clicks[b].append(c)
        previous = pred.astype(np.float32)
    return clicks, batch_fn(x, clicks, previous, 5)


def timed(fn: Callable, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for dataset, in_ch in (("polyp", 3), ("psfhs", 1)):
        y = crops(dataset, args.batch)
        for rounds in (0, 3):
            preds = stand_ins(y, rounds)[1]
            mine = simulate(y, preds, random_inside, next_click, guided_batch)
            ref = simulate(y, preds, reference_random_inside, reference_next_click, reference_guided_batch)
            same_clicks = [[(c.x, c.y, c.positive) for c in cs] for cs in mine[0]] == [[(c.x, c.y, c.positive) for c in cs] for cs in ref[0]]
            same_batch = torch.equal(mine[1], ref[1])
            if not (same_clicks and same_batch):
                raise SystemExit(f"{dataset}: the project's click simulation differs from the whole-image reference")
            t_ref = timed(lambda: simulate(y, preds, reference_random_inside, reference_next_click, reference_guided_batch), args.repeats)
            t_new = timed(lambda: simulate(y, preds, random_inside, next_click, guided_batch), args.repeats)
            rows.append({"dataset": dataset, "corrective rounds": rounds, "whole-image reference (ms)": f"{t_ref:.0f}", "project (ms)": f"{t_new:.0f}", "speed-up": f"{t_ref / t_new:.1f}x", "same clicks and batch": "yes"})
        net = GuidedNet(models.build("mslaunet", in_channels=in_ch, num_classes=2, config="small", **SMALL_CLICK_NET), 3)
        x = torch.randn(args.batch, in_ch + 3, 256, 256)
        target = torch.from_numpy((y > 0).astype(np.int64))

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(net(x).float(), target)
            loss.backward()

        step()
        rows[-1]["network forward + backward (ms)"] = rows[-2]["network forward + backward (ms)"] = f"{timed(step, max(2, args.repeats // 2)):.0f}"
    body = (
        f"Click simulation of one training step, batch {args.batch} of 256 x 256 crops from the training splits (median of "
        f"{args.repeats}; 0 or 3 corrective rounds, the rounds' predictions stand-ins so only the simulation is timed), and one "
        "forward + backward of the small click-guided MSLAU-Net on the same batch for scale (one thread, bf16 autocast). The "
        "reference is the whole-image implementation the project used before (distance transforms over the whole crop, guidance "
        "stacked then concatenated); both give the same clicks and the same network input (checked in the run).\n\n"
        + table(rows, ["dataset", "corrective rounds", "whole-image reference (ms)", "project (ms)", "speed-up", "network forward + backward (ms)", "same clicks and batch"])
    )
    print(body)
    write_section("Click-guided training: the cost of simulating clicks", body)


if __name__ == "__main__":
    main()
