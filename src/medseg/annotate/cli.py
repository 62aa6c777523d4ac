"""``medseg correct`` and ``medseg finetune``: correction sessions from the command line.

``medseg correct IMAGE --pack/--mask/--geojson`` starts (or reopens) the session of an image and
opens napari with the Correct dock on it; with ``--export`` it writes the corrected mask, GeoJSON,
effort log and summary without a viewer. ``medseg finetune --pack NAME --session DIR`` trains the
pack on corrected sessions and writes a new pack version.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from medseg.errors import InputError, UsageError

GUI_MODULE = "napari_medseg._widgets.correct"


def add_correct_parser(sub) -> None:
    p = sub.add_parser(
        "correct",
        help="review and correct predicted objects (napari), or export a correction session",
        description="Start or reopen the correction session of an image (the folder <stem>.correct next to it) and open napari with the Correct dock. "
        "The objects come from a model pack, a mask file or QuPath GeoJSON; every edit is journalled, so nothing is lost if the viewer or the machine stops.",
    )
    p.add_argument("image", nargs="?", help="the image (or whole slide, with --region) to correct")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pack", help="predict the objects with this pack (least sure first, by mean foreground probability)")
    src.add_argument("--mask", help="the objects as a mask file (instance ids, or a binary mask split into connected objects)")
    src.add_argument("--geojson", help="the objects as QuPath GeoJSON (level-0 pixel coordinates)")
    p.add_argument("--region", help="x,y,width,height in level-0 pixels: a region of a whole slide (or of a large image)")
    p.add_argument("--mpp", type=float, help="µm per pixel of the image, when the file does not say (the pack then runs at its own pixel size)")
    p.add_argument("--session", help="session folder (default: <image stem>.correct next to the image)")
    p.add_argument("--export", metavar="FOLDER", help="write the outputs into FOLDER without opening a viewer")
    p.add_argument("--formats", default="tif,geojson,csv,summary", help="outputs for --export: tif, zarr, geojson, csv, summary (default tif,geojson,csv,summary)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps, for --pack")
    p.set_defaults(run=run_correct)


def run_correct(args) -> int:
    from medseg.annotate.sources import open_session_iter, parse_region
    from medseg.cli import _say, drive

    if args.image is None and args.session is None:
        raise UsageError("Give the image to correct, or --session with the folder of an existing session.")
    if args.image is not None and not Path(args.image).exists():
        raise InputError(f"'{args.image}' does not exist: check the path.")
    config = None
    if args.pack:
        from medseg.engine import PredictConfig
        from medseg.train.packs import load_pack

        pack = load_pack(args.pack)
        config = PredictConfig(tile=pack.tile, overlap=pack.overlap, device=args.device)
    job = open_session_iter(args.image, args.session, mask=args.mask, geojson=args.geojson, pack=args.pack, region=parse_region(args.region), mpp=args.mpp, config=config)
    session = drive(job, desc="opening")
    try:
        counts = session.counts()
        what = "reopened" if session.replayed else "started"
        _say(f"{what} {session.folder}: {counts['total']} objects, {counts['reviewed']} reviewed ({counts['accepted']} accepted, {counts['edited']} edited, "
             f"{counts['rejected']} rejected, {counts['added']} added)")
        if args.export:
            from medseg.annotate.export import export, summary

            written = export(session, args.export, [f.strip() for f in args.formats.split(",") if f.strip()])
            for kind, path in written.items():
                _say(f"{kind}: {path}")
            s = summary(session)
            _say(f"mean Dice model -> corrected {s['mean_dice_original_to_final']:.3f} over {s['objects_model']} model objects; {s['edits']} edits, {s['seconds']:.0f} s")
            return 0
        folder = session.folder
    finally:
        session.close()
    if importlib.util.find_spec("napari") is None or importlib.util.find_spec("napari_medseg") is None:
        raise UsageError("napari is not installed: install the GUI extra (pip install 'napari-medseg[gui]'), or use --export to write the outputs without a viewer.")
    return subprocess.call([sys.executable, "-m", GUI_MODULE, str(folder)])


def add_finetune_parser(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pack on corrected sessions and write a new pack version",
        description="Train a pack further on the images and corrected masks of correction sessions (its own training loop, starting from its weights, "
        "by default mixed half and half with the pack's training split, batch-norm statistics kept), validate on held-out correction sessions (--val-session) or else on the pack's validation split, "
        "and write a new pack version whose manifest holds its validation numbers next to the previous version's (with held-out sessions, the pack's validation split is measured before and after as well).",
    )
    p.add_argument("--pack", required=True, help="the pack to fine-tune (id or folder)")
    p.add_argument("--session", nargs="+", required=True, metavar="DIR", help="correction session folders (or folders holding them)")
    p.add_argument("--val-session", nargs="+", metavar="DIR", help="held-out correction sessions to validate and select on (never trained on); default: the pack's validation split")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--minutes", type=float, help="training time budget (instead of --steps)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--augment", choices=("light", "recipe", "none"), default="light",
                   help="light: flips and 90-degree turns only (default); recipe: the pack's training augmentation (scale, stain, crops on objects); none")
    p.add_argument("--crop", type=int, help="training crop in pixels at the pack's µm/px (default: the pack's tile, so whole tiles where they fit)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--no-replay", dest="replay", action="store_false", help="train on the corrected tiles only (default: half the samples from the pack's training split)")
    p.add_argument("--adapt-norm", dest="freeze_norm", action="store_false", help="let batch-norm statistics follow the new tiles (default: kept; adapt them for a new tissue or scanner)")
    p.add_argument("--workdir", default="work", help="folder for the run (default work/)")
    p.add_argument("--data-root", help="folder holding the pack's dataset (default MEDSEG_DATA or ../shared/data)")
    p.add_argument("-o", "--output", help="pack folder to write (default WORKDIR/packs/<pack>-<version>)")
    p.set_defaults(run=run_finetune)


def run_finetune(args) -> int:
    from medseg.annotate.finetune import finetune_iter
    from medseg.cli import _say, drive

    job = finetune_iter(args.pack, args.session, out=args.output, steps=args.steps, minutes=args.minutes, lr=args.lr, threads=args.threads,
                        workdir=args.workdir, data_root=args.data_root, replay=args.replay, freeze_norm=args.freeze_norm, val_sessions=args.val_session, augment=args.augment, crop=args.crop)
    r = drive(job, desc=f"finetune {args.pack}", unit="step")
    _say(f"pack {r.pack_path} (version {r.version}): {r.steps} steps on {r.tiles} corrected tile(s) in {r.seconds:.0f} s")
    _say(f"validation loss on {r.validation}: {r.val_loss_before:.4f} -> {r.val_loss_after:.4f}")
    old, new = r.previous.get("metrics", {}), r.metrics
    for key in ("dice", "iou"):
        for name, value in (new.get(key) or {}).items():
            before = (old.get(key) or {}).get(name)
            _say(f"{key} {name}: {before if before is not None else 'n/a'} -> {value}")
    if "object_f1" in new:
        _say(f"object F1: {old.get('object_f1', 'n/a')} -> {new['object_f1']}")
    if r.reference:
        ref = r.reference
        _say(f"on the {ref['dataset']} validation split ({ref['cases']} cases): loss {ref['validation_loss_before']:.4f} -> {ref['validation_loss_after']:.4f}, "
             f"Dice {ref['metrics_before'].get('dice')} -> {ref['metrics_after'].get('dice')}")
    return 0


__all__ = ["add_correct_parser", "add_finetune_parser", "run_correct", "run_finetune"]
