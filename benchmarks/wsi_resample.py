"""Does resampling a slide level to the pack's µm/px pay off? Real AIDPATH biopsy tiles (0.5 µm/px,
1024 x 1024) laid side by side as a one-level pyramidal TIFF, segmented by the shipped 1 µm/px
glomeruli pack through the whole-slide engine twice in one run: the level resampled to the pack's
µm/px (what ``medseg wsi`` does) and the level used as it is (the slide's µm/px declared equal to the
pack's, which is what the engine did before it resampled). Dice against the reference masks at the
slide's resolution, per tile and pooled, with wall time and tiles predicted.

    python benchmarks/wsi_resample.py [--split val] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import table, write_section  # noqa: E402

from medseg import metrics  # noqa: E402
from medseg.engine.wsi import SlideConfig, segment_slide  # noqa: E402
from medseg.io.slides import write_pyramid  # noqa: E402
from medseg.resample import resample_labels  # noqa: E402
from medseg.train.datasets import read_case_image, read_mask  # noqa: E402
from medseg.train.packs import load_pack  # noqa: E402
from medseg.train.recipes import get_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="val", help="glomeruli split whose AIDPATH tiles make the slide (default val)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = get_recipe("glomeruli")
    cases = [c for c in recipe.cases(args.split) if c.source == "aidpath-kaggle"]
    if not cases:
        raise SystemExit(f"No AIDPATH tiles in split '{args.split}'.")
    images = [read_case_image(c)[0] for c in cases]
    refs = [read_mask(c, 2) for c in cases]
    width = images[0].shape[1]
    mosaic, ref = np.concatenate(images, axis=1), np.concatenate(refs, axis=1)
    pack = load_pack("kidney-glomeruli")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_pyramid(Path(tmp) / "aidpath.tif", mosaic, mpp=cases[0].mpp, levels=1)
        for name, declared in (("level resampled to the pack's µm/px (default)", None), ("level as it is", pack.mpp)):
            t = time.perf_counter()
            res = segment_slide(path, pack, Path(tmp) / f"{len(rows)}.zarr", SlideConfig(tissue=False, device="cpu", mpp=declared))
            seconds = time.perf_counter() - t
            labels = res.labels[...]
            if labels.shape != ref.shape:
                labels = resample_labels(labels, ref.shape)
            per_tile = [metrics.dice(labels[:, i * width : (i + 1) * width] == 1, ref[:, i * width : (i + 1) * width] == 1) for i in range(len(cases))]
            rows.append({"mode": name, "inference grid": f"{res.shape[1]} x {res.shape[0]} px at {res.mpp:.2f} µm/px" if declared is None else f"{res.shape[1]} x {res.shape[0]} px at {cases[0].mpp:.2f} µm/px",
                         "Dice per tile (mean)": f"{np.mean(per_tile):.3f}", "Dice pooled": f"{metrics.dice(labels == 1, ref == 1):.3f}",
                         "tiles": res.tiles, "wall s": f"{seconds:.1f}"})
    body = (
        f"Question: the glomeruli pack works at {pack.mpp:g} µm/px; AIDPATH biopsies are scanned at {cases[0].mpp:g} µm/px. What does running the level at the "
        f"pack's scale (each tile read over the matching area and resampled) gain over feeding the level as it is? {len(cases)} {args.split}-split tiles, "
        f"one slide, probability blending, no tissue detection, {args.threads} thread(s).\n\n"
        + table(rows, ["mode", "inference grid", "Dice per tile (mean)", "Dice pooled", "tiles", "wall s"])
        + f"\n\nDice here is without the area filter of `medseg evaluate`, so it is lower than the pack's validation Dice; the comparison is between the two rows."
    )
    write_section("Whole slides at the pack's pixel size", body, command="python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]))
    print(body)


if __name__ == "__main__":
    main()
