"""Copy what training reads of the PSFHS and polyp data folders: every training row and N validation rows
spread evenly over the split (never the hold-out or test rows), with the CSV that lists them.

For taking the data to a training machine with little room (a rented GPU): the copy is what
``medseg train --data-root OUT`` needs, and the validation rows it keeps are the ones that choose the
best step. Score the resulting packs on the whole validation split afterwards (``medseg evaluate``).

    python scripts/copy_training_data.py OUT [--data-root ../shared/data] [--datasets psfhs,polyp] [--val 100]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from medseg.train.recipes import data_root_dir  # noqa: E402

# dataset: (CSV, row -> the files of the row, relative to the dataset folder)
LAYOUT = {
    "psfhs": ("frames.csv", lambda r: [f"images/{r['id']}.png", f"labels/{r['id']}.png"]),
    "polyp": ("splits.csv", lambda r: [f"{r['dataset']}/images/{r['name']}.jpg", f"{r['dataset']}/masks/{r['name']}.png"]),
}


def spread(rows: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """``n`` rows spread evenly over ``rows`` in their CSV order (row ``floor(i * len / n)``)."""
    return rows if len(rows) <= n else [rows[i * len(rows) // n] for i in range(n)]


def copy_dataset(src: Path, dst: Path, name: str, n_val: int, per_source: dict[str, int] | None = None) -> tuple[int, int]:
    table, files = LAYOUT[name]
    with open(src / table, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("shipped", "1") in ("1", "true", "True")]
    keep = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    if per_source:  # e.g. {"kvasir": 66, "cvc": 34}: each source its own even spread
        keep += [r for source, n in per_source.items() for r in spread([r for r in val if r.get("dataset", r.get("source")) == source], n)]
    else:
        keep += spread(val, n_val)
    (dst / name).mkdir(parents=True, exist_ok=True)
    with open(dst / name / table, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)
    for r in keep:
        for rel in files(r):
            (dst / name / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / name / rel)
    return sum(r["split"] == "train" for r in keep), sum(r["split"] == "val" for r in keep)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--data-root", default=None, help="the shared data folder (default: $MEDSEG_DATA or ../shared/data)")
    ap.add_argument("--datasets", default="psfhs,polyp")
    ap.add_argument("--val", type=int, default=100, help="validation rows to keep per dataset (spread evenly)")
    ap.add_argument("--val-per-source", default=None, metavar="SOURCE=N,...", help="polyp: validation rows per source instead (e.g. kvasir=66,cvc=34)")
    args = ap.parse_args(argv)
    root = data_root_dir(args.data_root)
    for name in args.datasets.split(","):
        if name not in LAYOUT:
            print(f"Unknown dataset '{name}': choose from {', '.join(LAYOUT)}.", file=sys.stderr)
            return 2
        if not (root / name).is_dir():
            print(f"'{root / name}' is missing: give --data-root the shared data folder.", file=sys.stderr)
            return 2
        per_source = None
        if args.val_per_source and name == "polyp":
            try:
                per_source = {k: int(v) for k, v in (item.split("=") for item in args.val_per_source.split(","))}
            except ValueError:
                print(f"--val-per-source takes SOURCE=N pairs separated by commas (e.g. kvasir=66,cvc=34), not '{args.val_per_source}'.", file=sys.stderr)
                return 2
        n_train, n_val = copy_dataset(root / name, args.out, name, args.val, per_source)
        print(f"{name}: {n_train} training and {n_val} validation rows copied to {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
