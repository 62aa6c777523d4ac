"""How do the shipped ultrasound pack and the other PSFHS runs' packs compare, frame by frame, on the
same validation frames?

Runs ``medseg compare`` (the command users run) on ``--frames`` PSFHS validation frames spread evenly
over the recipe's validation split (never training frames) with the reference masks, and writes its
Markdown report (table of costs and scores, pairwise Dice matrix, agreement) into
``benchmarks/RESULTS.md`` together with where each pack comes from (the training command recorded in
its manifest; the runs are those of the "Architectures tried" section).

    python benchmarks/compare_models.py [--frames 20] [--models ultrasound-fhps,work/run/pack,...] [--threads 1]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import table, write_section  # noqa: E402

from medseg.cli import main as medseg_main  # noqa: E402
from medseg.compare import default_name, parse_model_spec  # noqa: E402
from medseg.train.datasets import evenly  # noqa: E402
from medseg.train.packs import find_pack, read_manifest  # noqa: E402
from medseg.train.recipes import data_root_dir, get_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "Model comparison: PSFHS validation frames"
MODELS = [
    "ultrasound-fhps",
    "work/pack2-ultrasound-fhps/pack",
    "work/screen-psfhs-mslaunet-s/pack",
    "work/screen-psfhs-mslaunet-m/pack",
    "work/screen-psfhs-medformer-s/pack",
    "work/trial-psfhs-mslaunet/pack",
    "work/trial-psfhs-unet/pack",
    "work/trial-psfhs-dcaunet/pack",
]


def provenance(specs: list[str]) -> str:
    """Where each compared pack comes from: its folder, architecture and the training command in its manifest."""
    rows = []
    for spec in specs:
        _, given = parse_model_spec(spec)
        folder = find_pack(given)
        m = read_manifest(folder)
        name = default_name(given, SimpleNamespace(id=m.get("id", folder.name)))
        shipped = " (shipped)" if folder.resolve().parent.name == "packs" and folder.resolve().parents[1].name == "resources" else ""
        rows.append({
            "model": name + shipped,
            "pack": given,
            "architecture": f"{m['architecture']}/{m.get('config', '')}",
            "training steps (best)": f"{m.get('training', {}).get('steps', '?')} ({m.get('training', {}).get('best_step', '?')})",
            "command": f"`{m.get('command', '')}`",
        })
    return table(rows, ["model", "pack", "architecture", "training steps (best)", "command"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=20, help="validation frames, spread evenly over the split (default 20)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated packs (ids or folders)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/_out/compare", help="working folder (ignored by git)")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = ap.parse_args()

    recipe = get_recipe("psfhs")
    cases = evenly(recipe.cases("val"), args.frames)
    out = Path(args.out)
    frames_dir = out / "frames"
    shutil.rmtree(frames_dir, ignore_errors=True)
    frames_dir.mkdir(parents=True)
    for case in cases:  # the chosen frames as links in one folder, so the command stays short
        (frames_dir / case.image.name).symlink_to(case.image.resolve())
    labels = data_root_dir() / "psfhs" / "labels"
    argv = ["compare", str(frames_dir), "--models", args.models, "--reference", str(labels), "-o", str(out / "result"),
            "--device", "cpu", "--threads", str(args.threads)]
    code = medseg_main(argv)
    if code != 0:
        raise SystemExit(f"medseg compare failed with exit status {code}")
    report = (out / "result" / "comparison.md").read_text(encoding="utf-8")
    ids = ", ".join(c.id for c in cases)
    shown = " ".join(shlex.quote(a) for a in ["medseg", *argv]).replace(str(labels), "$MEDSEG_DATA/psfhs/labels")
    body = (
        f"The {len(cases)} frames: PSFHS validation split (recipe `psfhs`, ID block 04350-04572, never used for training), "
        f"{args.frames} spread evenly over its {len(recipe.cases('val'))} frames: {ids}. The table below is `comparison.md` as "
        f"written by\n\n`{shown}`\n\n(the frames folder holds links to `$MEDSEG_DATA/psfhs/images/<ID>.png`). "
        "Costs were measured one model after another in one process on a shared CPU, so compare them as ratios.\n\n"
        "Where the packs come from (training commands from their manifests; these are the runs of \"Architectures tried\" above, "
        "and pack2-ultrasound-fhps continued the shipped pack's run for 30 more minutes at a lower learning rate and was not shipped):\n\n"
        f"{provenance(args.models.split(','))}\n\n{report}"
    )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(body) if args.no_write else write_section(SECTION, body, command)


if __name__ == "__main__":
    main()
