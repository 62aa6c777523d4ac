"""How long does the first click on a frame take with the shipped interactive packs, seeded by their
automatic pack, with and without ``ClickSession.prepare()`` (what the Click dock runs when clicking
starts), against the network alone?

For each pack: validation images of its recipe spread evenly, one positive click at the deepest point
of the largest reference object, one torch thread, bf16 autocast as the dock uses; wall-clock and CPU
milliseconds per first click (median and maximum over the images), and the time ``prepare()`` itself
took (spent before the first click, off the GUI thread in the dock).

    python benchmarks/first_click.py [--images 12]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import table, write_section  # noqa: E402

from medseg.interactive.clicks import Click  # noqa: E402
from medseg.interactive.session import ClickSession  # noqa: E402
from medseg.train.datasets import evenly, read_case_image, read_mask  # noqa: E402
from medseg.train.packs import load_pack  # noqa: E402
from medseg.train.recipes import get_recipe  # noqa: E402

PACKS = {"ultrasound-fhps-click": "psfhs", "colon-polyp-click": "polyp"}


def deepest_point(mask: np.ndarray) -> Click:
    labels, n = ndimage.label(mask)
    largest = labels == (1 + int(np.argmax(ndimage.sum(mask, labels, range(1, n + 1))))) if n > 1 else mask
    row, col = np.unravel_index(int(np.argmax(ndimage.distance_transform_edt(largest))), mask.shape)
    return Click(float(col), float(row), True)


def first_click(image, rgb, pack, click: Click, seed: bool, prepare: bool) -> tuple[float, float, float]:
    """(wall ms, CPU ms) of the first click, and the wall ms of prepare() before it (0 without)."""
    session = ClickSession(image, pack, rgb=rgb, bf16=True, seed=seed)
    t = time.perf_counter()
    if prepare:
        session.prepare()
    prep = time.perf_counter() - t
    step = session.add(click)
    return 1000 * step.seconds, 1000 * step.cpu_seconds, 1000 * prep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for pack_id, recipe_name in PACKS.items():
        recipe, pack = get_recipe(recipe_name), load_pack(pack_id)
        cases = evenly(recipe.cases("val"), args.images)
        runs = {"network alone": (False, False), "seeded, not prepared": (True, False), "seeded, prepared (the dock)": (True, True)}
        times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in runs}
        for case in cases:
            image, rgb = read_case_image(case)
            truth = read_mask(case, recipe.num_classes)
            click = deepest_point(truth == truth.max())
            first_click(image, rgb, pack, click, True, True)  # warm-up on this image size
            for name, (seed, prepare) in runs.items():
                times[name].append(first_click(image, rgb, pack, click, seed, prepare))
        for name, values in times.items():
            wall, cpu, prep = (np.array([v[i] for v in values]) for i in range(3))
            rows.append({
                "interactive pack": pack_id, "images": f"{recipe_name} val, {len(cases)}", "first click": name,
                "wall ms (median / max)": f"{np.median(wall):.0f} / {wall.max():.0f}", "CPU ms (median)": f"{np.median(cpu):.0f}",
                "prepare() ms before it (median)": f"{np.median(prep):.0f}" if runs[name][1] else "—",
            })
    body = "\n".join([
        "First positive click at the deepest point of the largest reference object of each image; one torch thread, bf16 autocast; "
        "a fresh session per measurement after one warm-up click per image. *Seeded*: the automatic pack's object under the click is "
        "the network's previous mask (the packs' manifests ask for it); *prepared*: `ClickSession.prepare()` ran first, as the Click "
        "dock does off the GUI thread when clicking starts (its time is spent before the click). Target: a click within 100 ms.",
        "",
        table(rows, list(rows[0])),
    ])
    if args.no_write:
        print(body)
    else:
        write_section("Click segmentation: the first click on a frame", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
