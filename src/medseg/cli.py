"""The ``medseg`` command: parse, call the core, report. Thin by design.

Exit codes: 0 success, 1 failure (one line on stderr), 2 bad usage, 130 interrupted.
A traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
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
    _add_predict_options(p)
    p.set_defaults(run=_run_segment)


def _add_predict_options(p) -> None:
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    p.add_argument("--tile", type=int, default=None, help="tile size in pixels (default: the pack's)")
    p.add_argument("--overlap", type=float, default=None, help="tile overlap fraction in [0, 1) (default: the pack's)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")


def predict_config(args, pack):
    from medseg.engine import PredictConfig

    return PredictConfig(
        tile=args.tile if args.tile is not None else pack.tile,
        overlap=args.overlap if args.overlap is not None else pack.overlap,
        batch_size=args.batch_size,
        device=args.device,
    )


def _run_segment(args) -> int:
    from medseg.engine import Predictor
    from medseg.io import IMAGE_SUFFIXES, label_path, read_image, write_labels
    from medseg.train.packs import resolve

    files = collect_inputs(args.inputs, IMAGE_SUFFIXES)
    pack = resolve(args.model)
    predictor = Predictor(pack, predict_config(args, pack))
    failures = 0
    for f in files:
        try:
            image = read_image(f)
            result = drive(predictor.predict_iter(image), desc=f.name)
            out = write_labels(label_path(args.output, f, result.labels), result.labels)
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
    from medseg.train.packs import available_packs, read_manifest

    packs = []
    for pid, folder in available_packs().items():
        try:
            m = read_manifest(folder)
        except MedsegError as exc:
            m = {"error": str(exc)}
        packs.append(
            {
                "id": pid,
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
        print(f"  {p['id']:<28} {p['architecture'] or ''}/{p['config'] or ''}  classes: {', '.join(p['classes'])}")
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


# --------------------------------------------------------------------------- main
# Each entry adds one subcommand; feature modules contribute theirs here.
SUBCOMMANDS: list[Callable] = [_add_segment, _add_models, _add_info]


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
