"""Multi-sequence cardiac MRI: segment a study from whichever of its sequences (C0, LGE, T2) are present.

A *study* is one to three co-registered volumes on one grid (NIfTI voxel order ``(X, Y, Z)``, axis 2
across the short-axis slices). :func:`segment_study_iter` runs a multi-sequence pack slice by slice:
each present sequence's slice is z-scored, brought to the pack's pixel size, and the network gets the
availability of every sequence (DMAF-Net removes the absent ones; a plain network gets them as zeros);
class probabilities go back to the input's grid before the arg-max, so the label volume has the
input's geometry and the pack's label values (MyoPS: 0, 200, 500, 600, 1220, 2221).

Sequences that do not share one grid, or no sequence at all, are refused with one sentence.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from medseg.engine.progress import CancelToken, Job, Progress, check_cancel
from medseg.errors import InputError, ModelError
from medseg.normalise import Normaliser, check_not_constant
from medseg.resample import resample_image

SEQUENCES = ("C0", "LGE", "T2")
SEQUENCE_TITLES = {"C0": "bSSFP cine (C0)", "LGE": "late gadolinium enhancement (LGE)", "T2": "T2-weighted"}
_ALIASES = {"c0": "C0", "bssfp": "C0", "lge": "LGE", "de": "LGE", "t2": "T2"}
DEFAULT_SPACING_MM = 1.5  # in-plane pixel size the shipped pack works at


def canonical_sequence(name: str) -> str:
    """'de', 'lge', 'LGE' -> 'LGE'; unknown names are a usage error."""
    try:
        return _ALIASES[name.lower()]
    except KeyError:
        raise InputError(f"Unknown sequence '{name}': use one of {', '.join(SEQUENCES)}.") from None


# --------------------------------------------------------------------------- studies
@dataclass
class Study:
    """Co-registered sequences of one study on one grid; absent sequences are ``None``."""

    volumes: dict[str, np.ndarray | None]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine: np.ndarray | None = None
    header: Any = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def present(self) -> list[str]:
        return [s for s, v in self.volumes.items() if v is not None]

    @property
    def shape(self) -> tuple[int, int, int]:
        return next(v.shape for v in self.volumes.values() if v is not None)


def _no_sequence(hint: str) -> InputError:
    return InputError(f"No sequence given: {hint}")


def _check_shapes(volumes: Mapping[str, np.ndarray], sources: Mapping[str, str]) -> None:
    names = list(volumes)
    first = names[0]
    for other in names[1:]:
        if volumes[other].shape != volumes[first].shape:
            raise InputError(
                f"{other} ({sources.get(other, other)}) has shape {volumes[other].shape} but {first} ({sources.get(first, first)}) has "
                f"{volumes[first].shape}: the sequences of a study must share one grid; resample them onto one grid first."
            )


def load_study(paths: Mapping[str, str | os.PathLike | None]) -> Study:
    """Read the given sequence files (NIfTI) and check that they share one grid (shape and affine)."""
    from medseg.io.nifti import read_nifti

    given = {canonical_sequence(k): Path(p) for k, p in paths.items() if p}
    if not given:
        raise _no_sequence(f"give at least one of {', '.join(SEQUENCES)} (--c0, --lge, --t2).")
    vols = {s: read_nifti(p) for s, p in given.items()}
    sources = {s: p.name for s, p in given.items()}
    arrays = {s: v.array for s, v in vols.items()}
    _check_shapes(arrays, sources)
    first = next(iter(vols))
    for s, v in vols.items():
        worst = float(np.abs(v.affine - vols[first].affine).max())
        if worst > 1e-3:
            raise InputError(
                f"{s} ({sources[s]}) and {first} ({sources[first]}) lie on different grids (their voxel-to-world affines differ by up to "
                f"{worst:.3g} mm): the sequences of a study must be co-registered on one grid; register or resample them first."
            )
    ref = vols[first]
    return Study({s: arrays.get(s) for s in SEQUENCES}, ref.spacing, ref.affine, ref.header, sources)


def study_files(folder: str | os.PathLike) -> dict[str, Path]:
    """The sequence files of a study folder, by name: ``C0.nii.gz``, ``DE``/``LGE``, ``T2`` (also at the end
    of a longer name, e.g. ``myops_training_101_DE.nii.gz``); other NIfTI files (label maps) are ignored."""
    from medseg.io.nifti import NIFTI_SUFFIXES, is_nifti

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"'{folder}' is not a folder: give a study folder holding its C0 / LGE (DE) / T2 NIfTI files.")
    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if not (f.is_file() and is_nifti(f)):
            continue
        stem = f.name[: -len(next(x for x in NIFTI_SUFFIXES[::-1] if f.name.lower().endswith(x)))]
        key = stem.lower().rsplit("_", 1)[-1]
        if key not in _ALIASES:
            continue
        seq = _ALIASES[key]
        if seq in found:
            raise InputError(f"Study folder '{folder}' holds two {seq} files ({found[seq].name}, {f.name}): keep one per sequence.")
        found[seq] = f
    if not found:
        raise _no_sequence(f"study folder '{folder}' holds no NIfTI file named after a sequence (C0, LGE or DE, T2).")
    return found


def segment_study_file_iter(paths: Mapping[str, str | os.PathLike | None], pack: Any, output: str | os.PathLike, device: str = "cpu",
                            cancel: CancelToken | None = None, tta: bool = False) -> Job[tuple[Path, MultiseqResult]]:
    """Read a study's sequence files, segment it and write the label volume: what ``medseg multiseq`` does."""
    from medseg.io.nifti import is_nifti

    if not is_nifti(output):
        raise InputError(f"'{output}' is not a NIfTI name: end the output file in .nii.gz or .nii.")
    study = load_study(paths)
    result = yield from segment_study_iter(study, pack, device, cancel, tta=tta)
    return write_label_volume(output, result, study), result


def study_from_arrays(arrays: Mapping[str, np.ndarray | None], spacing: tuple[float, ...] | Mapping[str, tuple[float, ...]] | None = None,
                      sources: Mapping[str, str] | None = None, affine: np.ndarray | Mapping[str, np.ndarray | None] | None = None,
                      header: Any = None, hint: str = "assign at least one image to C0, LGE or T2.") -> Study:
    """A study from arrays ``(X, Y, Z)`` (2-D arrays are one slice); checks that they share one grid.

    ``spacing`` and ``affine`` may be given once for the study or per sequence (then they must agree).
    """
    sources = dict(sources or {})
    given: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        if arr is None:
            continue
        a = np.asarray(arr)
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3:
            raise InputError(f"{canonical_sequence(name)} ({sources.get(name, name)}) has shape {a.shape}: give a grey 2-D slice or a 3-D volume.")
        given[canonical_sequence(name)] = a
        sources.setdefault(canonical_sequence(name), name)
    if not given:
        raise _no_sequence(hint)
    _check_shapes(given, sources)
    spacing = _one_per_study(spacing, given, sources, "voxel spacings", lambda v: tuple(float(x) for x in v))
    affine = _one_per_study(affine, given, sources, "voxel-to-world affines", lambda v: np.asarray(v, dtype=np.float64))
    sp = tuple(float(s) for s in (spacing if spacing is not None else (1.0, 1.0, 1.0)))
    sp = sp + (1.0,) * (3 - len(sp))
    return Study({s: given.get(s) for s in SEQUENCES}, sp[:3], affine, header, sources)


def _one_per_study(value: Any, given: Mapping[str, np.ndarray], sources: Mapping[str, str], what: str, convert) -> Any:
    """A per-sequence mapping reduced to one value, refusing sequences that disagree (1e-3 tolerance)."""
    if value is None or not isinstance(value, Mapping):
        return value
    known = {canonical_sequence(k): convert(v) for k, v in value.items() if v is not None and canonical_sequence(k) in given}
    if not known:
        return None
    first = next(iter(known))
    for s, v in known.items():
        ref = known[first]
        if np.shape(v) != np.shape(ref) or not np.allclose(v, ref, atol=1e-3):
            raise InputError(
                f"{s} ({sources.get(s, s)}) and {first} ({sources.get(first, first)}) have different {what}: the sequences of a study "
                "must be co-registered on one grid; register or resample them first."
            )
    return known[first]


# --------------------------------------------------------------------------- slices for the network
_ZSCORE = Normaliser("zscore")


def prepare_slice(image: np.ndarray, spacing_xy: tuple[float, float], target_spacing: float | None) -> np.ndarray:
    """One slice z-scored (mean/std over the slice) and resampled to ``target_spacing`` mm, float32 (h, w)."""
    frame = np.asarray(image, dtype=np.float32)[..., None]
    x = _ZSCORE.apply(frame, _ZSCORE.frame_stats(frame))[0]
    if target_spacing:
        shape = (max(1, round(x.shape[0] * spacing_xy[0] / target_spacing)), max(1, round(x.shape[1] * spacing_xy[1] / target_spacing)))
        x = resample_image(x, shape)
    return x


def model_grid(shape_xy: tuple[int, int], spacing_xy: tuple[float, float], target_spacing: float | None) -> tuple[int, int]:
    if not target_spacing:
        return tuple(shape_xy)  # type: ignore[return-value]
    return (max(1, round(shape_xy[0] * spacing_xy[0] / target_spacing)), max(1, round(shape_xy[1] * spacing_xy[1] / target_spacing)))


def network_logits(model: Any, x: Any, present: Any) -> Any:
    """Logits of a multi-sequence network: DMAF-Net takes the availability; others get absent inputs as zeros."""
    import torch

    from medseg.models.dmafnet import DMAFNet

    if isinstance(model, DMAFNet):
        return model(x, present)
    return model(torch.where(present[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device)))


# --------------------------------------------------------------------------- running a pack
@dataclass
class MultiseqResult:
    """A label volume on the study's grid (pack label values) and what produced it."""

    labels: np.ndarray  # (X, Y, Z), uint16
    classes: list[Any]
    used: list[str]
    weights: dict[str, float]  # mean fusion weight per used sequence (DMAF-Net), empty otherwise
    pack_id: str
    seconds: float
    flips: int = 0  # mirror images averaged besides the slice itself (test-time augmentation)

    def notice(self) -> str:
        absent = [s for s in SEQUENCES if s not in self.used]
        text = f"Used {', '.join(self.used)}" + (f" ({', '.join(absent)} absent)" if absent else " (all three)")
        if self.weights:
            text += "; fusion weights " + ", ".join(f"{s} {w:.2f}" for s, w in self.weights.items())
        if self.flips:
            text += f"; averaged over {self.flips + 1} mirror images"
        return text + "."


def pack_sequences(pack: Any) -> list[str]:
    seqs = pack.manifest.get("sequences")
    if not seqs:
        raise ModelError(f"Pack '{pack.id}' is not a multi-sequence pack (its manifest names no 'sequences'): choose a pack such as cardiac-myops.")
    return [canonical_sequence(s) for s in seqs]


def segment_study_iter(study: Study, pack: Any, device: str = "cpu", cancel: CancelToken | None = None, tta: bool = False) -> Job[MultiseqResult]:
    """Generator: one :class:`Progress` per slice; returns the :class:`MultiseqResult`.

    With ``tta`` the class probabilities of each slice are the mean over the slice and its mirror
    images (each flipped back): only the flips the pack was trained with
    (:func:`medseg.engine.predictor.tta_flips`), so a pack trained without flips is run once.
    """
    import torch

    from medseg.engine.devices import resolve_device
    from medseg.engine.predictor import tta_flips
    from medseg.models.dmafnet import DMAFNet
    from medseg.train.packs import resolve

    t0 = time.perf_counter()
    pack = resolve(pack)
    seqs = pack_sequences(pack)
    used = [s for s in seqs if study.volumes.get(s) is not None]
    if not used:
        raise InputError(f"None of the study's sequences ({', '.join(study.present) or 'none'}) is one pack '{pack.id}' takes ({', '.join(seqs)}).")
    for s in used:
        check_not_constant(study.volumes[s], f"{s} ({study.sources.get(s, s)})")
    dev = resolve_device(device)
    model = pack.model.to(dev).eval()
    flips = tta_flips(pack) if tta else ()
    target = pack.manifest.get("spacing_mm")
    values = np.array([c.value for c in pack.classes], dtype=np.int64)
    if values.max(initial=0) > np.iinfo(np.uint16).max:
        raise ModelError(f"Pack '{pack.id}' has label values above 65535: re-export it with smaller values.")
    nx, ny, nz = study.shape
    spacing_xy = (float(study.spacing[0]), float(study.spacing[1]))
    labels = np.zeros((nx, ny, nz), dtype=np.uint16)
    present = torch.tensor([[s in used for s in seqs]], device=dev)
    weight_sum = np.zeros(len(seqs))
    fusion = isinstance(model, DMAFNet)

    def probabilities(xt):
        """Class probabilities (1, C, h, w) of one slice, and DMAF-Net's fusion weights (mean over the views)."""
        views, weights = [(), *flips], []
        total = None
        for dims in views:
            xv = xt.flip(dims) if dims else xt
            if fusion:
                out = model.forward_fusion(xv, present)
                logits = out.logits
                weights.append(out.weights[0].float().cpu().numpy())
            else:
                logits = network_logits(model, xv, present)
            p = torch.softmax(logits.float(), dim=1)
            p = p.flip(dims) if dims else p
            total = p if total is None else total + p
        return total / len(views), (np.mean(weights, axis=0) if weights else None)

    yield Progress(0, nz, f"{pack.id}: {', '.join(used)}")
    with torch.inference_mode():
        h, w = model_grid((nx, ny), spacing_xy, target)
        for k in range(nz):
            check_cancel(cancel)
            x = np.zeros((1, len(seqs), h, w), dtype=np.float32)
            for i, s in enumerate(seqs):
                if s in used:
                    x[0, i] = prepare_slice(study.volumes[s][:, :, k], spacing_xy, target)
            p, fw = probabilities(torch.from_numpy(x).to(dev))
            if fw is not None:
                weight_sum += fw
            probs = resample_image(p[0].cpu().numpy().transpose(1, 2, 0), (nx, ny))
            labels[:, :, k] = values[probs.argmax(axis=-1)]
            yield Progress(k + 1, nz, f"slice {k + 1}/{nz}")
    weights = {s: float(weight_sum[i] / nz) for i, s in enumerate(seqs) if s in used} if fusion else {}
    return MultiseqResult(labels, list(pack.classes), used, weights, pack.id, time.perf_counter() - t0, len(flips))


def write_label_volume(path: str | os.PathLike, result: MultiseqResult, study: Study) -> Path:
    """Write the labels as NIfTI with the study's affine and header (so they overlay the input exactly)."""
    from medseg.io.nifti import write_nifti

    if study.affine is None:
        affine = np.diag([*study.spacing, 1.0])
    else:
        affine = study.affine
    return write_nifti(path, result.labels, affine, study.header)


# --------------------------------------------------------------------------- command line
def add_parser(sub) -> None:
    """``medseg multiseq``: segment a study from any of its C0 / LGE / T2 NIfTI volumes."""
    p = sub.add_parser(
        "multiseq",
        help="segment a multi-sequence cardiac MRI study (any of C0, LGE, T2)",
        description="Segment a cardiac MRI study from whichever of its co-registered sequences are given (NIfTI); writes a NIfTI "
        "label volume on the input's grid with the pack's label values (MyoPS: 0, 200, 500, 600, 1220, 2221).",
    )
    p.add_argument("--model", default="cardiac-myops", help="multi-sequence pack id or folder (default cardiac-myops)")
    p.add_argument("--c0", help="bSSFP cine volume (C0), .nii/.nii.gz")
    p.add_argument("--lge", help="late gadolinium enhancement volume (LGE, 'DE'), .nii/.nii.gz")
    p.add_argument("--t2", help="T2-weighted volume, .nii/.nii.gz")
    p.add_argument("--study", metavar="DIR", help="a study folder: its C0, LGE (DE) and T2 files are found by name (--c0/--lge/--t2 override)")
    p.add_argument("-o", "--output", required=True, help="output label volume, .nii.gz or .nii")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average over the flips the pack was trained with (4x slower)")
    p.set_defaults(run=_run)


def _run(args) -> int:
    from medseg.cli import _say, drive

    paths: dict[str, Any] = dict(study_files(args.study)) if args.study else {}
    paths.update({s: p for s, p in (("C0", args.c0), ("LGE", args.lge), ("T2", args.t2)) if p})
    out, result = drive(segment_study_file_iter(paths, args.model, args.output, args.device, tta=args.tta), desc="multiseq", unit="slice")
    _say(f"{result.notice()} -> {out} ({result.seconds:.2f} s)")
    return 0


__all__ = [
    "DEFAULT_SPACING_MM",
    "MultiseqResult",
    "SEQUENCES",
    "Study",
    "add_parser",
    "canonical_sequence",
    "load_study",
    "model_grid",
    "network_logits",
    "pack_sequences",
    "prepare_slice",
    "segment_study_file_iter",
    "segment_study_iter",
    "study_files",
    "study_from_arrays",
    "write_label_volume",
]
