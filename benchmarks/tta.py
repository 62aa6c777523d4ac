"""Does flip test-time augmentation (``--tta``) pay for itself? Every shipped pack that has flips to
average (see :func:`medseg.engine.predictor.tta_flips`) scored on its validation split and its
new-patient splits with and without it, by :mod:`medseg.train.evaluate` (the code behind
``medseg evaluate``), side by side in one run, with the CPU time each mode took. A multi-sequence
pack is scored on its validation subjects for every sequence subset through :mod:`medseg.multiseq`
(what ``medseg multiseq [--tta]`` runs).

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
from medseg.train.multiseq import REGIONS, evaluate_subsets_iter, read_split  # noqa: E402
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


def multiseq_rows(pack, flips) -> list[dict]:
    """Dice per region, plain -> --tta, with all three sequences and as the mean of the 7 subsets."""
    import os

    root = Path(os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "myops"
    val = read_split(root)["val"]
    reports, seconds = [], []
    for tta in (False, True):
        t0 = time.process_time()
        reports.append(run_sync(evaluate_subsets_iter(pack, root, val, tta=tta)))
        seconds.append(time.process_time() - t0)
    rows = []
    for label, keys in (("all three", ["C0+LGE+T2"]), ("mean of the 7 subsets", list(reports[0]["summary"]))):
        row = {"pack": pack.id, "sequences": label, "subjects": len(val), "flips averaged": len(flips) + 1}
        for region in REGIONS:
            a, b = (sum(r["summary"][k][region] for k in keys) / len(keys) for r in reports)
            row[region] = f"{a:.3f} -> {b:.3f} ({b - a:+.3f})"
        row["CPU time ratio"] = f"{seconds[1] / seconds[0]:.2f}"
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="score at most N cases per split (spread evenly)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, skipped, ms_rows = [], [], []
    packs = {**available_packs(), **available_packs(kind="multisequence")}
    for pack_id, folder in sorted(packs.items()):
        if folder.parent != resources_dir() / "packs":
            continue
        pack = load_pack(folder)
        flips = tta_flips(pack)
        if flips and pack.manifest.get("sequences"):
            ms_rows += multiseq_rows(pack, flips)
            continue
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
    if ms_rows:
        body += ("\n\nMulti-sequence cardiac MRI (`medseg multiseq --tta`): Dice plain -> --tta on the validation subjects of "
                 "`myops/split.json` (never used in training), per subject on the 3-D volume, mean over subjects; the mean of the 7 "
                 "subsets averages the subsets' means.\n\n" + table(ms_rows, ["pack", "sequences", "subjects", "flips averaged", *REGIONS, "CPU time ratio"]))
    if skipped:
        body += "\n\nNot scored: " + "; ".join(skipped) + "."
    print(body)
    write_section("Test-time flip averaging", body, command="python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]))


if __name__ == "__main__":
    main()
