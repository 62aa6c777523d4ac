"""The headless demo: segment the shipped sample images with their packs and write masks and overlays.

``python -m medseg.demo [OUTDIR]`` (``make demo`` without a display) writes, for every sample whose
suggested pack is installed, ``OUTDIR/<stem>_mask.png`` (class values) and ``OUTDIR/<stem>_overlay.png``
(the image with the coloured classes blended in and outlined), and says where. Samples whose pack is
not installed are skipped with one line; if none is installed nothing is written and it still exits 0.

The sample list (``resources/samples/samples.json``) is read here too by the napari plugin's sample
data, so both show the same images.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from medseg.errors import InputError, MedsegError

SAMPLES_JSON = "samples.json"


@dataclass(frozen=True)
class Sample:
    """One shipped sample image and what is known about it."""

    key: str
    path: Path
    title: str
    modality: str
    pack: str
    pixel_size: float | None = None
    pixel_unit: str | None = None
    source: str = ""
    licence: str = ""

    @property
    def stem(self) -> str:
        from medseg.io import stem_of

        return stem_of(self.path)


def samples_dir() -> Path:
    """``resources/samples`` of the installed package (or the source tree)."""
    from medseg.train.packs import resources_dir

    return resources_dir() / "samples"


def load_samples(folder: str | Path | None = None) -> list[Sample]:
    """The samples listed in ``samples.json`` (files that are missing are an error)."""
    folder = Path(folder) if folder is not None else samples_dir()
    index = folder / SAMPLES_JSON
    if not index.is_file():
        raise InputError(f"No sample list at '{index}': reinstall napari-medseg (the samples ship with it).")
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))["samples"]
        samples = [
            Sample(
                key=str(e["key"]),
                path=folder / e["file"],
                title=str(e.get("title", e["key"])),
                modality=str(e.get("modality", "")),
                pack=str(e.get("pack", "")),
                pixel_size=None if e.get("pixel_size") is None else float(e["pixel_size"]),
                pixel_unit=e.get("pixel_unit"),
                source=str(e.get("source", "")),
                licence=str(e.get("licence", "")),
            )
            for e in entries
        ]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"The sample list '{index}' is malformed ({type(exc).__name__}: {exc}): restore it from the repository.") from exc
    for s in samples:
        if not s.path.is_file():
            raise InputError(f"Sample '{s.key}' lists '{s.path.name}', which is missing from '{folder}': restore it from the repository.")
    return samples


def get_sample(key: str, folder: str | Path | None = None) -> Sample:
    for s in load_samples(folder):
        if s.key == key:
            return s
    raise InputError(f"There is no sample '{key}': choose one of {', '.join(s.key for s in load_samples(folder))}.")


def run_demo(
    outdir: str | Path,
    samples: Sequence[Sample] | None = None,
    pack: str | None = None,
    device: str = "auto",
    say: Callable[[str], None] = print,
) -> list[Path]:
    """Segment each sample with its pack (or ``pack`` for all) and write mask + overlay PNGs.

    Returns the written files. Samples whose pack is not installed are skipped; a sample that fails
    is reported and the others still run.
    """
    from medseg.engine import PredictConfig, Predictor, run_sync
    from medseg.io import read_image, write_labels
    from medseg.io.atomic import atomic_path
    from medseg.io.overlay import class_colours, render_overlay
    from medseg.train.packs import available_packs, resolve

    samples = list(samples) if samples is not None else load_samples()
    if pack is not None:
        samples = [replace(s, pack=pack) for s in samples]
    installed = available_packs()
    missing = sorted({s.pack for s in samples if s.pack not in installed and not Path(s.pack).is_dir()})
    runnable = [s for s in samples if s.pack not in missing]
    if not runnable:
        say(
            f"No pack for the sample images is installed yet ({', '.join(missing) or 'no samples'}): nothing was written; "
            "train one with 'medseg train' or add a folder of packs to MEDSEG_MODELS."
        )
        return []
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failures = 0
    predictors: dict[str, Predictor] = {}
    for s in runnable:
        try:
            if s.pack not in predictors:
                p = resolve(s.pack)
                predictors[s.pack] = Predictor(p, PredictConfig(tile=p.tile, overlap=p.overlap, device=device))
            predictor = predictors[s.pack]
            image = read_image(s.path)
            mpp = s.pixel_size if s.pixel_unit in ("µm", "um") else None
            result = run_sync(predictor.predict_iter(image, mpp=mpp))
            mask = write_labels(outdir / f"{s.stem}_mask.png", result.labels)
            overlay = render_overlay(image.array, result.labels, class_colours(result.classes), rgb=image.rgb)
            overlay_path = outdir / f"{s.stem}_overlay.png"
            import imageio.v3 as iio

            with atomic_path(overlay_path) as tmp:
                iio.imwrite(tmp, overlay, extension=".png")
            written += [mask, overlay_path]
            say(f"{s.path.name}: {predictor.pack.id} in {result.seconds:.1f} s -> {mask.name}, {overlay_path.name}")
        except MedsegError as exc:
            failures += 1
            say(f"{s.path.name}: error: {exc}")
    if missing:
        say(f"Skipped the samples for packs not installed yet: {', '.join(missing)}.")
    if written:
        say(f"Wrote {len(written) // 2} mask(s) and overlay(s) to {outdir.resolve()}")
    if failures:
        raise MedsegError(f"{failures} of {len(runnable)} samples failed (see the messages above); the others were written.")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medseg.demo", description="Segment the sample images headless; write masks and overlays.")
    parser.add_argument("outdir", nargs="?", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--pack", default=None, help="run this pack on every sample instead of each sample's own")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    args = parser.parse_args(argv)
    try:
        run_demo(args.outdir, pack=args.pack, device=args.device)
    except MedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
