"""How many clicks does an object take, and how fast does a click answer on the CPU?

The number-of-clicks protocol (Xu et al. 2016; RITM): per object, simulated clicks at the interior
point of the largest error region (positive in a missed part, negative in a wrongly included one),
at most 20; NoC@85 / NoC@90 = clicks until the IoU first reaches 0.85 / 0.90 (20 when never), and the
IoU after 1, 3 and 5 clicks. Objects come from splits that training never saw (PSFHS holdout, the
glomeruli and polyp test splits): the fetal head and pubic symphysis (largest component per frame),
each glomerulus and each polyp (connected components). Three ways to get an object:

- automatic pack alone: the pack's own segmentation, its best-matching connected component (no clicks);
- click fallback: the automatic pack with clicks (the object under each positive click, negative
  clicks remove the region they land in);
- interactive pack (``<id>-click``): the click-guided network alone;
- interactive pack, seeded: where the pack's manifest asks for it (chosen on validation), the first
  click starts from the automatic pack's object, which the network refines (what users get).

Latency: one click on a 512 x 512 window on the CPU (median of repeats), for
the fallback's first click in a window (a network run), a click in an already predicted window
(cached), and the interactive pack's click; one torch thread, float32 and bf16 autocast.

    python benchmarks/interactive.py [--images 12] [--max-clicks 20] [--click-packs FOLDER,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import table, write_section  # noqa: E402

from medseg.engine.predictor import Predictor  # noqa: E402
from medseg.errors import MedsegError  # noqa: E402
from medseg.interactive.clicks import Click, interior_point  # noqa: E402
from medseg.interactive.evaluate import MAX_CLICKS, click_run, objects_of, summarise_runs  # noqa: E402
from medseg.interactive.session import ClickSession, FallbackEngine, GuidedEngine, seed_pack_of, window_around  # noqa: E402
from medseg.io.images import describe_array  # noqa: E402
from medseg.metrics import iou  # noqa: E402
from medseg.train.datasets import evenly, read_case_image, read_mask  # noqa: E402
from medseg.train.packs import load_pack, read_manifest  # noqa: E402
from medseg.train.recipes import get_recipe  # noqa: E402

# (recipe, split training never saw, automatic pack, interactive pack, classes with one object per image)
TASKS = [
    ("psfhs", "holdout", "ultrasound-fhps", "ultrasound-fhps-click", (1, 2)),
    ("glomeruli", "test", "kidney-glomeruli", "kidney-glomeruli-click", ()),
    ("polyp", "test", "colon-polyp", "colon-polyp-click", ()),
]
TARGETS = {"fetal head": 2, "glomerulus": 2, "pubic symphysis": 4, "polyp": 4}  # NoC@90 targets
LATENCY_TARGET_MS = 100.0


def automatic_iou(labels: np.ndarray, value: int, target: np.ndarray) -> float:
    """IoU of the automatic segmentation's best-matching connected component of the class."""
    comp, n = ndimage.label(labels == value, structure=np.ones((3, 3), bool))
    hit = np.unique(comp[target & (comp > 0)])
    return max((iou(comp == k, target) for k in hit), default=0.0)


CLICK_PACKS: dict[str, str] = {}  # interactive pack id -> folder, from --click-packs


def load(name: str):
    try:
        return load_pack(CLICK_PACKS.get(name, name))
    except MedsegError:
        return None


def run_task(recipe_name, split, auto_id, click_id, one_per_image, n_images, max_clicks, bf16=False):
    recipe = get_recipe(recipe_name)
    cases = evenly(recipe.cases(split), n_images)
    auto, guided = load(auto_id), load(click_id)
    names = {i: n for i, n in enumerate(recipe.class_names)}
    runs: dict[str, dict[str, list]] = {}
    for case in cases:
        image, rgb = read_case_image(case)
        truth = read_mask(case, recipe.num_classes)
        objects = objects_of(truth, names, largest_only=one_per_image)
        if not objects:
            continue
        labels = Predictor(auto).predict(image, rgb=rgb, mpp=case.mpp).labels
        fallback = ClickSession(image, auto, mpp=case.mpp, rgb=rgb, bf16=bf16)
        interactive = ClickSession(image, guided, mpp=case.mpp, rgb=rgb, bf16=bf16, seed=False) if guided is not None else None
        seeded = ClickSession(image, guided, mpp=case.mpp, rgb=rgb, bf16=bf16) if guided is not None and seed_pack_of(guided) is not None else None
        for name, obj in objects:
            value = next(v for v, n in names.items() if n == name)
            r = runs.setdefault(name, {"auto": [], "fallback": [], "interactive": [], "seeded": []})
            r["auto"].append(automatic_iou(labels, value, obj))
            r["fallback"].append(click_run(fallback, obj, name, max_clicks=max_clicks))
            if interactive is not None:
                r["interactive"].append(click_run(interactive, obj, name, max_clicks=max_clicks))
            if seeded is not None:
                r["seeded"].append(click_run(seeded, obj, name, max_clicks=max_clicks))
    return len(cases), runs, guided is not None


def latency(auto_id: str, click_id: str, repeats: int) -> list[dict]:
    """ms per click on a glomerulus with a 512 x 512 network window, one thread, float32 and bf16: on a
    1024 x 1024 tile at 0.5 µm/px (resampled to the pack's 1 µm/px and back) and on a 512 x 512 crop
    of it taken as if at the pack's µm/px (the network and the object logic alone)."""
    recipe = get_recipe("glomeruli")
    case = recipe.cases("test")[0]
    image, rgb = read_case_image(case)
    truth = read_mask(case, recipe.num_classes)
    auto, guided = load_pack(auto_id), load(click_id)
    row, col, _ = interior_point(max(objects_of(truth, {1: "glomerulus"}), key=lambda o: o[1].sum())[1])
    y0, x0 = min(max(row - 256, 0), image.shape[0] - 512), min(max(col - 256, 0), image.shape[1] - 512)
    setups = [
        ("1024² tile at 0.5 µm/px, resampled", image, case.mpp, Click(col, row, True)),
        ("512² crop, no resampling", np.ascontiguousarray(image[y0 : y0 + 512, x0 : x0 + 512]), None, Click(col - x0, row - y0, True)),
    ]
    rows = []
    for label, img, mpp, click in setups:
        data = describe_array(img, rgb=rgb)
        side = int(round(512 * auto.mpp / mpp)) if mpp else 512  # image pixels that make a 512 x 512 window at the pack's µm/px
        window = window_around(click.y, click.x, side, side, img.shape[:2], 1.0)
        empty = np.zeros(img.shape[:2], bool)
        for bf16 in (False, True):
            timed: dict[str, list[tuple[float, float]]] = {"first": [], "cached": [], "interactive": []}

            def clock(key, fn):
                t, cpu = time.perf_counter(), time.process_time()
                fn()
                timed[key].append((time.perf_counter() - t, time.process_time() - cpu))

            for _ in range(repeats):
                engine = FallbackEngine(auto, data, mpp, bf16=bf16)
                clock("first", lambda: engine.object_at(click))
                clock("cached", lambda: engine.object_at(click))  # the same window again: no network run
                if guided is not None:
                    g = GuidedEngine(guided, data, mpp, bf16=bf16)
                    clock("interactive", lambda: g.probability(window, [click], empty))

            def ms(key: str) -> str:
                v = timed[key][1:] if len(timed[key]) > 1 else timed[key]
                if not v:
                    return "no pack"
                cpu, wall = 1000 * float(np.median([c for _, c in v])), 1000 * float(np.median([w for w, _ in v]))
                return f"{cpu:.{1 if cpu < 10 else 0}f} CPU / {wall:.{1 if wall < 10 else 0}f} wall"

            rows.append({"input": label, "precision": "bf16 autocast" if bf16 else "float32", "fallback, first click in a window": ms("first"),
                         "fallback, click in a predicted window": ms("cached"), "interactive pack click": ms("interactive"), "target": f"≤ {LATENCY_TARGET_MS:.0f}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=12, help="images per dataset (spread evenly over the split)")
    ap.add_argument("--max-clicks", type=int, default=MAX_CLICKS)
    ap.add_argument("--repeats", type=int, default=6, help="latency repeats per setting")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the accuracy part")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU for the accuracy part too")
    ap.add_argument("--tasks", default=",".join(t[0] for t in TASKS), help="datasets to run (psfhs, glomeruli, polyp); the section is written only for all three")
    ap.add_argument("--click-packs", default="", help="comma-separated folders of interactive packs not installed (e.g. work/click-ultrasound-fhps/pack)")
    args = ap.parse_args()
    for folder in [f for f in args.click_packs.split(",") if f]:
        CLICK_PACKS[read_manifest(Path(folder))["id"]] = folder
    torch.set_num_threads(args.threads)
    rows, notes = [], []
    t0 = time.perf_counter()
    for recipe_name, split, auto_id, click_id, one, in [t for t in TASKS if t[0] in args.tasks.split(",")]:
        n_cases, runs, has_guided = run_task(recipe_name, split, auto_id, click_id, one, args.images, args.max_clicks, args.bf16)
        if not has_guided:
            notes.append(f"{click_id}: not trained yet, so no interactive row for {recipe_name}.")
        for name, r in runs.items():
            auto_mean = float(np.mean(r["auto"]))
            rows.append({"object": name, "data": f"{recipe_name} {split}, {n_cases} images", "objects": len(r["auto"]), "method": f"automatic pack alone ({auto_id})",
                         "IoU@1": f"{auto_mean:.3f} (0 clicks)", "NoC@90 target": f"≤ {TARGETS[name]}"})
            for method, label in (("fallback", f"click fallback ({auto_id})"), ("interactive", f"interactive pack ({click_id}), network alone"),
                                  ("seeded", f"interactive pack ({click_id}), first click from {auto_id} (default)")):
                if not r[method]:
                    continue
                s = summarise_runs(r[method], args.max_clicks)
                rows.append({"object": name, "data": f"{recipe_name} {split}, {n_cases} images", "objects": s["objects"], "method": label,
                             "NoC@85": f"{s['noc85']:.2f}", "NoC@90": f"{s['noc90']:.2f}", "NoC@90 target": f"≤ {TARGETS[name]}",
                             "met": "yes" if s["noc90"] <= TARGETS[name] else "no", "not at 0.90 after 20": s["failed90"],
                             "IoU@1": f"{s['iou1']:.3f}", "IoU@3": f"{s['iou3']:.3f}", "IoU@5": f"{s['iou5']:.3f}",
                             "ms/click CPU / wall (median)": f"{s['cpu_ms_per_click']:.0f} / {s['ms_per_click']:.0f}"})
    accuracy_s = time.perf_counter() - t0
    met = [f"{r['object']} ({r['method']}, {r['NoC@90']})" for r in rows if r.get("met") == "yes"]
    missed = sorted({r["object"] for r in rows if r.get("met")} - {r["object"] for r in rows if r.get("met") == "yes"})
    lat = latency("kidney-glomeruli", "kidney-glomeruli-click", args.repeats)
    torch.set_num_threads(args.threads)
    body = [
        "Question: how many simulated clicks does an object take (NoC@85/90, IoU after 1, 3, 5 clicks), and how fast is a click on the CPU? "
        "Objects from splits training never saw (PSFHS holdout, glomeruli test, polyp test), images spread evenly over the split; "
        f"at most {args.max_clicks} clicks per object (a run stops once IoU 0.90 is reached after at least 5 clicks); "
        "the automatic pack's row is its best-matching connected component without clicks.",
        "",
        table(rows, ["object", "data", "objects", "method", "NoC@85", "NoC@90", "NoC@90 target", "met", "not at 0.90 after 20", "IoU@1", "IoU@3", "IoU@5", "ms/click CPU / wall (median)"]),
        "",
        f"NoC@90 targets met: {', '.join(met) or 'none'}; not met: {', '.join(missed) or 'none'}.",
        "",
        "Latency of one click on a glomerulus, the network seeing a 512 x 512 window (kidney-glomeruli packs, a glomeruli test tile; "
        "resampled: the tile's 0.5 µm/px brought to the pack's 1 µm/px and the result back, included; median of "
        f"{args.repeats} repeats less the first; ms of CPU time of the process, all threads, and ms of wall-clock time; "
        "the wall-clock time is inflated by the other jobs sharing the 2 cores; one torch thread, as every job here):",
        "",
        table(lat, ["input", "precision", "fallback, first click in a window", "fallback, click in a predicted window", "interactive pack click", "target"]),
        "",
        f"Accuracy part: {'bf16 autocast' if args.bf16 else 'float32'}, {accuracy_s / 60:.1f} min with {args.threads} thread(s) on a shared 2-core machine (other jobs running); latencies measured under the same load.",
    ]
    body += [f"- {n}" for n in notes]
    trained = [p for p in (load(t[3]) for t in TASKS) if p is not None]
    if trained:
        body += ["", "How the interactive packs were trained (from their manifests; threads 1, on the same shared CPU):", ""]
        for p in trained:
            t = p.manifest.get("training", {})
            body.append(f"- `{p.id}`: {t.get('steps')} steps in {t.get('seconds', 0) / 60:.1f} min ({t.get('batch_size')} crops of {t.get('crop')} px per step), "
                        f"from `{t.get('init_from', {}).get('pack')}`: `{p.manifest.get('command')}`")
    if len(args.tasks.split(",")) == len(TASKS):
        write_section("Click segmentation: number of clicks and latency", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
