"""Several models on the same input: masks, costs, agreement, and scores against a reference.

A comparison runs N packs (ids or pack folders) on one image or frame stack. The input is read,
checked and described once and every model gets that same array (each applies its own
normalisation and pixel size, as packs differ in both). Per model it keeps the label mask, the
class probabilities when asked for, the latency, the peak memory of the run and the parameter count.

Then, with :mod:`medseg.metrics` and :mod:`medseg.measure.biometry` (one implementation of every
number):

- **against a reference** mask, when one is given: Dice, IoU, HD95 and ASD per class; object F1
  (IoU >= 0.5, the KPIs rule) for object packs; |ΔAoP| and |ΔHSD| for ultrasound packs
  (classes 1 pubic symphysis, 2 fetal head);
- **between models**: the pairwise Dice matrix (per class, and the mean over the foreground classes);
- **per pixel**: the agreement map, how many models vote for the pixel's most voted class (``N``
  everywhere means full agreement), and the disagreement map ``N - agreement`` (0 where all agree).

Frame stacks are scored frame by frame and averaged, like images of a cohort. Long work is a
generator (:func:`compare_iter`, :func:`compare_many_iter`) yielding :class:`Progress` and checking a
:class:`CancelToken` between batches; :func:`compare` is the synchronous call. :func:`summary_rows`
turns per-model cases into the table (CSV/Markdown writers below) and :func:`plot_metric` draws a
bar plot of one column with matplotlib (no pyplot state, so the dock and the CLI share it).

Costs: latency is the wall time of the model's prediction of the input (after a one-tile warm-up,
so one-off set-up is not counted); peak memory is, on a GPU, the peak of allocated device memory
during the run and, on the CPU (Linux), the peak resident memory of the process above its level
when the run started (``/proc/self/status`` VmHWM after resetting it) -- process-wide, so other
work running at the same time counts too; ``None`` where it cannot be measured.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from medseg.engine.predictor import PredictConfig, Predictor, forward_scores
from medseg.engine.progress import CancelToken, Job, Progress, check_cancel, run_sync
from medseg.errors import InputError, ModelError, UsageError
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.io.images import ImageData, describe_array
from medseg.measure.biometry import aop_hsd, biometry_errors
from medseg.metrics import binary_metrics, dice, object_f1
from medseg.models import count_parameters
from medseg.train.packs import Pack, resolve

METRIC_NAMES = ("dice", "iou", "hd95", "asd")
METRIC_LABELS = {"dice": "Dice", "iou": "IoU", "hd95": "HD95", "asd": "ASD"}
UNIT = 100  # progress units per model and image


# --------------------------------------------------------------------------- models
@dataclass
class Contender:
    """One model of a comparison: a unique display name and its loaded pack."""

    name: str
    pack: Pack
    spec: str = ""  # what the user gave (pack id or folder)
    _predictor: Predictor | None = field(default=None, repr=False)

    @property
    def params(self) -> int:
        return count_parameters(self.pack.model, trainable_only=False)

    def predictor(self, options: "CompareOptions") -> Predictor:
        """The model's Predictor (made once; warmed up with one tile so latency leaves out set-up)."""
        if self._predictor is None:
            config = PredictConfig(
                tile=options.tile or self.pack.tile,
                overlap=self.pack.overlap if options.overlap is None else options.overlap,
                batch_size=options.batch_size,
                device=options.device,
                probabilities=options.probabilities,
            )
            self._predictor = Predictor(self.pack, config)
            if options.warmup:
                side = min(config.tile, 256)
                with torch.inference_mode():
                    forward_scores(self._predictor.model, torch.zeros(1, self.pack.in_channels, side, side), self._predictor.device,
                                   self.pack.activation)
        return self._predictor


def parse_model_spec(spec: str) -> tuple[str | None, str]:
    """``NAME=PACK`` -> (NAME, PACK); a bare pack id or folder -> (None, PACK)."""
    spec = spec.strip()
    name, sep, rest = spec.partition("=")
    if sep and name and rest and not Path(spec).exists():
        return name.strip(), rest.strip()
    return None, spec


def default_name(spec: str, pack: Pack) -> str:
    """The pack id for an installed pack; for a folder, the folder's name (its parent's when it is called 'pack')."""
    path = Path(spec)
    if path.is_dir():
        folder = path.resolve()
        return folder.parent.name if folder.name == "pack" else folder.name
    return pack.id


def load_contenders(specs: Sequence["Contender | str | Pack"]) -> list[Contender]:
    """Load every model (pack ids, pack folders, ``NAME=PACK``, loaded packs or contenders) with unique names; they must share classes."""
    if len(specs) < 1:
        raise UsageError("Give at least one model to compare (two or more to see them side by side).")
    out: list[Contender] = []
    taken: set[str] = set()
    for spec in specs:
        if isinstance(spec, Contender):
            if spec.name in taken:
                raise UsageError(f"Two models are named '{spec.name}': give each a different name.")
            taken.add(spec.name)
            out.append(spec)
            continue
        if isinstance(spec, Pack):
            name, pack, given = spec.id, spec, spec.id
        else:
            explicit, given = parse_model_spec(str(spec))
            pack = resolve(given, device="cpu")
            name = explicit or default_name(given, pack)
        base, k = name, 2
        while name in taken:
            name, k = f"{base} ({k})", k + 1
        taken.add(name)
        out.append(Contender(name, pack, given))
    check_same_classes(out)
    return out


def check_same_classes(contenders: Sequence[Contender]) -> None:
    """Refuse models that segment different classes: their masks cannot be compared value by value."""
    first = contenders[0]
    values = sorted(c.value for c in first.pack.classes)
    for other in contenders[1:]:
        if sorted(c.value for c in other.pack.classes) != values:
            raise ModelError(
                f"'{other.name}' segments classes {', '.join(c.name for c in other.pack.classes)} but '{first.name}' segments "
                f"{', '.join(c.name for c in first.pack.classes)}: compare models trained for the same task."
            )


# --------------------------------------------------------------------------- options and results
@dataclass
class CompareOptions:
    """Run and scoring parameters of a comparison, in one typed place."""

    tile: int | None = None  # None: each pack's own
    overlap: float | None = None
    batch_size: int = 4
    device: str = "auto"
    probabilities: bool = False
    objects: bool | None = None  # object F1 against the reference (None: for object packs)
    biometry: bool | None = None  # |ΔAoP|, |ΔHSD| (None: for packs with pubic symphysis 1 and fetal head 2)
    min_object_area_px: int = 0  # drop smaller predicted objects before object F1
    spacing: tuple[float, float] | None = None  # (row, col) pixel size for HD95/ASD; None: pixels
    warmup: bool = True


@dataclass
class ModelOutput:
    """One model's output on the input and what it cost."""

    name: str
    pack_id: str
    architecture: str
    config: str
    params: int
    labels: np.ndarray
    probabilities: np.ndarray | None
    seconds: float
    peak_mib: float | None
    tiles: int
    device: str


@dataclass
class Comparison:
    """The outcome of one comparison (see the module doc for what each part means)."""

    image_name: str
    outputs: list[ModelOutput]
    classes: dict[int, str]  # foreground value -> name
    colours: dict[int, str]
    agreement: np.ndarray  # uint8, number of models voting for the pixel's most voted class
    pairwise: dict[str, np.ndarray]  # structure name (and "mean") -> (N, N) Dice, mean over frames
    cases: dict[str, list[dict[str, Any]]]  # model name -> one dict per frame (scores vs the reference, pairwise Dice)
    has_reference: bool = False

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def disagreement(self) -> np.ndarray:
        """``N - agreement``: 0 where every model agrees, else how many models differ from the majority."""
        return (len(self.outputs) - self.agreement).astype(np.uint8)

    @property
    def full_agreement(self) -> float:
        """Fraction of pixels on which every model gives the same class."""
        return float(np.mean(self.agreement == len(self.outputs)))

    def output(self, name: str) -> ModelOutput:
        for o in self.outputs:
            if o.name == name:
                return o
        raise UsageError(f"No model named '{name}' in this comparison: choose one of {', '.join(self.names)}.")

    def rows(self) -> list[dict[str, Any]]:
        """The table: one row per model (see :func:`summary_rows`)."""
        return summary_rows(self.cases, {o.name: o for o in self.outputs}, self.classes)


# --------------------------------------------------------------------------- peak memory
def _status_kib(name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            found = re.search(rf"^{name}:\s+(\d+) kB", fh.read(), re.M)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def _release_free_memory() -> None:
    """Give memory freed by earlier work back to the system (glibc), so the next peak is measured from a clean level."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block of work in MiB (GPU: allocated device memory; CPU: resident growth), or None."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None
        self._base: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_memory()
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # resets VmHWM to the current resident size
        except OSError:
            return self
        self._base = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self._base is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = max(0, torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        peak = _status_kib("VmHWM")
        if peak is not None:
            self.mib = max(0, peak - self._base) / 1024


# --------------------------------------------------------------------------- agreement and scores
def agreement_map(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Per pixel, how many masks hold the most frequent value there (uint8; ``len(masks)`` = full agreement)."""
    if not masks:
        raise UsageError("An agreement map needs at least one mask.")
    stack = np.stack([np.asarray(m) for m in masks])
    best = np.zeros(stack.shape[1:], np.uint8)
    for value in np.unique(stack):
        np.maximum(best, np.count_nonzero(stack == value, axis=0).astype(np.uint8), out=best)
    return best


def pairwise_dice(masks: Sequence[np.ndarray], classes: Mapping[int, str]) -> dict[str, np.ndarray]:
    """(N, N) Dice between every two masks for each foreground class, and their mean (``"mean"``)."""
    n = len(masks)
    out = {name: np.ones((n, n)) for name in classes.values()}
    for i in range(n):
        for j in range(i + 1, n):
            for value, name in classes.items():
                out[name][i, j] = out[name][j, i] = dice(masks[i] == value, masks[j] == value)
    out["mean"] = np.mean([out[name] for name in classes.values()], axis=0) if classes else np.ones((n, n))
    return out


def wants_biometry(classes: Mapping[int, str]) -> bool:
    """Ultrasound biometry applies to masks with the pubic symphysis as 1 and the fetal head as 2."""
    return "symphysis" in classes.get(1, "").lower() and "head" in classes.get(2, "").lower()


def wants_objects(packs: Iterable[Pack]) -> bool:
    """Object F1 applies to object packs (their manifests set an object area filter or name an instance task)."""
    for pack in packs:
        m = pack.manifest or {}
        if (m.get("postprocess") or {}).get("min_object_area_um2") is not None or "instance" in str(m.get("task", "")).lower():
            return True
    return False


def score_frame(pred: np.ndarray, ref: np.ndarray, classes: Mapping[int, str], options: CompareOptions, objects: bool, biometry: bool) -> dict[str, Any]:
    """Scores of one predicted frame against its reference (the shared metrics; empty-mask rules in medseg.metrics)."""
    out: dict[str, Any] = {"metrics": {name: binary_metrics(pred == v, ref == v, options.spacing) for v, name in classes.items()}}
    if objects:
        fg = np.isin(pred, list(classes))
        out["objects"] = object_f1(fg, np.isin(ref, list(classes)), min_area=options.min_object_area_px).to_dict()
    if biometry:
        bp, br = aop_hsd(pred), aop_hsd(ref)
        out["biometry"] = {"pred_status": bp.status, "ref_status": br.status, **biometry_errors(bp, br)}
    return out


# --------------------------------------------------------------------------- the run
def _as_image(image: np.ndarray | ImageData, rgb: bool | None) -> ImageData:
    return image if isinstance(image, ImageData) else describe_array(np.asarray(image), rgb=rgb)


def _frames_of(labels: np.ndarray, is_stack: bool) -> list[np.ndarray]:
    return list(labels) if is_stack else [labels]


def _check_reference(reference: np.ndarray, shape: tuple[int, ...], data: ImageData, frames: list[int] | None) -> np.ndarray:
    ref = np.asarray(reference)
    if data.is_stack and frames is not None and ref.ndim == 3 and ref.shape[0] == data.array.shape[0] and ref.shape != shape:
        ref = ref[frames]
    if ref.shape != shape:
        raise InputError(f"The reference mask has shape {ref.shape} but the models' masks have shape {shape}: give the reference of this image (and frames).")
    if not np.issubdtype(ref.dtype, np.integer) and not np.issubdtype(ref.dtype, np.bool_):
        raise InputError(f"The reference mask holds {ref.dtype} values: give integer class values.")
    return ref


def compare_iter(
    image: np.ndarray | ImageData,
    models: Sequence[Contender | str | Pack],
    reference: np.ndarray | None = None,
    options: CompareOptions | None = None,
    frames: list[int] | None = None,
    rgb: bool | None = None,
    mpp: float | None = None,
    cancel: CancelToken | None = None,
) -> Job[Comparison]:
    """Generator: run every model on ``image``, yield :class:`Progress`, return the :class:`Comparison`.

    ``models`` are :class:`Contender` objects or what :func:`load_contenders` takes; ``reference``
    is a label mask of the image (of the chosen ``frames`` of a stack, or of the whole stack).
    """
    options = options or CompareOptions()
    yield Progress(0, 0, "loading models")
    contenders = load_contenders(list(models))
    data = _as_image(image, rgb)
    total = UNIT * len(contenders)
    outputs: list[ModelOutput] = []
    for i, c in enumerate(contenders):
        check_cancel(cancel)
        yield Progress(UNIT * i, total, f"{c.name}: preparing")
        predictor = c.predictor(options)
        with PeakMemory(predictor.device) as peak:
            t0 = time.perf_counter()
            job = predictor.predict_iter(data, frames=frames, cancel=cancel, mpp=mpp)
            while True:
                try:
                    event = next(job)
                except StopIteration as stop:
                    prediction = stop.value
                    break
                yield Progress(UNIT * i + int(UNIT * event.fraction * 0.99), total, f"{c.name}: {event.message}")
            seconds = time.perf_counter() - t0
        outputs.append(ModelOutput(c.name, c.pack.id, c.pack.architecture, c.pack.config, c.params, prediction.labels,
                                   prediction.probabilities, seconds, peak.mib, prediction.tiles, str(predictor.device)))
        yield Progress(UNIT * (i + 1), total, f"{c.name}: {seconds:.2f} s")
    check_cancel(cancel)
    first = contenders[0].pack
    classes = {c.value: c.name for c in first.classes if c.value != 0}
    shape = outputs[0].labels.shape
    ref = None if reference is None else _check_reference(reference, shape, data, frames)
    objects = (options.objects if options.objects is not None else wants_objects(c.pack for c in contenders)) and ref is not None
    biometry = (options.biometry if options.biometry is not None else wants_biometry(classes)) and ref is not None
    names = [o.name for o in outputs]
    per_frame = [_frames_of(o.labels, data.is_stack) for o in outputs]
    ref_frames = None if ref is None else _frames_of(ref, data.is_stack)
    cases: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    pair_sum: dict[str, np.ndarray] = {}
    n_frames = len(per_frame[0])
    for k in range(n_frames):
        check_cancel(cancel)
        masks = [frames_[k] for frames_ in per_frame]
        pairs = pairwise_dice(masks, classes)
        for key, matrix in pairs.items():
            pair_sum[key] = pair_sum.get(key, 0) + matrix
        for i, name in enumerate(names):
            case: dict[str, Any] = {"image": data.name, "frame": (frames[k] if frames else k) if data.is_stack else None}
            others = [pairs["mean"][i, j] for j in range(len(names)) if j != i]
            case["pairwise_dice"] = float(np.mean(others)) if others else None
            if ref_frames is not None:
                case.update(score_frame(masks[i], ref_frames[k], classes, options, objects, biometry))
            cases[name].append(case)
    pairwise = {key: matrix / n_frames for key, matrix in pair_sum.items()}
    return Comparison(
        image_name=data.name,
        outputs=outputs,
        classes=classes,
        colours={c.value: c.color for c in first.classes},
        agreement=agreement_map([o.labels for o in outputs]),
        pairwise=pairwise,
        cases=cases,
        has_reference=ref is not None,
    )


def compare(image: np.ndarray | ImageData, models: Sequence[Contender | str | Pack], reference: np.ndarray | None = None,
            options: CompareOptions | None = None, **kwargs: Any) -> Comparison:
    """Synchronous :func:`compare_iter`."""
    return run_sync(compare_iter(image, models, reference, options, **kwargs))


@dataclass
class CompareItem:
    """One input of a multi-image comparison: an image, its optional reference, the frames to run."""

    image: ImageData
    reference: np.ndarray | None = None
    frames: list[int] | None = None
    mpp: float | None = None


@dataclass
class Summary:
    """A multi-image comparison: the table, every case, the mean pairwise Dice and the agreement."""

    names: list[str]
    classes: dict[int, str]
    rows: list[dict[str, Any]]
    cases: dict[str, list[dict[str, Any]]]
    pairwise: np.ndarray  # mean over images of the mean-foreground pairwise Dice
    full_agreement: float  # mean over images of the fraction of pixels where all models agree
    n_images: int
    has_reference: bool


def compare_many_iter(
    items: Iterable[CompareItem],
    models: Sequence[Contender | str | Pack],
    options: CompareOptions | None = None,
    count: int | None = None,
    on_result: Callable[[CompareItem, Comparison], None] | None = None,
    cancel: CancelToken | None = None,
) -> Job[Summary]:
    """Generator: compare the models on every item (each model loaded once), hand each :class:`Comparison`
    to ``on_result`` (e.g. to write its masks) and return the :class:`Summary` over all items."""
    options = options or CompareOptions()
    yield Progress(0, 0, "loading models")
    contenders = load_contenders(list(models))
    per_item = UNIT * len(contenders)
    total = per_item * count if count else 0
    cases: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
    costs: dict[str, dict[str, list]] = {c.name: {"seconds": [], "peak_mib": []} for c in contenders}
    pair_sum, agree_sum, n, has_reference = 0.0, 0.0, 0, False
    outputs_meta: dict[str, ModelOutput] = {}
    classes: dict[int, str] = {}
    for item in items:
        check_cancel(cancel)
        job = compare_iter(item.image, contenders, item.reference, options, frames=item.frames, mpp=item.mpp, cancel=cancel)
        while True:
            try:
                event = next(job)
            except StopIteration as stop:
                result: Comparison = stop.value
                break
            if event.total:
                yield Progress(per_item * n + event.done, total or per_item * (n + 1), f"{item.image.name}: {event.message}")
        if on_result is not None:
            on_result(item, result)
        for o in result.outputs:
            cases[o.name].extend(result.cases[o.name])
            costs[o.name]["seconds"].append(o.seconds)
            costs[o.name]["peak_mib"].append(o.peak_mib)
            outputs_meta[o.name] = o
        classes = result.classes
        pair_sum = pair_sum + result.pairwise["mean"]
        agree_sum += result.full_agreement
        has_reference = has_reference or result.has_reference
        n += 1
    if n == 0:
        raise InputError("There was nothing to compare: give at least one image.")
    rows = summary_rows(cases, outputs_meta, classes, costs)
    names = [c.name for c in contenders]
    return Summary(names, classes, rows, cases, np.asarray(pair_sum) / n, agree_sum / n, n, has_reference)


# --------------------------------------------------------------------------- the table
def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def summary_rows(cases: Mapping[str, Sequence[Mapping[str, Any]]], outputs: Mapping[str, ModelOutput], classes: Mapping[int, str],
                 costs: Mapping[str, Mapping[str, Sequence]] | None = None) -> list[dict[str, Any]]:
    """One row per model: costs, then the mean over cases (frames/images) of every score.

    Columns: ``model, architecture, params (M), seconds, peak MiB``, then with a reference
    ``<metric> <class>`` (``Dice``, ``IoU``, ``HD95``, ``ASD``), ``mean Dice``, ``object F1`` and ``abs. ΔAoP °`` /
    ``abs. ΔHSD px`` where they apply, and ``pairwise Dice`` (mean Dice with the other models).
    Distances undefined on a case (one mask empty) are left out of their mean, as in medseg.metrics.
    """
    rows = []
    for name, model_cases in cases.items():
        o = outputs[name]
        seconds = (costs or {}).get(name, {}).get("seconds") or [o.seconds]
        peaks = [p for p in ((costs or {}).get(name, {}).get("peak_mib") or [o.peak_mib]) if p is not None]
        row: dict[str, Any] = {"model": name, "architecture": f"{o.architecture}/{o.config}", "params (M)": o.params / 1e6,
                               "seconds": float(np.mean(seconds)), "peak MiB": max(peaks) if peaks else None}
        scored = [c for c in model_cases if "metrics" in c]
        if scored:
            for metric in METRIC_NAMES:
                for cname in classes.values():
                    row[f"{METRIC_LABELS[metric]} {cname}"] = _mean(c["metrics"][cname][metric] for c in scored)
            row["mean Dice"] = _mean(row[f"Dice {cname}"] for cname in classes.values())
            if any("objects" in c for c in scored):
                row["object F1"] = _mean(c["objects"]["f1"] for c in scored if "objects" in c)
            if any("biometry" in c for c in scored):
                row["abs. ΔAoP °"] = _mean(c["biometry"]["aop_error"] for c in scored if "biometry" in c)
                row["abs. ΔHSD px"] = _mean(c["biometry"]["hsd_error"] for c in scored if "biometry" in c)
                row["AoP measurable"] = f"{sum(c['biometry']['aop_error'] is not None for c in scored if 'biometry' in c)}/{len(scored)}"
        row["pairwise Dice"] = _mean(c.get("pairwise_dice") for c in model_cases)
        row["n"] = len(model_cases)
        rows.append(row)
    return rows


def numeric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Columns that hold numbers (what a bar plot can show), in table order."""
    columns = [k for k in (rows[0] if rows else {}) if k not in ("model", "architecture", "n", "AoP measurable")]
    return [k for k in columns if any(isinstance(r.get(k), (int, float)) for r in rows)]


LOWER_IS_BETTER = ("HD95", "ASD", "seconds", "peak MiB", "params (M)", "abs. ΔAoP °", "abs. ΔHSD px")


def lower_is_better(column: str) -> bool:
    return column.startswith(LOWER_IS_BETTER)


def format_value(column: str, value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if column == "seconds":
            return f"{value:.3f}"
        if column in ("params (M)",) or column.startswith(("HD95", "ASD", "abs. Δ", "peak")):
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table as CSV text (numbers unrounded, empty where undefined)."""
    columns = list(rows[0]) if rows else []
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    return buf.getvalue()


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(map(_cell, columns)) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(format_value(c, r.get(c))) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def pairwise_markdown(names: Sequence[str], matrix: np.ndarray) -> str:
    lines = ["| Dice | " + " | ".join(map(_cell, names)) + " |", "|" + "---|" * (len(names) + 1)]
    for i, name in enumerate(names):
        lines.append(f"| {_cell(name)} | " + " | ".join(f"{matrix[i, j]:.3f}" for j in range(len(names))) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(summary: Summary) -> str:
    """The Markdown report of a comparison: the table, the pairwise Dice matrix and the agreement."""
    ref = "against the reference masks" if summary.has_reference else "without reference masks (pairwise agreement only)"
    parts = [
        f"{len(summary.names)} models on {summary.n_images} image(s), scored {ref}. Scores are means over images; "
        "HD95/ASD in pixels, left out where one mask is empty; seconds = mean prediction time per image (after a one-tile warm-up); "
        "peak MiB = the largest peak memory growth of one prediction; pairwise Dice = mean Dice with the other models.",
        "",
        table_markdown(summary.rows),
        "Pairwise Dice (mean over foreground classes and images):",
        "",
        pairwise_markdown(summary.names, summary.pairwise),
        f"Pixels on which all models agree: {100 * summary.full_agreement:.1f} % (mean over images).",
    ]
    return "\n".join(parts) + "\n"


def summarise_comparison(result: Comparison) -> Summary:
    """A single comparison as a :class:`Summary` (the same table and report as for many images)."""
    return Summary(result.names, result.classes, result.rows(), result.cases, result.pairwise["mean"], result.full_agreement, 1, result.has_reference)


def write_table_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise InputError(f"Folder '{path.parent}' does not exist: choose a folder that exists for the table.")
    atomic_write_text(path, table_csv(rows))
    return path


def cases_csv(cases: Mapping[str, Sequence[Mapping[str, Any]]], classes: Mapping[int, str]) -> str:
    """Every case of every model, one row each (image, frame, model, scores)."""
    flat = []
    for name, model_cases in cases.items():
        for c in model_cases:
            row: dict[str, Any] = {"image": c.get("image"), "frame": c.get("frame"), "model": name, "pairwise Dice": c.get("pairwise_dice")}
            for cname, ms in c.get("metrics", {}).items():
                for metric, value in ms.items():
                    row[f"{METRIC_LABELS[metric]} {cname}"] = value
            if "objects" in c:
                row["object F1"] = c["objects"]["f1"]
            if "biometry" in c:
                row.update({"abs. ΔAoP °": c["biometry"]["aop_error"], "abs. ΔHSD px": c["biometry"]["hsd_error"],
                            "pred biometry": c["biometry"]["pred_status"], "ref biometry": c["biometry"]["ref_status"]})
            flat.append(row)
    columns: list[str] = []
    for r in flat:
        columns.extend(k for k in r if k not in columns)
    return table_csv([{c: r.get(c) for c in columns} for r in flat])


# --------------------------------------------------------------------------- the figure
def plot_metric(rows: Sequence[Mapping[str, Any]], column: str, figure=None, title: str | None = None):
    """A bar per model of ``column`` on a matplotlib ``Figure`` (a new one unless given); returns the figure."""
    from matplotlib.figure import Figure

    if rows and column not in rows[0]:
        raise UsageError(f"The table has no column '{column}': choose one of {', '.join(numeric_columns(rows))}.")
    fig = figure if figure is not None else Figure(figsize=(max(4.0, 1.1 * len(rows) + 2), 3.2), dpi=100)
    fig.clear()
    ax = fig.add_subplot(1, 1, 1)
    names = [str(r["model"]) for r in rows]
    values = [r.get(column) for r in rows]
    heights = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in values]
    bars = ax.bar(range(len(rows)), heights, color="#4363d8")
    for bar, v in zip(bars, values):
        ax.annotate(format_value(column, v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=20 if len(rows) > 2 else 0, ha="right" if len(rows) > 2 else "center", fontsize=8)
    ax.set_ylabel(column)
    better = "lower is better" if lower_is_better(column) else "higher is better"
    ax.set_title(title or f"{column} per model ({better})", fontsize=9)
    if column.startswith(("Dice", "IoU", "mean Dice", "pairwise", "object F1")):
        ax.set_ylim(0, 1.05)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Write the figure as PNG atomically."""
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise InputError(f"Folder '{path.parent}' does not exist: choose a folder that exists for the figure.")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path


def default_metric(rows: Sequence[Mapping[str, Any]]) -> str:
    """The column to plot first: mean Dice against the reference, else the pairwise Dice."""
    return "mean Dice" if rows and "mean Dice" in rows[0] else "pairwise Dice"


# --------------------------------------------------------------------------- command line
def safe_name(name: str) -> str:
    """A model name as a folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def disagreement_picture(image: ImageData, disagreement: np.ndarray) -> np.ndarray:
    """The image with pixels where models disagree drawn over it (orange: one model differs, red: more)."""
    from medseg.io.overlay import render_overlay

    colours = {k: ("#ff8c00" if k == 1 else "#e6194b") for k in range(1, int(disagreement.max(initial=0)) + 1)}
    return render_overlay(image.array, disagreement, colours, alpha=0.45, outline=False, rgb=image.rgb)


def write_outputs(outdir: Path, item: CompareItem, result: Comparison, probabilities: bool = False) -> None:
    """Masks per model (``OUTDIR/<model>/<stem>``), the agreement map and the disagreement picture of one input."""
    from medseg.io.images import label_path, write_labels

    source = item.image.path or Path(item.image.name)
    for o in result.outputs:
        folder = outdir / safe_name(o.name)
        folder.mkdir(parents=True, exist_ok=True)
        write_labels(label_path(folder, source, o.labels), o.labels)
        if probabilities and o.probabilities is not None:
            import tifffile

            with atomic_path(folder / f"{Path(label_path(folder, source, o.labels)).stem}-probabilities.tif") as tmp:
                tifffile.imwrite(tmp, o.probabilities, compression="zlib")
    (outdir / "agreement").mkdir(exist_ok=True)
    write_labels(label_path(outdir / "agreement", source, result.agreement), result.agreement)
    if not item.image.is_stack:
        import imageio.v3 as iio

        (outdir / "disagreement").mkdir(exist_ok=True)
        with atomic_path(outdir / "disagreement" / f"{Path(label_path(outdir, source, result.agreement)).stem}.png") as tmp:
            iio.imwrite(tmp, disagreement_picture(item.image, result.disagreement), extension=".png")


def write_report(outdir: Path, summary: Summary, metric: str | None = None) -> dict[str, Path]:
    """``comparison.csv``/``.md``, ``cases.csv``, ``pairwise.csv`` and ``figure.png`` in ``outdir``."""
    out = {"csv": write_table_csv(summary.rows, outdir / "comparison.csv"), "md": outdir / "comparison.md",
           "cases": outdir / "cases.csv", "pairwise": outdir / "pairwise.csv", "figure": outdir / "figure.png"}
    atomic_write_text(out["md"], summary_markdown(summary))
    atomic_write_text(out["cases"], cases_csv(summary.cases, summary.classes))
    pairs = [{"model": n, **{m: float(summary.pairwise[i, j]) for j, m in enumerate(summary.names)}} for i, n in enumerate(summary.names)]
    atomic_write_text(out["pairwise"], table_csv(pairs))
    save_figure(plot_metric(summary.rows, metric or default_metric(summary.rows)), out["figure"])
    return out


def add_parser(sub) -> None:
    """The ``medseg compare`` subcommand."""
    from medseg.cli import _add_predict_options

    p = sub.add_parser(
        "compare",
        help="run several models on the same images: masks, agreement map, metrics and costs table, figure",
        description="Run every model on every input (one read of each input), then write OUTDIR/<model>/<stem>.png masks, "
        "OUTDIR/agreement/<stem>.png (how many models agree on each pixel), OUTDIR/disagreement/<stem>.png (where they differ, "
        "over the image), OUTDIR/comparison.csv and .md (one row per model: parameters, seconds, peak memory, and with --reference "
        "Dice/IoU/HD95/ASD per class, object F1 or AoP/HSD errors where they apply; pairwise Dice), cases.csv, pairwise.csv and figure.png.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images (frame stacks too)")
    p.add_argument("--models", required=True, metavar="A,B,C", help="comma-separated pack ids or pack folders; NAME=PACK names a model in the outputs")
    p.add_argument("--reference", metavar="DIR", help="folder of reference masks DIR/<stem>.png or .tif (same class values as the models)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--metric", default=None, help="table column for the figure (default: mean Dice with --reference, else pairwise Dice)")
    p.add_argument("--mpp", type=float, default=None, help="pixel size of the inputs in µm (resampled to each pack's)")
    p.add_argument("--probabilities", action="store_true", help="also write each model's class probabilities (float16 TIFF)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (e.g. 1 for timings that others do not disturb)")
    _add_predict_options(p)
    p.set_defaults(run=run_cli)


def run_cli(args) -> int:
    from medseg.cli import _find_mask, _say, collect_inputs, drive
    from medseg.io.images import IMAGE_SUFFIXES, read_image, read_labels, stem_of

    specs = [s for s in (args.models or "").split(",") if s.strip()]
    if not specs:
        raise UsageError("--models needs at least one pack id or pack folder, e.g. --models ultrasound-fhps,work/run/pack.")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads} must be at least 1.")
        torch.set_num_threads(args.threads)
    files = collect_inputs(args.inputs, IMAGE_SUFFIXES)
    references: dict[Path, Path] = {}
    if args.reference:
        folder = Path(args.reference)
        if not folder.is_dir():
            raise InputError(f"--reference '{folder}' is not a folder: give the folder that holds <stem>.png or <stem>.tif masks.")
        references = {f: _find_mask(folder, stem_of(f)) for f in files}
    contenders = load_contenders(specs)
    options = CompareOptions(tile=args.tile, overlap=args.overlap, batch_size=args.batch_size, device=args.device, probabilities=args.probabilities)
    outdir = Path(args.output)
    outdir.mkdir(parents=True, exist_ok=True)

    def items():
        for f in files:
            yield CompareItem(read_image(f), read_labels(references[f]) if f in references else None, mpp=args.mpp)

    def written(item: CompareItem, result: Comparison) -> None:
        write_outputs(outdir, item, result, args.probabilities)
        if len(files) <= 10:
            _say(f"{item.image.name}: " + ", ".join(f"{o.name} {o.seconds:.2f} s" for o in result.outputs)
                 + f"; all agree on {100 * result.full_agreement:.1f} % of pixels")

    summary = drive(compare_many_iter(items(), contenders, options, count=len(files), on_result=written), desc="compare", unit="step")
    bad_metric = args.metric is not None and args.metric not in numeric_columns(summary.rows)
    metric = default_metric(summary.rows) if bad_metric or args.metric is None else args.metric
    paths = write_report(outdir, summary, metric)
    print(summary_markdown(summary))
    _say(f"masks, agreement maps and the table written to {outdir} (table {paths['csv'].name}, {paths['md'].name}; figure {paths['figure'].name})")
    if bad_metric:
        raise UsageError(f"--metric '{args.metric}' is not a column of the table, so the figure shows '{metric}': "
                         f"choose one of {', '.join(numeric_columns(summary.rows))}.")
    return 0


__all__ = [
    "CompareItem",
    "CompareOptions",
    "Comparison",
    "Contender",
    "ModelOutput",
    "PeakMemory",
    "Summary",
    "add_parser",
    "agreement_map",
    "cases_csv",
    "compare",
    "compare_iter",
    "compare_many_iter",
    "default_metric",
    "load_contenders",
    "numeric_columns",
    "pairwise_dice",
    "plot_metric",
    "save_figure",
    "score_frame",
    "summarise_comparison",
    "summary_markdown",
    "summary_rows",
    "table_csv",
    "table_markdown",
    "write_outputs",
    "write_report",
    "write_table_csv",
]
