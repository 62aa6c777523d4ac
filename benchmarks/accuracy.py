"""How accurate are the shipped packs, on validation data and on new patients, and how did the
architectures tried for them compare on validation?

(a) every shipped pack (``resources/packs`` or ``--packs``) on its recipe's validation split and its
new-patient splits (psfhs: val + holdout; glomeruli: val + test + external-test; polyp: val + test):
Dice, IoU, HD95, ASD per structure, object F1 (glomeruli), mean |ΔAoP| / |ΔHSD| (psfhs), per source;
(b) the packs of the screening/trial runs (``--tried``) on their recipe's validation split, one row
each; (c) the plain U-Net baseline of ``../shared/data/BASELINES.md``, quoted, not measured here;
(d) the exact training command from each manifest; (e) what storing the weights in fp16 costs: the
run's fp32 best weights (``<workdir>/<run>/ckpt.pt``) against the pack's fp16 weights.

Everything is scored by :mod:`medseg.train.evaluate` (the code behind ``medseg evaluate``); per-split
JSON/Markdown reports go to ``--out``.

    python benchmarks/accuracy.py [--packs ID_OR_DIR,...] [--tried work/screen-a,work/trial-b,...] [--limit N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import table, write_section  # noqa: E402

from medseg import models  # noqa: E402
from medseg.train.datasets import evenly  # noqa: E402
from medseg.train.evaluate import evaluate_iter, headline, mean_dice, predict_case, write_report  # noqa: E402
from medseg.engine.predictor import PredictConfig, Predictor  # noqa: E402
from medseg.train.packs import Pack, available_packs, load_pack, read_manifest, resources_dir  # noqa: E402
from medseg.train.recipes import Recipe, get_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = "Accuracy of the shipped packs"
TRIED = "Architectures tried"

# Validation first (selection), then the splits of patients/slides no training or selection saw.
SPLITS = {"psfhs": ["val", "holdout"], "glomeruli": ["val", "test", "external-test"], "polyp": ["val", "test"]}

# The targets: (label, headline metric, structure or None, comparison, value).
TARGETS = {
    "psfhs": [("FH Dice ≥ 0.96", "dice", "fetal head", ">=", 0.96), ("PS Dice ≥ 0.91", "dice", "pubic symphysis", ">=", 0.91), ("mean abs. ΔAoP ≤ 6°", "aop_error_deg", None, "<=", 6.0)],
    "glomeruli": [("Dice ≥ 0.90", "dice", "glomerulus", ">=", 0.90), ("object F1 ≥ 0.90", "object_f1", None, ">=", 0.90)],
    "polyp": [("Dice ≥ 0.85", "dice", "polyp", ">=", 0.85)],
}

# Quoted from ../shared/data/BASELINES.md (MONAI BasicUNet, 25 min on 2 CPU cores, MONAI sliding window):
# NOT measured by this script. Polyp baseline numbers are Kvasir-SEG only (compare with the kvasir source row).
BASELINE_SOURCE = "../shared/data/BASELINES.md: MONAI BasicUNet (1.98 M params), 25 min from scratch on 2 CPU cores"
BASELINE = {
    ("psfhs", "val"): {"n": "155", "dice": {"pubic symphysis": 0.864, "fetal head": 0.910}, "steps": "404"},
    ("psfhs", "holdout"): {"n": "163", "dice": {"pubic symphysis": 0.848, "fetal head": 0.910}},
    ("polyp", "val"): {"n": "113 (Kvasir only)", "dice": {"polyp": 0.526}, "steps": "479"},
    ("polyp", "test"): {"n": "100 (Kvasir only)", "dice": {"polyp": 0.556}},
    ("glomeruli", "val"): {"n": "7", "dice": {"glomerulus": 0.217}, "object_f1": 0.000, "steps": "483"},
    ("glomeruli", "test"): {"n": "7", "dice": {"glomerulus": 0.315}, "object_f1": 0.001},
    ("glomeruli", "external-test"): {"n": "6", "dice": {"glomerulus": 0.184}, "object_f1": 0.003},
}


# --------------------------------------------------------------------------- helpers
def run_job(job) -> Any:
    """Drive a core generator to its return value (progress events are not needed here)."""
    try:
        while True:
            next(job)
    except StopIteration as stop:
        return stop.value


def evaluate(pack: Pack, recipe: Recipe, split: str, limit: int | None, out: Path, stem: str) -> dict[str, Any]:
    cases = evenly(recipe.cases(split), limit)
    t0 = time.perf_counter()
    report = run_job(evaluate_iter(pack, recipe, cases, split=split))
    write_report(report, out, stem)
    print(f"  {stem}: n={report['n_cases']} mean Dice {mean_dice(report):.3f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return report


def recipe_of(pack: Pack) -> Recipe:
    return get_recipe(pack.manifest.get("training", {}).get("dataset", ""))


def isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def ms(s: dict[str, Any] | None, digits: int = 3) -> str:
    """mean ± std of a summary, or — when undefined."""
    if not s or not s.get("n") or isnan(s.get("mean")):
        return "—"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def num(v: Any, digits: int = 3) -> str:
    return "—" if isnan(v) else f"{v:.{digits}f}"


def fg_structures(report: dict[str, Any]) -> list[str]:
    return [s for s in report["structures"] if s != "all"]


def target_status(recipe: str, head: dict[str, Any]) -> str:
    parts = []
    for label, metric, structure, op, value in TARGETS.get(recipe, []):
        got = head.get(metric, {}).get(structure) if structure else head.get(metric)
        if isnan(got):
            parts.append(f"{label}: n/a")
            continue
        ok = got >= value if op == ">=" else got <= value
        parts.append(f"{label}: {'met' if ok else 'not met'} ({got:.3f})")
    return "; ".join(parts)


def arch_label(manifest: dict[str, Any]) -> str:
    over = manifest.get("overrides")
    text = f"{manifest['architecture']}/{manifest.get('config', 'small')}"
    return text + (" " + json.dumps(over, separators=(",", ":")) if over else "")


def n_params(pack: Pack) -> float:
    return sum(p.numel() for p in pack.model.parameters()) / 1e6


def lineage(manifest: dict[str, Any], runs_root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The manifests of the training stages that led to this pack, oldest first (``--init-from`` followed
    back through the runs' packs), and notes where a link cannot be followed or verified."""
    chain, notes = [manifest], []
    while len(chain) < 10:
        t = chain[-1].get("training", {})
        source = t.get("config", {}).get("init_from")
        if not source:
            break
        folder = Path(source) if Path(source).is_absolute() else runs_root / source
        if not (folder / "manifest.json").is_file():
            notes.append(f"started from '{source}', whose manifest is not here")
            break
        previous = read_manifest(folder)
        recorded = (t.get("init_from") or {}).get("sha256")
        if recorded and recorded != previous.get("weights", {}).get("sha256"):
            notes.append(f"'{source}' has changed since this pack was trained from it")
        chain.append(previous)
    return chain[::-1], notes


def average_stages(averaged: list[dict[str, Any]], command: str | None) -> tuple[list[str | None], list[str], list[str]]:
    """Commands, bracketed steps and minutes that a ``medseg average`` adds after the first pack's own
    stages: the first pack's command (or, for an average of averages, its stages in turn), the other
    packs' training commands, then the averaging command."""
    first = averaged[0]
    if first.get("averaged_from"):
        commands, steps, minutes = average_stages(first["averaged_from"], first.get("command"))
    else:
        commands, steps, minutes = [first.get("command")], [], []
    for parent in averaged[1:]:
        commands.append(parent.get("command"))
        steps.append(f"({parent.get('steps', '?')})")
        minutes.append(f"({parent['seconds'] / 60:.1f})" if parent.get("seconds") else "(?)")
    commands.append(command)
    return commands, steps, minutes


def training_cells(manifest: dict[str, Any], runs_root: Path) -> dict[str, str]:
    """Steps, minutes and exact commands of every training stage (a fine-tuned pack lists its start too;
    a pack written by ``medseg average`` lists the stages of the first pack it averaged, the other packs'
    runs in brackets, then the averaging command)."""
    chain, notes = lineage(manifest, runs_root)
    ts = [m.get("training", {}) for m in chain]
    commands = [m.get("command") for m in chain]
    steps = [str(t.get("steps", "?")) for t in ts]
    minutes = [f"{t['seconds'] / 60:.1f}" if "seconds" in t else "?" for t in ts]
    averaged = manifest.get("averaged_from") or []
    if averaged:  # the last manifest of the chain is the average: its training record is the first pack's
        more_commands, more_steps, more_minutes = average_stages(averaged, manifest.get("command"))
        commands = commands[:-1] + more_commands
        steps += more_steps
        minutes += more_minutes
    commands = [f"`{c}`" for c in commands if c]
    if len(commands) > 1:
        commands = [f"{i + 1}. {c}" for i, c in enumerate(commands)]
    return {
        "steps": " + ".join(steps),
        "best step": str(ts[-1].get("best_step", "—")),
        "minutes": " + ".join(minutes),
        "threads": str(ts[-1].get("threads", "—")),
        "command": ("<br>".join(commands) or "(not recorded)") + ("" if not notes else " (" + "; ".join(notes) + ")"),
    }


def run_dir_of(manifest: dict[str, Any], runs_root: Path) -> Path | None:
    cfg = manifest.get("training", {}).get("config", {})
    if not cfg.get("run"):
        return None
    return runs_root / cfg.get("workdir", "work") / cfg["run"]


# --------------------------------------------------------------------------- (e) fp16 cost
def fp32_twin(pack: Pack, run_dir: Path | None) -> tuple[Pack | None, str]:
    """The pack with the run's fp32 best weights, or None and why not."""
    if pack.manifest.get("averaged_from"):
        return None, "averaged pack (medseg average): no single run holds its fp32 weights; the float32 mean against its fp16 rounding is in 'Weight averaging'"
    ckpt_path = run_dir / "ckpt.pt" if run_dir else None
    if ckpt_path is None:
        return None, "no fp32 weights: the manifest names no training run; only the fp16 pack exists"
    if not ckpt_path.is_file():
        return None, f"no fp32 weights: {ckpt_path} is absent; only the fp16 pack exists"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    best = ckpt.get("best_state") or ckpt.get("model")
    if best is None:
        return None, f"{ckpt_path} holds no weights"
    fp16 = pack.model.state_dict()
    same = set(best) == set(fp16) and all(torch.equal(v.half().float(), fp16[k].float()) if v.is_floating_point() else torch.equal(v, fp16[k]) for k, v in best.items())
    if not same:
        return None, f"{ckpt_path} best weights are not the ones this pack was rounded from (the run was changed after the pack was written)"
    m = pack.manifest
    model = models.build(m["architecture"], in_channels=pack.in_channels, num_classes=pack.num_outputs, config=pack.config, **m.get("overrides", {}))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in best.items()})
    model.eval()
    kind = "best_state" if ckpt.get("best_state") is not None else "model"
    where = ckpt_path.relative_to(REPO) if ckpt_path.is_relative_to(REPO) else ckpt_path
    return dataclasses.replace(pack, id=f"{pack.id}-fp32", model=model), f"'{kind}' of {where} (step {ckpt.get('best_step', '?')}; rounds exactly to the pack's weights)"


def pixel_changes(pack16: Pack, pack32: Pack, recipe: Recipe, split: str, n_images: int) -> tuple[float, int]:
    """Percentage of pixels whose label differs between fp16 and fp32 weights, over a few images."""
    cases = evenly(recipe.cases(split), n_images)
    p16, p32 = Predictor(pack16, PredictConfig(tile=pack16.tile, overlap=pack16.overlap)), Predictor(pack32, PredictConfig(tile=pack32.tile, overlap=pack32.overlap))
    changed = total = 0
    for case in cases:
        a, b = predict_case(p16, pack16, case), predict_case(p32, pack32, case)
        changed += int(np.count_nonzero(a != b))
        total += a.size
    return 100.0 * changed / max(total, 1), len(cases)


# --------------------------------------------------------------------------- (a) shipped packs
def shipped_section(packs: list[Pack], args, out: Path, val_reports: dict[str, dict[str, Any]]) -> str:
    """Tables of the shipped packs; their validation reports are left in ``val_reports`` (by pack id)."""
    rows_struct, rows_task, rows_source, rows_base, rows_fp16, rows_train, notes = [], [], [], [], [], [], []
    for pack in packs:
        recipe = recipe_of(pack)
        m = pack.manifest
        print(f"{pack.id} ({arch_label(m)}) on {recipe.name}", flush=True)
        reports = {}
        for split in SPLITS.get(recipe.name, ["val"]):
            rep = reports[split] = evaluate(pack, recipe, split, args.limit, out, f"{pack.id}-{split}")
            if split == "val":
                val_reports[pack.id] = rep
            unit = rep["distance_unit"]
            head = headline(rep)
            for s, ms_ in rep["structures"].items():
                rows_struct.append(
                    {
                        "pack": pack.id,
                        "split": split,
                        "n": rep["n_cases"],
                        "structure": s,
                        "Dice": ms(ms_["dice"]),
                        "IoU": ms(ms_["iou"]),
                        "HD95": ms(ms_["hd95"], 2) + f" {unit}",
                        "ASD": ms(ms_["asd"], 2) + f" {unit}",
                        "undefined distances": ms_["hd95"]["n_undefined"],
                    }
                )
            task = {"pack": pack.id, "split": split, "n": rep["n_cases"], "mean fg Dice": f"{mean_dice(rep):.3f}"}
            if "objects" in rep:
                o = rep["objects"]
                task["object F1 (P / R; TP/FP/FN)"] = f"{ms(o['f1'])} ({o['precision']['mean']:.3f} / {o['recall']['mean']:.3f}; {o['tp']}/{o['fp']}/{o['fn']})"
            if "biometry" in rep:
                b = rep["biometry"]
                task["abs. ΔAoP ° mean (median)"] = f"{num(b['aop_error_deg']['mean'], 2)} ({num(b['aop_error_deg']['median'], 2)})"
                task["abs. ΔHSD px mean (median)"] = f"{num(b['hsd_error_px']['mean'], 2)} ({num(b['hsd_error_px']['median'], 2)})"
                task["measurable"] = f"{b['measurable']} (ref. not measurable {b['reference_not_measurable']}, pred. {b['prediction_not_measurable']})"
            task["targets"] = target_status(recipe.name, head)
            rows_task.append(task)
            for src, d in rep.get("by_source", {}).items():
                rows_source.append({"pack": pack.id, "split": split, "source": src, "n": d["n"], "Dice": " / ".join(f"{s} {ms(d['structures'][s]['dice'])}" for s in fg_structures(rep) if s in d["structures"])})
            base = BASELINE.get((recipe.name, split))
            if base:
                if recipe.name == "polyp" and "kvasir" in rep.get("by_source", {}):
                    ours = {s: rep["by_source"]["kvasir"]["structures"][s]["dice"]["mean"] for s in base["dice"]}
                    ours_n = f"{rep['by_source']['kvasir']['n']} (Kvasir only)"
                else:
                    ours = {s: rep["structures"][s]["dice"]["mean"] for s in base["dice"] if s in rep["structures"]}
                    ours_n = str(rep["n_cases"])
                row = {
                    "task / split": f"{recipe.name} / {split}",
                    "structure": " / ".join(base["dice"]),
                    "baseline n": base["n"],
                    "baseline Dice (quoted)": " / ".join(f"{v:.3f}" for v in base["dice"].values()),
                    "pack n": ours_n,
                    "pack Dice (measured)": " / ".join(num(ours.get(s)) for s in base["dice"]),
                }
                if "object_f1" in base:
                    row["structure"] += " (+ object F1)"
                    row["baseline Dice (quoted)"] += f" (F1 {base['object_f1']:.3f})"
                    row["pack Dice (measured)"] += f" (F1 {num(head.get('object_f1'))})"
                rows_base.append(row)
            if split == "val" and not args.limit and m.get("metrics", {}).get("dice"):
                recorded = m["metrics"]["dice"]
                diffs = [abs(recorded[s] - head["dice"][s]) for s in recorded if s in head.get("dice", {}) and not isnan(recorded[s]) and not isnan(head["dice"][s])]
                if diffs and max(diffs) > 0.002:
                    notes.append(f"{pack.id}: validation Dice measured here differs from the manifest's by up to {max(diffs):.3f}.")
        # (d) training
        t = m.get("training", {})
        rows_train.append({"pack": pack.id, "architecture": arch_label(m), "params (M)": f"{n_params(pack):.2f}", "data": f"{t.get('dataset', '?')}: {t.get('train_cases', '?')} train / {t.get('val_cases', '?')} val", **training_cells(m, args.runs_root)})
        # (e) fp16 cost
        if args.fp16_images:
            twin, how = fp32_twin(pack, run_dir_of(m, args.runs_root))
            size16 = (pack.path / m["weights"]["file"]).stat().st_size / 2**20 if pack.path else math.nan
            size32 = sum(v.numel() * 4 for v in pack.model.state_dict().values() if v.is_floating_point()) / 2**20
            if twin is None:
                rows_fp16.append({"pack": pack.id, "weights": f"fp16 {size16:.2f} MiB (fp32 would be ≈{size32:.2f} MiB)", "fp32 source": how})
            else:
                rep16 = reports["val"]
                rep32 = evaluate(twin, recipe, "val", args.limit, out, f"{pack.id}-val-fp32")
                h16, h32 = headline(rep16), headline(rep32)
                deltas = [f"{s} {h32['dice'][s]:.4f} → {h16['dice'][s]:.4f} ({h16['dice'][s] - h32['dice'][s]:+.4f})" for s in fg_structures(rep16)]
                for key, label in (("object_f1", "object F1"), ("aop_error_deg", "abs. ΔAoP °")):
                    if key in h16 and not isnan(h16[key]) and not isnan(h32.get(key)):
                        deltas.append(f"{label} {h32[key]:.3f} → {h16[key]:.3f} ({h16[key] - h32[key]:+.3f})")
                pct, n_img = pixel_changes(pack, twin, recipe, "val", min(args.fp16_images, args.limit or args.fp16_images))
                rows_fp16.append(
                    {
                        "pack": pack.id,
                        "weights": f"fp16 {size16:.2f} MiB vs fp32 {size32:.2f} MiB",
                        "fp32 source": how,
                        "val fp32 → fp16": f"n = {rep16['n_cases']}: " + "; ".join(deltas),
                        "labels changed": f"{pct:.4f} % of pixels ({n_img} images)",
                    }
                )
    lines = [
        "Every pack scored with `medseg.train.evaluate` exactly as `medseg evaluate --model PACK --dataset D --split S` does (the tiled Predictor, "
        "the pack's µm/px, the recipe's area filter for glomeruli). Dice/IoU per image, then mean ± std over images; distances where both masks "
        "are non-empty. `val` chose the weights (best step) and the architecture; holdout/test/external-test are patients (PSFHS ID blocks), "
        "biopsies or mice that neither training nor selection saw. Reports: `" + str(args.out) + "/<pack>-<split>.json/.md`."
        + (f" **Subset: at most {args.limit} images per split, spread evenly.**" if args.limit else ""),
        "",
        "### Per structure",
        "",
        table(rows_struct, ["pack", "split", "n", "structure", "Dice", "IoU", "HD95", "ASD", "undefined distances"]),
        "",
        "### Task measures and the issue's targets",
        "",
        table(rows_task, [k for k in dict.fromkeys(k for r in rows_task for k in r) if k != "targets"] + ["targets"]),
    ]
    if rows_source:
        lines += ["", "### Per source (PSFHS: hospital A / B; polyp: Kvasir-SEG / CVC-ClinicDB)", "", table(rows_source, ["pack", "split", "source", "n", "Dice"])]
    if rows_base:
        lines += ["", f"### Against the plain U-Net baseline (quoted from {BASELINE_SOURCE}; not measured here)", "", table(rows_base, list(rows_base[0]))]
    if rows_fp16:
        lines += [
            "",
            "### What fp16 weights cost (pack weights vs the run's fp32 best weights, same validation cases)",
            "",
            table(rows_fp16, list(dict.fromkeys(k for r in rows_fp16 for k in r))),
        ]
    lines += ["", "### How each pack was trained (exact command from its manifest)", "", table(rows_train, ["pack", "architecture", "params (M)", "data", "steps", "best step", "minutes", "threads", "command"])]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- (b) architectures tried
def run_label(pack: Pack) -> str:
    """``work/<run>`` for a run's pack, else the pack folder."""
    folder = (pack.path or Path(pack.id)).resolve()
    if folder.name == "pack":
        folder = folder.parent
    return str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder)


def tried_section(tried: list[Pack], shipped: list[Pack], args, out: Path, val_reports: dict[str, dict[str, Any]]) -> str:
    by_dataset: dict[str, list[tuple[str, Pack, str]]] = {}
    for pack in tried:
        by_dataset.setdefault(recipe_of(pack).name, []).append(("tried", pack, run_label(pack)))
    only_shipped = []
    for pack in shipped:
        name = recipe_of(pack).name
        if name not in by_dataset:
            only_shipped.append(f"{name} ({pack.id})")
        by_dataset.setdefault(name, []).append(("shipped", pack, f"shipped pack {pack.id}"))
    lines = [
        "Each run's pack (best step on its quick validation subset) scored on the **whole validation split** with `medseg.train.evaluate`; "
        "screening runs had equal wall-clock budgets (`--minutes`) on a shared, loaded CPU, so `steps` says how far each got. "
        "The baseline row is quoted from BASELINES.md, not measured here."
        + (f" **Subset: at most {args.limit} images.**" if args.limit else ""),
    ]
    for dataset, entries in by_dataset.items():
        recipe = get_recipe(dataset)
        structures = list(recipe.class_names[1:])
        rows = []
        for kind, pack, label in entries:
            if kind == "shipped" and pack.id in val_reports:
                rep = val_reports[pack.id]
            else:
                print(f"{label} ({arch_label(pack.manifest)}) on {dataset}/val", flush=True)
                rep = evaluate(pack, recipe, "val", args.limit, out, f"tried-{Path(label).name}-val")
            head = headline(rep)
            row = {"run": label, "architecture": arch_label(pack.manifest), "params (M)": f"{n_params(pack):.2f}", "n": rep["n_cases"]}
            row.update({f"Dice {s}": ms(rep["structures"][s]["dice"]) for s in structures})
            row["mean fg Dice"] = f"{mean_dice(rep):.3f}"
            if "biometry" in rep:
                row["abs. ΔAoP °"] = num(head.get("aop_error_deg"), 2)
            if "objects" in rep:
                row["object F1"] = num(head.get("object_f1"))
            row.update(training_cells(pack.manifest, args.runs_root))
            row["_score"] = mean_dice(rep) + (1.0 if kind == "shipped" else 0.0)
            rows.append(row)
        rows.sort(key=lambda r: -r["_score"])
        base = BASELINE.get((dataset, "val"))
        if base:
            quoted = {"run": "baseline (quoted)", "architecture": "MONAI BasicUNet", "params (M)": "1.98", "n": base["n"]}
            quoted.update({f"Dice {s}": f"{base['dice'][s]:.3f}" for s in structures if s in base["dice"]})
            quoted["mean fg Dice"] = f"{np.mean(list(base['dice'].values())):.3f}"
            if "object_f1" in base:
                quoted["object F1"] = f"{base['object_f1']:.3f}"
            quoted.update({"steps": base.get("steps", "—"), "minutes": "25", "threads": "2", "command": BASELINE_SOURCE})
            rows.append(quoted)
        columns = list(dict.fromkeys(k for r in rows for k in r if not k.startswith("_")))
        lines += ["", f"### {recipe.title}: validation split", "", table(rows, columns)]
    if only_shipped:
        lines += ["", "No other architecture was trained for " + ", ".join(only_shipped) + ": the architecture chosen on PSFHS was trained directly."]
    if args.not_trained:
        lines += ["", "Not trained: " + "; ".join(args.not_trained) + "."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def load_list(spec: str | None) -> list[Pack]:
    packs = []
    for item in [s.strip() for s in (spec or "").split(",") if s.strip()]:
        path = Path(item)
        if (path / "pack" / "manifest.json").is_file():  # a run folder
            path = path / "pack"
        packs.append(load_pack(path if (path / "manifest.json").is_file() else item))
    return packs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packs", help="comma-separated pack ids or folders (default: every pack in resources/packs)")
    ap.add_argument("--tried", help="comma-separated run folders (work/<run>) or pack folders of the architectures tried")
    ap.add_argument("--not-trained", action="append", default=[], metavar="TEXT", help="an architecture considered but not trained, and why (repeatable)")
    ap.add_argument("--limit", type=int, default=None, help="at most N images per split, spread evenly (quick runs)")
    ap.add_argument("--fp16-images", type=int, default=8, help="validation images on which to count label changes fp16 vs fp32 (0: skip the fp16 check)")
    ap.add_argument("--runs-root", type=Path, default=REPO, help="folder the manifests' workdir is relative to (default: the repository)")
    ap.add_argument("--out", type=Path, default=Path("work/accuracy"), help="folder for the per-split JSON/Markdown reports")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-write", action="store_true", help="print the tables instead of writing benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out if args.out.is_absolute() else REPO / args.out
    if args.packs:
        shipped = load_list(args.packs)
    else:
        folder = resources_dir() / "packs"
        # multi-sequence packs take several images per case: benchmarks/multiseq.py scores them
        shipped = [load_pack(p) for name, p in sorted(available_packs().items()) if p.parent == folder and not read_manifest(p).get("sequences")]
    tried = load_list(args.tried)
    if not shipped and not tried:
        sys.exit(f"No packs to evaluate: {resources_dir() / 'packs'} holds none; give --packs or --tried.")
    command = "python " + shlex.join(["benchmarks/accuracy.py", *sys.argv[1:]])
    val_reports: dict[str, dict[str, Any]] = {}
    if shipped:
        body = shipped_section(shipped, args, out, val_reports)
        print(body) if args.no_write else write_section(SHIPPED, body, command)
    else:
        print(f"No shipped packs in {resources_dir() / 'packs'}: section '{SHIPPED}' left as it was.")
    if tried:
        body = tried_section(tried, shipped, args, out, val_reports)
        print(body) if args.no_write else write_section(TRIED, body, command)


if __name__ == "__main__":
    main()
