"""Evaluate a pack on a dataset split with the same :class:`~medseg.engine.Predictor` users run.

Per case: read the image, resample it to the pack's pixel size when both are known, predict, bring
the labels back to the reference grid (nearest neighbour), optionally drop small predicted objects
(the KPIs area filter, spec §10.3 step 4), then score with :mod:`medseg.metrics`: Dice, IoU, HD95 and
ASD per class (plus "all foreground" when there are several classes), object F1 at IoU >= 0.5 for
object recipes, and |ΔAoP| / |ΔHSD| for ultrasound (spec §9.3). The result is a JSON-able dict;
:func:`to_markdown` renders its tables.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medseg.engine.predictor import PredictConfig, Predictor
from medseg.engine.progress import CancelToken, Job, Progress, check_cancel
from medseg.errors import ModelError
from medseg.io.atomic import atomic_write_text
from medseg.measure.biometry import aop_hsd, biometry_errors
from medseg.metrics import METRICS, class_metrics, dice, instances, object_f1, summarise, summarise_cases, summarise_objects
from medseg.resample import resample_labels
from medseg.train.datasets import Case, instance_ids, read_case_image, read_mask
from medseg.train.packs import Pack
from medseg.train.recipes import Recipe


@dataclass
class EvalOptions:
    """How to score; defaults come from the recipe."""

    distances: bool = True  # HD95 and ASD (off for quick validation during training)
    objects: bool | None = None  # object F1 (None: as the recipe says)
    min_object_area_um2: float | None = None  # None: the recipe's; 0 disables
    min_object_area_px: int = 0  # used when a case has no pixel size
    biometry: bool | None = None  # AoP/HSD (None: as the recipe says)
    biometry_grid: int | None = None  # e.g. 512 for IUGC-comparable biometry; None: the reference grid
    empty_distance: float = math.nan  # distance when exactly one mask is empty
    keep_cases: bool = True


def foreground_classes(pack: Pack) -> dict[int, str]:
    return {c.value: c.name for c in pack.classes if c.value != 0}


def check_compatible(pack: Pack, recipe: Recipe) -> None:
    if len(pack.classes) != recipe.num_classes or pack.in_channels != recipe.in_channels:
        raise ModelError(
            f"Pack '{pack.id}' ({pack.in_channels} channel(s), classes {', '.join(c.name for c in pack.classes)}) does not fit dataset "
            f"'{recipe.name}' ({recipe.in_channels} channel(s), classes {', '.join(recipe.class_names)}): choose a pack trained on this kind of data."
        )


def _min_area_px(case: Case, recipe: Recipe, options: EvalOptions) -> int:
    um2 = recipe.min_object_area_um2 if options.min_object_area_um2 is None else options.min_object_area_um2
    if um2 and case.mpp:
        return int(round(um2 / (case.mpp * case.mpp)))
    return int(options.min_object_area_px or 0)


def predict_case(predictor: Predictor, pack: Pack, case: Case) -> np.ndarray:
    """The pack's labels for a case on the case's own grid (resampled to the pack's µm/px and back)."""
    image, rgb = read_case_image(case)
    return predictor.predict(image, rgb=rgb, mpp=case.mpp).labels


def score_case(pack: Pack, recipe: Recipe, case: Case, pred: np.ndarray, options: EvalOptions) -> dict[str, Any]:
    """Metrics of one predicted label image against the case's reference mask."""
    ref = read_mask(case, recipe.num_classes)
    classes = foreground_classes(pack)
    out: dict[str, Any] = {"id": case.id, "source": case.source}
    min_area = _min_area_px(case, recipe, options)
    use_objects = recipe.objects if options.objects is None else options.objects
    if min_area > 0 and use_objects:
        keep = np.zeros(pred.shape, bool)
        for v in classes:
            keep |= instances(pred == v, min_area) > 0
        pred = np.where(keep, pred, 0).astype(pred.dtype)
        out["min_object_area_px"] = min_area
    if options.distances:
        spacing = (case.mpp, case.mpp) if recipe.distance_unit != "px" and case.mpp else None
        groups = {"all": list(classes)} if len(classes) > 1 else None
        out["metrics"] = class_metrics(pred, ref, classes, groups, spacing, options.empty_distance)
    else:
        out["metrics"] = {name: {"dice": dice(pred == v, ref == v)} for v, name in classes.items()}
    if use_objects:
        inst = instance_ids(case)
        fg = np.isin(pred, list(classes))
        if inst is not None:
            out["objects"] = object_f1(instances(fg), inst, instances_given=True).to_dict()
        else:
            out["objects"] = object_f1(fg, np.isin(ref, list(classes))).to_dict()
    if recipe.biometry if options.biometry is None else options.biometry:
        p, r = pred, ref
        if options.biometry_grid:
            grid = (options.biometry_grid, options.biometry_grid)
            p, r = resample_labels(pred, grid), resample_labels(ref, grid)
        bp, br = aop_hsd(p), aop_hsd(r)
        out["biometry"] = {"pred": _bio(bp), "ref": _bio(br), **biometry_errors(bp, br)}
    return out


def _bio(b) -> dict[str, Any]:
    return {"status": b.status, "aop": b.aop, "hsd": b.hsd}


def evaluate_iter(
    pack: Pack,
    recipe: Recipe,
    cases: Sequence[Case],
    config: PredictConfig | None = None,
    options: EvalOptions | None = None,
    split: str = "",
    cancel: CancelToken | None = None,
) -> Job[dict[str, Any]]:
    """Generator over cases: yields :class:`Progress`, returns the report dict."""
    check_compatible(pack, recipe)
    options = options or EvalOptions()
    config = config or PredictConfig(tile=pack.tile, overlap=pack.overlap)
    predictor = Predictor(pack, config)
    t0 = time.perf_counter()
    results = []
    yield Progress(0, len(cases), "starting")
    for i, case in enumerate(cases):
        check_cancel(cancel)
        pred = predict_case(predictor, pack, case)
        results.append(score_case(pack, recipe, case, pred, options))
        yield Progress(i + 1, len(cases), case.id)
    return build_report(pack, recipe, split, results, options, config, time.perf_counter() - t0)


def build_report(pack: Pack, recipe: Recipe, split: str, results: list[dict[str, Any]], options: EvalOptions, config: PredictConfig, seconds: float) -> dict[str, Any]:
    metrics = METRICS if options.distances else ("dice",)
    report: dict[str, Any] = {
        "pack": {"id": pack.id, "architecture": pack.architecture, "config": pack.config, "sha256": pack.sha256, "mpp": pack.mpp},
        "dataset": recipe.name,
        "split": split,
        "n_cases": len(results),
        "distance_unit": recipe.distance_unit,
        "predict": {"tile": config.tile, "overlap": config.overlap, "blend": config.blend},
        "options": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(options).items()},
        "seconds": seconds,
        "conventions": (
            "Dice/IoU per image then averaged; both masks empty -> Dice 1, distances 0; one empty -> Dice 0 and distances undefined "
            "(left out of the means, counted as n_undefined). HD95 = max of the directed 95th percentiles; ASD symmetric. Object F1 per image "
            "at IoU >= 0.5 (KPIs rule: no reference object -> F1 0). Biometry errors only where both masks are measurable."
        ),
        "structures": summarise_cases([r["metrics"] for r in results], metrics),
    }
    sources = sorted({r["source"] for r in results if r["source"]})
    if len(sources) > 1:
        report["by_source"] = {
            s: {"n": sum(r["source"] == s for r in results), "structures": summarise_cases([r["metrics"] for r in results if r["source"] == s], metrics)} for s in sources
        }
    if any("objects" in r for r in results):
        from medseg.metrics import ObjectScores

        report["objects"] = summarise_objects([ObjectScores(**r["objects"]) for r in results if "objects" in r])
    if any("biometry" in r for r in results):
        bio = [r["biometry"] for r in results if "biometry" in r]
        report["biometry"] = {
            "grid": options.biometry_grid or "reference",
            "aop_error_deg": summarise(b["aop_error"] for b in bio if b["aop_error"] is not None),
            "hsd_error_px": summarise(b["hsd_error"] for b in bio if b["hsd_error"] is not None),
            "measurable": sum(b["aop_error"] is not None for b in bio),
            "reference_not_measurable": sum(b["ref"]["status"] != "ok" for b in bio),
            "prediction_not_measurable": sum(b["pred"]["status"] != "ok" and b["ref"]["status"] == "ok" for b in bio),
        }
    if options.keep_cases:
        report["cases"] = results
    return report


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a pack manifest records: mean Dice/IoU/HD95/ASD per structure, F1, biometry."""
    out: dict[str, Any] = {"split": report["split"], "n_cases": report["n_cases"], "distance_unit": report["distance_unit"]}
    for metric in METRICS:
        vals = {s: m[metric]["mean"] for s, m in report["structures"].items() if metric in m}
        if vals:
            out[metric] = {s: (None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 4)) for s, v in vals.items()}
    if "objects" in report:
        out["object_f1"] = round(report["objects"]["f1"]["mean"], 4)
    if "biometry" in report:
        b = report["biometry"]
        out["aop_error_deg"] = None if math.isnan(b["aop_error_deg"]["mean"]) else round(b["aop_error_deg"]["mean"], 3)
        out["hsd_error_px"] = None if math.isnan(b["hsd_error_px"]["mean"]) else round(b["hsd_error_px"]["mean"], 3)
    return out


def mean_dice(report: dict[str, Any]) -> float:
    """Mean over the foreground classes (not the "all" group) of the per-image mean Dice."""
    vals = [m["dice"]["mean"] for s, m in report["structures"].items() if s != "all"]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else 0.0


# --------------------------------------------------------------------------- writers
def _fmt(s: dict[str, float], digits: int = 3) -> str:
    if not s or s.get("n", 0) == 0:
        return "—"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def to_markdown(report: dict[str, Any]) -> str:
    unit = report.get("distance_unit", "px")
    p = report["pack"]
    lines = [f"### {p['id']} ({p['architecture']}/{p['config']}) on {report['dataset']} / {report['split']} (n = {report['n_cases']})", ""]
    metrics = [m for m in METRICS if any(m in v for v in report["structures"].values())]
    head = {"dice": "Dice", "iou": "IoU", "hd95": f"HD95 ({unit})", "asd": f"ASD ({unit})"}
    lines.append("| structure | " + " | ".join(head[m] for m in metrics) + " | undefined distances |")
    lines.append("|---" * (len(metrics) + 2) + "|")
    for name, ms in report["structures"].items():
        undefined = ms["hd95"]["n_undefined"] if "hd95" in ms else 0
        lines.append(f"| {name} | " + " | ".join(_fmt(ms[m], 3 if m in ("dice", "iou") else 2) for m in metrics) + f" | {undefined} |")
    if "by_source" in report:
        names = list(report["structures"])
        lines += ["", "| source | n | " + " | ".join(f"Dice {n}" for n in names) + " |", "|---" * (len(names) + 2) + "|"]
        for src, d in report["by_source"].items():
            lines.append(f"| {src} | {d['n']} | " + " | ".join(_fmt(d["structures"].get(n, {}).get("dice", {})) for n in names) + " |")
    if "objects" in report:
        o = report["objects"]
        lines += ["", "| object F1 (IoU ≥ 0.5) | precision | recall | TP | FP | FN |", "|---|---|---|---|---|---|"]
        lines.append(f"| {_fmt(o['f1'])} | {_fmt(o['precision'])} | {_fmt(o['recall'])} | {o['tp']} | {o['fp']} | {o['fn']} |")
    if "biometry" in report:
        b = report["biometry"]
        lines += ["", f"| biometry (grid: {b['grid']}) | mean | median | n |", "|---|---|---|---|"]
        for key, label in (("aop_error_deg", "AoP abs. error (°)"), ("hsd_error_px", "HSD abs. error (px)")):
            s = b[key]
            lines.append(f"| {label} | {s['mean']:.2f} | {s['median']:.2f} | {s['n']} |" if s["n"] else f"| {label} | — | — | 0 |")
        lines.append(f"\nNot measurable: {b['reference_not_measurable']} reference frame(s) (no tangent etc.), {b['prediction_not_measurable']} prediction(s) on measurable frames.")
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    return obj


def write_report(report: dict[str, Any], folder: str | Path, stem: str = "report") -> tuple[Path, Path]:
    """Write ``<stem>.json`` (NaN as null) and ``<stem>.md`` atomically; return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    js, md = folder / f"{stem}.json", folder / f"{stem}.md"
    atomic_write_text(js, json.dumps(_jsonable(report), indent=2) + "\n")
    atomic_write_text(md, to_markdown(report))
    return js, md


__all__ = ["EvalOptions", "build_report", "evaluate_iter", "headline", "mean_dice", "predict_case", "score_case", "to_markdown", "write_report"]
