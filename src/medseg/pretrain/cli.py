"""``medseg pretrain`` and ``medseg similar``: thin wrappers over :mod:`medseg.pretrain`."""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from pathlib import Path

from medseg.errors import UsageError

_PRETRAIN_OPTIONS = {
    # flag: (PretrainConfig key, type, help)
    "--method": ("method", str, "cmcgns (default: all CM-CGNS losses) or infonce (the global image-report loss alone)"),
    "--config": ("config", str, "U-Net config of the image encoder: small (default) or full; 'medseg train --arch unet --config' must match"),
    "--image-size": ("image_size", int, "side of the square images in pixels, a multiple of 16 (default 96)"),
    "--dim": ("dim", int, "width of the joint image-report space (default 128)"),
    "--batch-size": ("batch_size", int, "pairs per step (default 16)"),
    "--stage1-epochs": ("stage1_epochs", int, "epochs of stage I, alignment (default 10)"),
    "--stage2-epochs": ("stage2_epochs", int, "epochs of stage II, alignment + masked image reconstruction (default 20)"),
    "--lr": ("lr", float, "peak learning rate of AdamW (default 3e-4)"),
    "--clusters": ("clusters", int, "number of k-means centroids (default: sqrt(sentences)/2, between 2 and 128)"),
    "--val-fraction": ("val_fraction", float, "share of groups held out to choose the stage-II weights (default 0.1; 0 keeps the last weights)"),
    "--seed": ("seed", int, "random seed (default 42)"),
    "--device": ("device", str, "auto (default), cpu, cuda or mps"),
    "--threads": ("threads", int, "CPU threads for torch"),
    "--workdir": ("workdir", str, "folder for runs (default work/); checkpoints go to WORKDIR/pretrain/RUN"),
    "--run": ("run", str, "run name (default PAIRS-METHOD-unet-CONFIG)"),
    "--pack-id": ("pack_id", str, "id written into the encoder's manifest (default: the run name)"),
}


def _csv_columns(path: str) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []  # read_pairs reports the problem in full


def _group_col(args) -> str | None:
    """--group-col as given; by default 'patientid' when the CSV has it, else every row is its own group."""
    if args.group_col is not None:
        return args.group_col or None
    return "patientid" if "patientid" in _csv_columns(args.pairs) else None


def _say(message: str) -> None:
    print(message, file=sys.stderr)


# --------------------------------------------------------------------------- pretrain
def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain an image encoder on image-report pairs (CM-CGNS) and write an encoder pack",
        description="CM-CGNS: stage I aligns images and reports (global InfoNCE, local image loss, local report loss with cluster-guided "
        "negative sampling), stage II adds cross-modal masked image reconstruction. The image encoder is the U-Net's; use the "
        "result with 'medseg train --arch unet --encoder-init DIR' or index an archive with 'medseg similar --build'.",
    )
    p.add_argument("--pairs", required=True, metavar="FILE.csv", help="CSV with one image-report pair per row (image paths may be relative to the CSV)")
    p.add_argument("--image-col", default="image", help="column of image paths (default image)")
    p.add_argument("--text-col", default="text", help="column of report texts (default text)")
    p.add_argument("--group-col", default=None, help="column tying images of one patient together (default patientid when present; '' for none)")
    p.add_argument("-o", "--output", required=True, metavar="ENCODER_DIR", help="encoder pack folder to write")
    for flag, (key, typ, text) in _PRETRAIN_OPTIONS.items():
        p.add_argument(flag, dest=f"pt_{key}", type=typ, default=argparse.SUPPRESS, help=text)
    p.add_argument("--resume", action="store_true", help="continue the run from its checkpoint")
    p.add_argument("--fresh", action="store_true", help="start the run over, replacing its checkpoint")
    p.set_defaults(run=_run_pretrain)


def _pretrain_command(args, options: dict) -> str:
    """The command line that reproduces this run (recorded in the encoder's manifest)."""
    parts = ["medseg", "pretrain", "--pairs", args.pairs, "--image-col", args.image_col, "--text-col", args.text_col]
    if args.group_col is not None:
        parts += ["--group-col", args.group_col]
    parts += ["-o", args.output]
    flags = {key: flag for flag, (key, _, _) in _PRETRAIN_OPTIONS.items()}
    for key, value in options.items():
        parts += [flags[key], str(value)]
    parts += [flag for flag, on in (("--resume", args.resume), ("--fresh", args.fresh)) if on]
    return shlex.join(parts)


def _run_pretrain(args) -> int:
    from medseg.cli import drive
    from medseg.pretrain.train import PretrainConfig, pretrain_iter

    options = {key: getattr(args, f"pt_{key}") for _, (key, _, _) in _PRETRAIN_OPTIONS.items() if hasattr(args, f"pt_{key}")}
    cfg = PretrainConfig(
        pairs=args.pairs, image_col=args.image_col, text_col=args.text_col, group_col=_group_col(args), out=args.output,
        resume=args.resume, fresh=args.fresh, command=_pretrain_command(args, options), **options,
    )
    result = drive(pretrain_iter(cfg), desc=f"pretrain {cfg.run_name}", unit="step")
    last = result.history[-1] if result.history else {}
    _say(
        f"pretrained {result.steps} steps in {result.seconds / 60:.1f} min ({cfg.method}); last epoch loss {last.get('total', float('nan')):.3f}"
        + (f", clusters from step {result.cluster_start_step}" if result.cluster_start_step else "")
    )
    _say(f"encoder pack written to {result.pack_path}")
    return 0


# --------------------------------------------------------------------------- similar
def _parse_region(text: str | None) -> tuple[int, int, int, int] | None:
    if not text:
        return None
    try:
        y0, x0, y1, x1 = (int(float(v)) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--region '{text}' is not four numbers Y0,X0,Y1,X1 (top, left, bottom, right in pixels).") from None
    if y1 <= y0 or x1 <= x0:
        raise UsageError(f"--region '{text}' is empty: give top,left,bottom,right with bottom > top and right > left.")
    return y0, x0, y1, x1


def _add_similar(sub) -> None:
    p = sub.add_parser(
        "similar",
        help="find the archived cases most similar to an image (or build the index of an archive)",
        description="Query: 'medseg similar IMAGE --index DIR -k 5' prints the k most similar archived cases (score, finding, image, report). "
        "Build: 'medseg similar --build --pairs FILE.csv --encoder ENCODER_DIR --index DIR' embeds every pair of the archive with a "
        "pretrained encoder ('medseg pretrain') and writes the index folder.",
    )
    p.add_argument("image", nargs="?", metavar="IMAGE", help="the image to find similar cases for")
    p.add_argument("--index", required=True, metavar="DIR", help="index folder (written by --build)")
    p.add_argument("-k", type=int, default=5, help="number of cases (default 5)")
    p.add_argument("--region", default=None, metavar="Y0,X0,Y1,X1", help="search with this region of the image only (pixels: top,left,bottom,right)")
    p.add_argument("--by", choices=["image", "report"], default="image", help="compare with the archived images (default) or, across modalities, their reports")
    p.add_argument("--json", action="store_true", help="print the cases as JSON")
    b = p.add_argument_group("building an index")
    b.add_argument("--build", action="store_true", help="build the index instead of querying it")
    b.add_argument("--pairs", metavar="FILE.csv", help="archive of image-report pairs to index")
    b.add_argument("--encoder", metavar="ENCODER_DIR", help="encoder pack written by 'medseg pretrain'")
    b.add_argument("--image-col", default="image", help="column of image paths (default image)")
    b.add_argument("--text-col", default="text", help="column of report texts (default text)")
    b.add_argument("--group-col", default=None, help="column of patient ids (default patientid when present)")
    b.add_argument("--finding-col", default="finding", help="column shown as the case's finding (default finding; '' for none)")
    p.set_defaults(run=_run_similar)


def _run_similar(args) -> int:
    from medseg.cli import drive

    if args.build:
        from medseg.pretrain.data import read_pairs
        from medseg.pretrain.retrieval import build_index_iter

        if not args.pairs or not args.encoder:
            raise UsageError("Building an index needs --pairs FILE.csv and --encoder ENCODER_DIR.")
        if args.image:
            raise UsageError("Give either IMAGE (to query) or --build (to index an archive), not both.")
        finding = args.finding_col or None
        if finding and finding not in _csv_columns(args.pairs):
            finding = None
        records = read_pairs(args.pairs, args.image_col, args.text_col, _group_col(args))
        out = drive(build_index_iter(args.encoder, records, args.index, finding), desc="indexing", unit="step")
        _say(f"indexed {len(records)} cases into {out}")
        return 0
    if not args.image:
        raise UsageError("Give the IMAGE to find similar cases for (or --build to index an archive).")
    from medseg.io import read_image
    from medseg.pretrain.retrieval import similar_iter

    image = read_image(args.image)
    cases = drive(similar_iter(args.index, image.array, image.rgb, args.k, _parse_region(args.region), args.by, f"'{Path(args.image).name}'"),
                  desc="searching", unit="step")
    if args.json:
        print(json.dumps([c.to_dict() for c in cases], indent=2))
        return 0
    for c in cases:
        text = c.text if len(c.text) <= 160 else c.text[:157] + "..."
        print(f"{c.rank}\t{c.score:.3f}\t{c.finding or '-'}\t{c.image}\t{text}")
    return 0


def add_parser(sub) -> None:
    """Register ``pretrain`` and ``similar``."""
    _add_pretrain(sub)
    _add_similar(sub)


__all__ = ["add_parser"]
