"""Does flip test-time augmentation (``--tta``) pay for itself? Every shipped pack that has flips to
average (see :func:`medseg.engine.predictor.tta_flips`) scored on its validation split and its
new-patient splits with and without it, by :mod:`medseg.train.evaluate` (the code behind
``medseg evaluate``), side by side in one run, with the CPU time each mode took.

    python benchmarks/tta.py [--limit N] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import table, write_section  # noqa: E402

from medseg.engine.predictor import PredictConfig, tta_flips  # noqa: E402
from medseg.engine.progress import run_sync  # noqa: E402
from medseg.train.datasets import evenly  # noqa: E402
from medseg.train.evaluate import evaluate_iter, headline, mean_dice  # noqa: E402
from medseg.train.packs import available_packs, load_pack, resources_dir  # noqa: E402
from medseg.train.recipes import get_recipe  # noqa: E402

SPLITS = {"psfhs": ["val", "holdout"], "glomeruli": ["val", "test", "external-test"], "polyp": ["val", "test"]}


def score(pack, recipe, split: str, limit: int | None, tta: bool) -> tuple[dict, float]:
    cases = evenly(recipe.cases(split), limit)
    config = PredictConfig(tile=pack.tile, overlap=pack.overlap, tta=tta)
    t0 = time.process_time()
    report = run_sync(evaluate_iter(pack, recipe, cases, config, split=split))
    return report, time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="score at most N cases per split (spread evenly)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, skipped = [], []
    for pack_id, folder in sorted(available_packs().items()):
        if folder.parent != resources_dir() / "packs":
            continue
        pack = load_pack(folder)
        flips = tta_flips(pack)
        dataset = pack.manifest.get("training", {}).get("dataset")
        if not flips or dataset not in SPLITS:
            skipped.append(f"`{pack_id}` ({'trained without flips, so --tta changes nothing' if not flips else 'no recipe'})")
            continue
        recipe = get_recipe(dataset)
        for split in SPLITS[dataset]:
            plain, t_plain = score(pack, recipe, split, args.limit, tta=False)
            aug, t_aug = score(pack, recipe, split, args.limit, tta=True)
            hp, ha = headline(plain), headline(aug)
            row = {"pack": pack_id, "split": split, "images": plain["n_cases"], "flips averaged": len(flips) + 1,
                   "Dice plain": f"{mean_dice(plain):.3f}", "Dice --tta": f"{mean_dice(aug):.3f}",
                   "change": f"{mean_dice(aug) - mean_dice(plain):+.3f}",
                   "object F1 plain": f"{hp['object_f1']:.3f}" if "object_f1" in hp else "—",
                   "object F1 --tta": f"{ha['object_f1']:.3f}" if "object_f1" in ha else "—",
                   "CPU time ratio": f"{t_aug / t_plain:.2f}"}
            print(row, flush=True)
            rows.append(row)
    cols = ["pack", "split", "images", "flips averaged", "Dice plain", "Dice --tta", "change", "object F1 plain", "object F1 --tta", "CPU time ratio"]
    body = ("Each pack scored twice in the same run on the same cases: plain, and with `--tta` (the mean of the scores over the image and "
            "its mirror images, each flipped back; only the flips the pack was trained with). Dice: mean over images of the foreground "
            "structure(s); `val` chose the weights, the other splits are patients, biopsies or mice that neither training nor selection saw."
            + (f" Cases per split: at most {args.limit}, spread evenly." if args.limit else "") + "\n\n" + table(rows, cols))
    if skipped:
        body += "\n\nNot scored: " + "; ".join(skipped) + "."
    print(body)
    write_section("Test-time flip averaging", body, command="python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]))


if __name__ == "__main__":
    main()
