"""The ``medseg`` command: parse, call the core, report. Thin by design.

Exit codes: 0 success, 1 failure (one line on stderr), 2 bad usage, 130 interrupted.
A traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from medseg.errors import InputError, MedsegError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so every error takes the same path."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help').")


# --------------------------------------------------------------------------- helpers
def _progress_bar(desc: str):
    from tqdm import tqdm

    return tqdm(total=0, desc=desc, unit="tile", file=sys.stderr, leave=False, dynamic_ncols=True, disable=None)


def drive(job, desc: str = "working", unit: str = "tile"):
    """Run a progress generator with a terminal progress bar; return its result."""
    from medseg.engine.progress import run_sync

    bar = _progress_bar(desc)
    bar.unit = unit

    def update(event) -> None:
        if bar.total != event.total:
            bar.total = event.total
        bar.n = event.done
        bar.set_postfix_str(event.message[:40], refresh=False)
        bar.refresh()

    try:
        return run_sync(job, update)
    finally:
        bar.close()


def collect_inputs(inputs: Sequence[str], suffixes: Sequence[str]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted); missing paths are an error."""
    from medseg.io import stem_of

    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and any(f.name.lower().endswith(s) for s in suffixes))
            if not found:
                raise InputError(f"Folder '{p}' holds no images ({', '.join(suffixes)}): give image files or another folder.")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise InputError(f"'{p}' does not exist: check the path.")
    stems: dict[str, Path] = {}
    for f in files:
        s = stem_of(f)
        if s in stems:
            raise UsageError(f"'{f}' and '{stems[s]}' would both be written as '{s}': segment them into different output folders.")
        stems[s] = f
    return files


def _say(message: str) -> None:
    print(message, file=sys.stderr)


# --------------------------------------------------------------------------- segment
def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment images or frame stacks with a pack", description="Segment 2-D images or frame stacks; writes OUTDIR/<stem>.png (uint8 class values) or .tif for stacks.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    p.add_argument("--model", "-m", required=True, help="pack id or pack folder (see 'medseg models')")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--mpp", type=float, default=None, help="pixel size of the inputs in µm; they are resampled to the pack's and the masks written on the inputs' grid")
    _add_predict_options(p)
    p.set_defaults(run=_run_segment)


def _add_predict_options(p) -> None:
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    p.add_argument("--tile", type=int, default=None, help="tile size in pixels (default: the pack's)")
    p.add_argument("--overlap", type=float, default=None, help="tile overlap fraction in [0, 1) (default: the pack's)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average over the flips the pack was trained with (slower)")


def predict_config(args, pack):
    from medseg.engine import PredictConfig

    return PredictConfig(
        tile=args.tile if args.tile is not None else pack.tile,
        overlap=args.overlap if args.overlap is not None else pack.overlap,
        batch_size=args.batch_size,
        device=args.device,
        tta=args.tta,
    )


def segment_file(predictor, path: Path, outdir: str | os.PathLike, mpp: float | None = None):
    """Generator: segment one file and write OUTDIR/<stem>.png (.tif for stacks); returns (written path, prediction).

    The one per-input body of ``medseg segment``, also run by ``medseg batch`` workers."""
    from medseg.io import label_path, read_image, write_labels

    image = read_image(path)
    result = yield from predictor.predict_iter(image, mpp=mpp)
    return write_labels(label_path(outdir, path, result.labels), result.labels), result


def _run_segment(args) -> int:
    from medseg.engine import Predictor
    from medseg.io import IMAGE_SUFFIXES
    from medseg.train.packs import resolve

    files = collect_inputs(args.inputs, IMAGE_SUFFIXES)
    pack = resolve(args.model)
    predictor = Predictor(pack, predict_config(args, pack))
    failures = 0
    for f in files:
        try:
            out, result = drive(segment_file(predictor, f, args.output, mpp=args.mpp), desc=f.name)
            _say(f"{f.name} -> {out} ({result.seconds:.2f} s)")
        except MedsegError as exc:
            if len(files) == 1:
                raise
            failures += 1
            _say(f"error: {exc}")
    if failures:
        raise MedsegError(f"{failures} of {len(files)} inputs failed (see the messages above); the others were written.")
    return 0


# --------------------------------------------------------------------------- models / info
def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list architectures and packs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_run_models)


def _run_models(args) -> int:
    from medseg import models
    from medseg.train.packs import available_packs, pack_kind, read_manifest

    packs = []
    for pid, folder in available_packs(kind=None).items():
        try:
            m = read_manifest(folder)
        except MedsegError as exc:
            m = {"error": str(exc)}
        kind = pack_kind(folder) or "unreadable"
        packs.append(
            {
                "id": pid,
                "kind": kind,
                "path": str(folder),
                "architecture": m.get("architecture"),
                "config": m.get("config"),
                "in_channels": m.get("in_channels"),
                "classes": [c.get("name") for c in m.get("classes", [])],
                "interactive": m.get("interactive", False),
                "metrics": m.get("metrics", {}),
                "title": m.get("title", ""),
            }
        )
    archs = [{"name": n, "title": models.card(n).title, "paper": models.card(n).paper, "configs": list(models.card(n).configs), "task": models.card(n).task} for n in models.names()]
    if args.json:
        print(json.dumps({"packs": packs, "architectures": archs}, indent=2))
        return 0
    print("Packs (run these with --model):")
    for p in packs or [{"id": "(none found)", "architecture": "", "config": "", "classes": []}]:
        kind = "" if p.get("kind", "segmentation") == "segmentation" else f"  [{p['kind']}]"
        print(f"  {p['id']:<28} {p['architecture'] or ''}/{p['config'] or ''}  classes: {', '.join(p['classes'])}{kind}")
    print("\nArchitectures (train packs from these with 'medseg train'):")
    for a in archs:
        print(f"  {a['name']:<14} {a['title']}  [{', '.join(a['configs'])}]")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, devices, OpenSlide and Qt availability")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_run_info)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _run_info(args) -> int:
    import platform

    import medseg
    from medseg.engine.devices import available_devices

    try:
        import openslide

        openslide_status = f"available (openslide-python {openslide.__version__}, library {openslide.__library_version__})"
    except Exception as exc:  # noqa: BLE001 - report any failure to load
        openslide_status = f"not available ({type(exc).__name__}: {exc})"
    qt = next((f"{d} {_version(d)}" for d in ("PyQt6", "PySide6", "PyQt5", "PySide2") if _version(d)), None)
    info = {
        "medseg": medseg.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "napari": _version("napari") or "not installed (pip install 'napari-medseg[gui]')",
        "qt": qt or "not installed (GUI unavailable)",
        "openslide": openslide_status,
        "devices": available_devices(),
        "threads": __import__("torch").get_num_threads(),
        "models_path": os.environ.get("MEDSEG_MODELS", ""),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>12}: {', '.join(v) if isinstance(v, list) else v}")
    return 0


# --------------------------------------------------------------------------- train / evaluate
_TRAIN_FLAGS = {
    # flag: (TrainConfig key, type, help)
    "--dataset": ("dataset", str, "dataset recipe (psfhs, glomeruli, polyp) or a folder with images/ and masks/"),
    "--data-root": ("data_root", str, "folder holding the recipe data folders (default: $MEDSEG_DATA or ../shared/data)"),
    "--arch": ("arch", str, "architecture (see 'medseg models'; default unet)"),
    "--config": ("config", str, "network config: small (default, trains on a CPU) or full (as published)"),
    "--crop": ("crop", int, "training crop size in pixels (default: the recipe's)"),
    "--batch-size": ("batch_size", int, "crops per step (default: the recipe's)"),
    "--steps": ("steps", int, "optimiser steps"),
    "--epochs": ("epochs", float, "passes over the training split"),
    "--minutes": ("minutes", float, "time budget in minutes (the step count is fixed after timing a few steps)"),
    "--lr": ("lr", float, "peak learning rate of AdamW (default 1e-3)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (default 1e-4)"),
    "--warmup": ("warmup", float, "warm-up fraction of the steps (default 0.05)"),
    "--seed": ("seed", int, "random seed (default 0)"),
    "--device": ("device", str, "auto (default), cpu, cuda or mps"),
    "--workers": ("workers", int, "data loader processes (default 0 on CPU, 4 on GPU)"),
    "--val-every": ("val_every", int, "validate every N steps (default: 10 times per run)"),
    "--ckpt-every": ("ckpt_every", int, "checkpoint every N steps (default: at each validation)"),
    "--val-limit": ("val_limit", int, "validation cases used during training (default 48; the final report uses all)"),
    "--train-limit": ("train_limit", int, "use only N training cases (quick trials)"),
    "--train-sources": ("train_sources", lambda v: [x.strip() for x in v.split(",") if x.strip()], "train only on the training cases of these acquisition sources (comma-separated, e.g. ccf-hubmap)"),
    "--train-folder": ("train_folder", str, "train on this folder's images/ + masks/ instead of the recipe's training split (validation stays the recipe's)"),
    "--val-folder": ("val_folder", str, "validate and select on this folder's images/ + masks/ instead of the recipe's validation split"),
    "--augment-overrides": ("augment_overrides", json.loads, 'fields replaced on the recipe\'s augmentation, as JSON (e.g. \'{"hed": 0, "scale": [1, 1]}\')'),
    "--end-weight": ("end_weight", float, "extra cross-entropy weight at the two ends of a class's long axis (the farthest pair of its outline, which the AoP takes; default 0 = off)"),
    "--end-class": ("end_class", int, "class index whose long-axis ends --end-weight weights (default 1: the pubic symphysis of psfhs)"),
    "--end-radius": ("end_radius", float, "width (Gaussian sigma, pixels of the training crop) of the weighted spot at each end (default 4)"),
    "--keep": ("keep", str, "weights written to the pack: best (on validation, default) or last"),
    "--workdir": ("workdir", str, "folder for runs (default work/)"),
    "--run": ("run", str, "run name: checkpoints and logs go to WORKDIR/RUN (default DATASET-ARCH-CONFIG)"),
    "--pack-id": ("pack_id", str, "id of the written pack (default DATASET-ARCH-CONFIG)"),
    "--threads": ("threads", int, "CPU threads for torch"),
    "--init-from": ("init_from", str, "start from this pack's weights (id or folder): fine-tuning"),
    "--encoder-init": ("encoder_init", str, "start the network's encoder from an encoder pack written by 'medseg pretrain' (same architecture and config)"),
    "--arch-overrides": ("arch_overrides", json.loads, 'constructor arguments on top of --config, as JSON (e.g. \'{"dims": [32, 64, 128, 256]}\')'),
    "--mask-kind": ("mask_kind", str, "dataset folders: index (class values), binary or instance"),
    "--threshold": ("threshold", float, "dataset folders with binary masks: foreground is value > THRESHOLD"),
    "--interactive": ("interactive", str, "train a click-guided variant with this click encoding (disks): image + click disks + previous mask"),
}


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a network on a dataset and write a pack",
        description="Train with AdamW, a cosine schedule with warm-up and cross-entropy + soft Dice; validate, keep the best weights and write a pack. "
        "Options come from --config-file (JSON with the same names, underscores for dashes) and then from flags.",
    )
    p.add_argument("--config-file", metavar="JSON", help="training options as a JSON object (flags override it)")
    for flag, (key, typ, text) in _TRAIN_FLAGS.items():
        p.add_argument(flag, dest=f"train_{key}", type=typ, default=argparse.SUPPRESS, help=text)
    p.add_argument("--recipe", dest="train_dataset", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--classes", default=argparse.SUPPRESS, help="comma-separated class names, background first")
    p.add_argument("-o", "--output", dest="out", default=argparse.SUPPRESS, help="pack folder to write (default WORKDIR/RUN/pack)")
    p.add_argument("--resume", action="store_true", default=argparse.SUPPRESS, help="continue the run from its checkpoint")
    p.add_argument("--fresh", action="store_true", default=argparse.SUPPRESS, help="start the run over, replacing its checkpoint")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=argparse.SUPPRESS, help="no mixed precision on GPU")
    p.add_argument("--cpu-bf16", action="store_true", default=argparse.SUPPRESS, help="bf16 autocast on the CPU")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=argparse.SUPPRESS, help="train without augmentation")
    p.add_argument("--balance-sources", dest="balance_sources", action="store_true", default=argparse.SUPPRESS,
                   help="give every acquisition source (e.g. each glomeruli collection) an equal share of the training samples")
    p.set_defaults(run=_run_train)


def _train_command(args) -> str:
    import shlex

    given = vars(args)
    parts = ["medseg", "train"]
    if given.get("config_file"):
        parts += ["--config-file", given["config_file"]]
    for flag, (key, typ, _) in _TRAIN_FLAGS.items():
        if f"train_{key}" in given:
            value = given[f"train_{key}"]
            if isinstance(value, (dict, list)):
                value = json.dumps(value) if typ is json.loads else ",".join(map(str, value))
            parts += [flag, str(value)]
    for key, flag in (("classes", "--classes"), ("out", "--output")):
        if key in given:
            parts += [flag, str(given[key])]
    for key, flag, value in (("resume", "--resume", True), ("fresh", "--fresh", True), ("amp", "--no-amp", False), ("cpu_bf16", "--cpu-bf16", True), ("augment", "--no-augment", False), ("balance_sources", "--balance-sources", True)):
        if given.get(key, not value) == value:
            parts.append(flag)
    return shlex.join(parts)


def _run_train(args) -> int:
    from medseg.train.loop import TrainConfig, train_iter

    options = TrainConfig.from_json(args.config_file).to_dict() if args.config_file else {}
    for key in [k for _, (k, _, _) in _TRAIN_FLAGS.items()]:
        if hasattr(args, f"train_{key}"):
            options[key] = getattr(args, f"train_{key}")
    for key in ("out", "resume", "fresh", "amp", "cpu_bf16", "augment", "balance_sources"):
        if hasattr(args, key):
            options[key] = getattr(args, key)
    if hasattr(args, "classes"):
        options["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    options["command"] = _train_command(args)
    cfg = TrainConfig.from_dict(options)
    result = drive(train_iter(cfg), desc=f"train {cfg.run_name}", unit="step")
    _say(
        f"trained {result.steps} steps in {result.seconds / 60:.1f} min ({result.steps_per_minute:.1f} steps/min, {result.images_per_second:.2f} images/s); "
        f"best quick validation Dice {result.best_score:.3f} at step {result.best_step}"
    )
    if result.report is not None:
        from medseg.train.evaluate import to_markdown

        print(to_markdown(result.report))
    _say(f"pack written to {result.pack_path}")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a pack on a dataset split (Dice, IoU, HD95, ASD, object F1, AoP/HSD)",
        description="Predict every case of a split with the pack, exactly as 'medseg segment' would, and score it; prints a Markdown table "
        "and writes OUTDIR/<pack>-<dataset>-<split>.json and .md.",
    )
    p.add_argument("--model", "-m", required=True, help="pack id or pack folder")
    p.add_argument("--dataset", "--recipe", required=True, help="dataset recipe (psfhs, glomeruli, polyp) or a folder with images/ and masks/")
    p.add_argument("--split", default="val", help="split to score (default val; the held-out splits only for final numbers)")
    p.add_argument("--data-root", default=None, help="folder holding the recipe data folders (default: $MEDSEG_DATA or ../shared/data)")
    p.add_argument("--limit", type=int, default=None, help="score only N cases spread evenly over the split")
    p.add_argument("-o", "--output", default="work/eval", metavar="OUTDIR", help="folder for the JSON and Markdown reports (default work/eval)")
    p.add_argument("--iugc-grid", action="store_true", help="ultrasound: measure AoP/HSD on masks resized to 512 x 512 as the IUGC evaluator does")
    p.add_argument("--min-area-um2", type=float, default=None, help="drop predicted objects below this area before scoring object recipes (default: the recipe's; 0 disables)")
    p.add_argument("--classes", default=None, help="dataset folders: comma-separated class names, background first")
    p.add_argument("--mask-kind", default=None, help="dataset folders: index, binary or instance")
    p.add_argument("--threshold", type=float, default=None, help="dataset folders with binary masks: foreground is value > THRESHOLD")
    _add_predict_options(p)
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from medseg.train.datasets import evenly
    from medseg.train.evaluate import EvalOptions, evaluate_iter, to_markdown, write_report
    from medseg.train.packs import resolve
    from medseg.train.recipes import canonical_split, get_recipe

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    recipe = get_recipe(args.dataset, classes, args.mask_kind, args.threshold)
    pack = resolve(args.model)
    split = canonical_split(recipe, args.split)
    cases = evenly(recipe.cases(split, args.data_root), args.limit)
    if not cases:
        raise InputError(f"Split '{split}' of dataset '{recipe.name}' has no cases: choose another split.")
    options = EvalOptions(biometry_grid=512 if args.iugc_grid else None, min_object_area_um2=args.min_area_um2)
    report = drive(evaluate_iter(pack, recipe, cases, predict_config(args, pack), options, split=split), desc=f"evaluate {pack.id}", unit="image")
    js, md = write_report(report, args.output, f"{pack.id}-{recipe.name}-{split}")
    print(to_markdown(report))
    _say(f"reports written to {js} and {md}")
    return 0


# --------------------------------------------------------------------------- biometry
_MASK_SUFFIXES = (".png", ".tif", ".tiff", ".mha")


def _add_biometry(sub) -> None:
    from medseg.measure.ultrasound import DEFAULT_PACK, METHODS

    p = sub.add_parser(
        "biometry",
        help="intrapartum ultrasound: AoP and HSD of every frame into a CSV",
        description="Measure the angle of progression (AoP) and head-symphysis distance (HSD) of every frame of ultrasound images, "
        "DICOM files or videos, from a pack's segmentation (--model) or from label masks (--masks; 0 background, 1 pubic symphysis, "
        "2 fetal head). Writes one CSV row per frame: stem, frame, aop_deg, hsd_px, hsd_mm, status, reason, plane, method and the key points.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image, DICOM or video files, or folders of them (with --masks: optional, default every mask in DIR)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", "-m", help=f"pack id or pack folder that segments PS and FH (e.g. {DEFAULT_PACK})")
    source.add_argument("--masks", metavar="DIR", help="read label masks DIR/<stem>.png or .tif instead of running a model")
    p.add_argument("--csv", required=True, metavar="OUT.csv", help="the table to write")
    p.add_argument("--method", choices=METHODS, default="contour",
                   help="contour: the IUGC 2024 evaluator's rules (default); ellipse: the toolkit's ellipse-fit variant")
    p.add_argument("--spacing", metavar="MM[,MM]", help="pixel size in mm (one value, or row,col) where the files do not give it; HSD is then also in mm")
    p.add_argument("--grid", type=int, metavar="N", help="measure on label maps resized to N x N (nearest neighbour); 512 gives the IUGC evaluator's pixels")
    p.add_argument("--ps-value", type=int, default=1, help="--masks: label value of the pubic symphysis (default 1)")
    p.add_argument("--fh-value", type=int, default=2, help="--masks: label value of the fetal head (default 2)")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="--model: also write the segmentations as OUTDIR/<stem>.png (.tif for stacks)")
    _add_predict_options(p)
    p.set_defaults(run=_run_biometry)


def _parse_spacing(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise UsageError(f"--spacing '{text}' is not a pixel size: give one positive number in mm, or row,col (e.g. 0.2 or 0.2,0.25).")
    return values[0], values[1]


def _find_mask(folder: Path, stem: str) -> Path:
    for suffix in _MASK_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise InputError(f"No mask for '{stem}' in '{folder}': expected {stem}.png or {stem}.tif there.")


def biometry_file(path: Path, pack, config, method: str = "contour", spacing=None, grid: int | None = None, outdir=None):
    """Generator: segment and measure one image, DICOM or video (and write its labels into ``outdir`` when given);
    returns (UltrasoundResult, written labels path or None).

    The one per-input body of ``medseg biometry --model``, also run by ``medseg batch`` workers."""
    from medseg.io import label_path, read_image, stem_of, write_labels
    from medseg.measure.ultrasound import ultrasound_job

    image = read_image(path)
    result = yield from ultrasound_job(image, pack, config, method=method, stem=stem_of(path), spacing=spacing, grid=grid)
    written = write_labels(label_path(outdir, path, result.labels), result.labels) if outdir else None
    return result, written


def _run_biometry(args) -> int:
    from medseg.io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_image, read_labels, stem_of
    from medseg.measure.ultrasound import measure_frames, summary, write_csv

    if args.grid is not None and args.grid < 16:
        raise UsageError(f"--grid {args.grid} is too small: use at least 16 (512 for IUGC-comparable pixels).")
    spacing = _parse_spacing(args.spacing)
    rows = []
    failures = 0
    if args.masks is not None:
        folder = Path(args.masks)
        if not folder.is_dir():
            raise InputError(f"--masks '{folder}' is not a folder: give the folder that holds <stem>.png or <stem>.tif masks.")
        if args.inputs:
            jobs = [(stem_of(f), f) for f in collect_inputs(args.inputs, IMAGE_SUFFIXES)]
        else:
            jobs = [(stem_of(m), None) for m in collect_inputs([str(folder)], _MASK_SUFFIXES)]
        for stem, image_path in jobs:
            try:
                mask = read_labels(_find_mask(folder, stem))
                frame_spacing = spacing
                if frame_spacing is None and image_path is not None and image_path.suffix.lower() not in VIDEO_SUFFIXES:
                    frame_spacing = read_image(image_path).spacing
                found = measure_frames(mask, frame_spacing, args.method, stem, ps_value=args.ps_value, fh_value=args.fh_value, grid=args.grid)
                rows.extend(found)
                if len(jobs) <= 10 or not all(r.ok for r in found):
                    _say(f"{stem}: {summary(found)}")
            except MedsegError as exc:
                if len(jobs) == 1:
                    raise
                failures += 1
                _say(f"error: {exc}")
        total = len(jobs)
    else:
        from medseg.train.packs import resolve

        if not args.inputs:
            raise UsageError("Give the images, DICOM files or videos to measure (or --masks DIR to measure existing masks).")
        files = collect_inputs(args.inputs, IMAGE_SUFFIXES)
        pack = resolve(args.model)
        config = predict_config(args, pack)
        for f in files:
            try:
                result, _ = drive(biometry_file(f, pack, config, args.method, spacing, args.grid, args.output), desc=f.name)
                rows.extend(result.rows)
                if len(files) <= 10 or not all(r.ok for r in result.rows):
                    _say(f"{f.name}: {summary(result.rows)} ({result.seconds:.1f} s)")
            except MedsegError as exc:
                if len(files) == 1:
                    raise
                failures += 1
                _say(f"error: {exc}")
        total = len(files)
    out = write_csv(rows, args.csv)
    _say(f"{summary(rows)}; table written to {out}")
    if failures:
        raise MedsegError(f"{failures} of {total} inputs failed (see the messages above); the others are in the table.")
    return 0


# --------------------------------------------------------------------------- wsi
def _add_wsi(sub) -> None:
    p = sub.add_parser(
        "wsi",
        help="segment a whole slide into a zarr label pyramid (tissue only, resumable)",
        description="Run a pack over a whole slide (SVS, NDPI, MRXS, SCN, pyramidal TIFF/OME-TIFF) at the level closest to the pack's "
        "µm/px, only where there is tissue, streaming uint8 labels into OUT.zarr. Rerunning the same command resumes an interrupted run.",
    )
    p.add_argument("slide", metavar="SLIDE", help="the slide file")
    p.add_argument("--model", "-m", required=True, help="pack id or pack folder (see 'medseg models')")
    p.add_argument("-o", "--output", required=True, metavar="OUT.zarr", help="output zarr folder (label pyramid, confidence, tissue mask)")
    p.add_argument("--mpp", type=float, default=None, help="level-0 pixel size in µm, for slides that do not record it (or to override it)")
    p.add_argument("--level", type=int, default=None, help="pyramid level to run on (default: closest to the pack's µm/px)")
    p.add_argument("--assembly", choices=("blend", "vote"), default="blend", help="blend: weighted probabilities (default); vote: the KPIs baseline (>= 2 windows, spec §10.3)")
    p.add_argument("--no-tissue", dest="tissue", action="store_false", help="predict every tile, glass included")
    p.add_argument("--region", default=None, metavar="X,Y,W,H", help="only this level-0 rectangle (pixels)")
    p.add_argument("--min-area-um2", type=float, default=None, help="objects: drop components smaller than this (default: the pack's, else 0)")
    p.add_argument("--geojson", default=None, metavar="FILE", help="also write the objects as QuPath GeoJSON")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the object table as CSV")
    p.add_argument("--object-type", choices=("detection", "annotation"), default="detection", help="QuPath object type in the GeoJSON (default detection)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.zarr when it holds a different run")
    _add_predict_options(p)
    p.set_defaults(run=_run_wsi)


def _run_wsi(args) -> int:
    from medseg.engine.wsi import SlideConfig, segment_slide_iter
    from medseg.train.packs import resolve

    region = None
    if args.region:
        try:
            region = tuple(int(round(float(v))) for v in args.region.split(","))
        except ValueError:
            region = ()
        if len(region) != 4:
            raise UsageError(f"--region '{args.region}' must be four numbers X,Y,W,H (level-0 pixels).")
    pack = resolve(args.model)
    cfg = SlideConfig(tile=args.tile, overlap=args.overlap, batch_size=args.batch_size, device=args.device, assembly=args.assembly,
                      mpp=args.mpp, level=args.level, tissue=args.tissue, region=region, overwrite=args.overwrite, tta=args.tta)
    result = drive(segment_slide_iter(args.slide, pack, args.output, cfg), desc=Path(args.slide).name)
    mpp = f", {result.mpp:.3f} µm/px" if result.mpp else ""
    _say(f"{args.slide} -> {result.path}: level {result.level}{result.grid_note()} ({result.shape[1]} x {result.shape[0]} px{mpp}), "
         f"{result.tiles} tiles predicted ({result.tiles_tissue} of {result.tiles_grid} touch tissue) in {result.seconds:.1f} s")
    if args.geojson or args.csv or args.min_area_um2 is not None:
        objects = wsi_objects(result, pack, args.min_area_um2, args.csv, args.geojson, args.object_type)
        _say(f"{len(objects)} objects")
        if args.csv:
            _say(f"object table -> {Path(args.csv)}")
        if args.geojson:
            _say(f"GeoJSON -> {Path(args.geojson)}")
    return 0


def wsi_objects(result, pack, min_area_um2: float | None = None, csv=None, geojson=None, object_type: str = "detection") -> list:
    """The objects of a finished slide run, written as a CSV table and/or QuPath GeoJSON when paths are given.

    The one object export of ``medseg wsi``, also run by ``medseg batch`` workers."""
    from medseg.measure.objects import min_area_for, slide_objects, write_csv

    objects = slide_objects(result, min_area_um2=min_area_for(pack, min_area_um2))
    if csv:
        write_csv(objects, csv)
    if geojson:
        from medseg.io.geojson import write_geojson

        write_geojson(objects, geojson, result.classes, object_type=object_type, mpp=result.info.get("slide_mpp"))
    return objects


# --------------------------------------------------------------------------- main
# The feature modules' subcommands, as "module:function" (the function adds one parser; the module is
# imported when the parser is built, so a feature's own imports stay out of the others' way).
FEATURE_COMMANDS = (
    "medseg.batch:add_parser",
    "medseg.compare:add_parser",
    "medseg.interactive.command:add_parser",
    "medseg.annotate.cli:add_correct_parser",
    "medseg.annotate.cli:add_finetune_parser",
    "medseg.multiseq:add_parser",
    "medseg.pretrain.cli:add_parser",
    "medseg.train.average:add_parser",
)


def _feature_command(spec: str) -> Callable:
    module, function = spec.split(":")

    def add(sub) -> None:
        getattr(importlib.import_module(module), function)(sub)

    return add


# Each entry adds one subcommand.
SUBCOMMANDS: list[Callable] = [_add_segment, _add_models, _add_info, _add_train, _add_evaluate, _add_wsi, _add_biometry,
                               *map(_feature_command, FEATURE_COMMANDS)]


def build_parser() -> argparse.ArgumentParser:
    import medseg

    parser = _Parser(prog="medseg", description="Segmentation networks of recent medical-imaging papers, headless.")
    parser.add_argument("--version", action="version", version=f"medseg {medseg.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except MedsegError as exc:
        if debug:
            traceback.print_exc()
        print(f"medseg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("medseg: interrupted; nothing half-written was left behind.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback with --debug
        if debug:
            traceback.print_exc()
        print(f"medseg: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details and report it).", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
