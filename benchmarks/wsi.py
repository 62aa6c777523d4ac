"""Whole-slide inference: does streaming cost throughput, what does tissue skipping save, and does
memory stay flat as slides grow?

Side by side in one run, on pyramidal TIFFs built from real PAS glomerulus tiles on glass
(``data/glomeruli``; a ~45 % tissue mosaic repeated to the wanted size):

1. end-to-end ``segment_slide`` (read, normalise, forward, blend, write zarr, tissue on) against the
   bare model forward on exactly the same tissue tiles, pre-read and batched the same way;
2. tissue skipping against tiling everything (same slide, same model);
3. peak memory growth of a whole run on two slides whose areas differ 4x, each in a fresh process.

    python benchmarks/wsi.py [--model PACK] [--side 3072] [--tile 512] [--batch 4] [--repeats 2]

Without ``--model`` an untrained small RGB U-Net (fixed ImageNet normalisation) stands in: the
question is the pipeline's overhead, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _memory import measure_growth, status_bytes  # noqa: E402
from _results import table, write_section  # noqa: E402

from medseg.engine.devices import resolve_device  # noqa: E402
from medseg.engine.predictor import forward_scores  # noqa: E402
from medseg.engine.tissue import detect_tissue  # noqa: E402
from medseg.engine.wsi import SlideConfig, _plan, segment_slide  # noqa: E402
from medseg.io.slides import open_slide, write_pyramid  # noqa: E402
from medseg.normalise import adapt_channels  # noqa: E402

MPP = 1.0


def make_slide(path: Path, side: int) -> Path:
    """A side x side RGB pyramid at 1 µm/px: an elliptical "section" of real tissue tiles (about 40 %
    of the area) on glass, as a biopsy or section sits on a slide."""
    if path.exists():
        return path
    from tests.slide_fixtures import glomeruli_mosaic

    block, _ = glomeruli_mosaic(rows=3, cols=4, tile=256, gap=0)  # 768 x 1024 of dense tissue
    glass = glomeruli_mosaic(rows=1, cols=1, tile=8, gap=4)[0][0, 0]
    reps = (-(-side // block.shape[0]), -(-side // block.shape[1]), 1)
    image = np.tile(block, reps)[:side, :side]
    yy, xx = np.ogrid[:side, :side]
    outside = ((yy - side / 2) / (0.42 * side)) ** 2 + ((xx - side / 2) / (0.30 * side)) ** 2 > 1
    image[outside] = glass
    image[..., 2] &= 0xFE  # no hidden mask bit here
    write_pyramid(path, image, mpp=MPP, levels=4, tile=512)
    return path


def load_pack(name: str | None, tile: int):
    if name:
        from medseg.train.packs import resolve

        pack = resolve(name)
        pack.tile = tile
        return pack
    from tests.slide_fixtures import unet_rgb_pack

    return unet_rgb_pack(mpp=MPP, tile=tile)


def config(args, **kw) -> SlideConfig:
    base = dict(tile=args.tile, batch_size=args.batch, device=args.device, overwrite=True)
    base.update(kw)
    return SlideConfig(**base)


def end_to_end(slide_path: Path, pack, out: Path, cfg: SlideConfig) -> tuple[float, object]:
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
    t0 = time.perf_counter()
    result = segment_slide(slide_path, pack, out, cfg)
    return time.perf_counter() - t0, result


def bare_forward(slide_path: Path, pack, cfg: SlideConfig) -> tuple[float, int]:
    """The model alone on the tiles the run predicts (tissue tiles), batched the same way: only the
    forward calls are timed; each batch is read and normalised just before (untimed), so the model
    sees its inputs as fresh in memory as in the pipeline."""
    device = resolve_device(cfg.device)
    model = pack.model.to(device).eval()
    seconds = 0.0
    with open_slide(slide_path) as slide:
        plan = _plan(slide, pack, cfg)
        tissue = detect_tissue(slide)
        sy, sx = plan.scale
        tiles = [(y, x) for y in plan.ys for x in plan.xs if tissue.touches(y * sy, x * sx, (y + plan.th) * sy, (x + plan.tw) * sx)]
        for i in range(0, len(tiles), cfg.batch_size):
            arrays = [pack.normaliser.apply(adapt_channels(slide.read_region(plan.level, y, x, plan.th, plan.tw), True, pack.in_channels), (0.0, 1.0)) for y, x in tiles[i : i + cfg.batch_size]]
            batch = torch.from_numpy(np.stack(arrays))
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = forward_scores(model, batch, device, pack.activation)
            out.cpu()
            seconds += time.perf_counter() - t0
    return seconds, len(tiles)


def memory_child(args) -> dict:
    """Fresh process: the peak resident set during a whole run, over the resident set just before it
    (model loaded, two warm-up forwards done); includes one batch's activations."""
    pack = load_pack(args.model, args.tile)
    slide_path, out = Path(args.child[0]), Path(args.child[1])
    device = resolve_device(args.device)
    warm = torch.zeros((args.batch, pack.in_channels, args.tile, args.tile))
    for _ in range(2):
        forward_scores(pack.model.to(device).eval(), warm, device, pack.activation)
    import openslide  # noqa: F401 - libraries loaded before the baseline, so only the run's data counts
    import zarr  # noqa: F401

    t0 = time.perf_counter()
    growth, result = measure_growth(lambda: segment_slide(slide_path, pack, out, config(args, strip=args.strip)))
    seconds = time.perf_counter() - t0
    peak = status_bytes("VmHWM")
    with open_slide(slide_path) as s:
        h, w = s.shape
    return {"growth": growth, "peak": peak, "pixels": h * w, "tiles": result.tiles, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="pack id (default: an untrained small RGB U-Net)")
    ap.add_argument("--side", type=int, default=3072, help="side of the throughput slide in pixels")
    ap.add_argument("--mem-side", type=int, default=4096, help="side of the smaller memory slide (the other is twice as wide and high)")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--strip", type=int, default=2048, help="strip width for the memory runs (below both slides' widths)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the generated slides go (default: a temporary folder)")
    ap.add_argument("--dry-run", action="store_true", help="print the tables without writing RESULTS.md")
    ap.add_argument("--child", nargs=2, metavar=("SLIDE", "OUT"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(memory_child(args)))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="medseg-wsi-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    slide = make_slide(work / f"mosaic-{args.side}.tif", args.side)
    pack = load_pack(args.model, args.tile)
    cfg_tissue = config(args, tissue=True)
    cfg_all = config(args, tissue=False)
    end_to_end(slide, pack, work / "warm.zarr", config(args, tissue=True, region=(0, 0, args.tile, args.tile)))  # warm-up

    runs: dict[str, list[float]] = {"bare": [], "e2e": [], "all": []}
    info = {}
    for _ in range(args.repeats):  # interleaved, so load drift hits all alike
        s, n_tissue = bare_forward(slide, pack, cfg_tissue)
        runs["bare"].append(s)
        s, res = end_to_end(slide, pack, work / "tissue.zarr", cfg_tissue)
        runs["e2e"].append(s)
        info["tissue"] = res
        s, res = end_to_end(slide, pack, work / "all.zarr", cfg_all)
        runs["all"].append(s)
        info["all"] = res
    best = {k: min(v) for k, v in runs.items()}
    rt, ra = info["tissue"], info["all"]
    assert rt.tiles == n_tissue, (rt.tiles, n_tissue)
    rows = [
        {"run": "bare model forward on the tissue tiles (forward calls only)", "tiles": n_tissue, "seconds": f"{best['bare']:.2f}", "tiles/s": f"{n_tissue / best['bare']:.2f}", "throughput vs bare": "1.00"},
        {"run": "medseg wsi end to end, tissue only (read, blend, zarr)", "tiles": rt.tiles, "seconds": f"{best['e2e']:.2f}", "tiles/s": f"{rt.tiles / best['e2e']:.2f}", "throughput vs bare": f"{best['bare'] / best['e2e']:.2f}"},
        {"run": "medseg wsi end to end, every tile (no tissue skipping)", "tiles": ra.tiles, "seconds": f"{best['all']:.2f}", "tiles/s": f"{ra.tiles / best['all']:.2f}", "throughput vs bare": f"{(ra.tiles / best['all']) / (n_tissue / best['bare']):.2f}"},
    ]
    mem_rows = []
    for side in (args.mem_side, args.mem_side * 2):
        path = make_slide(work / f"mosaic-{side}.tif", side)
        cmd = [sys.executable, __file__, "--tile", str(args.tile), "--batch", str(args.batch), "--device", args.device, "--strip", str(args.strip), "--child", str(path), str(work / f"mem-{side}.zarr")]
        if args.model:
            cmd += ["--model", args.model]
        if (work / f"mem-{side}.zarr").exists():
            import shutil

            shutil.rmtree(work / f"mem-{side}.zarr")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        mem_rows.append({"slide": f"{side} x {side}", "area (Mpx)": f"{m['pixels'] / 1e6:.1f}", "tiles predicted": m["tiles"], "seconds": f"{m['seconds']:.1f}",
                         "peak RSS growth MiB": f"{m['growth'] / 2**20:.0f}", "RGB level 0 MiB": f"{m['pixels'] * 3 / 2**20:.0f}"})
    device = resolve_device(args.device)
    skip = best["all"] / best["e2e"]
    body = (
        f"Slide: {args.side} x {args.side} px pyramidal TIFF at {MPP} µm/px (real PAS glomerulus tiles on glass, tissue {rt.info.get('tissue_fraction', 0):.0%} of the overview); "
        f"model: {args.model or 'untrained small RGB U-Net'}; tile {args.tile}, overlap {pack.overlap}, batch {args.batch}, device {device.type}; best of {args.repeats}.\n\n"
        + table(rows, ["run", "tiles", "seconds", "tiles/s", "throughput vs bare"])
        + f"\n\nEnd-to-end throughput is **{best['bare'] / best['e2e']:.2f}** of the bare forward on the same tiles (aim: >= 0.8). "
        f"Tissue skipping predicts {rt.tiles} of {ra.tiles} tiles and finishes **{skip:.2f}x** faster than tiling everything.\n\n"
        f"Peak memory of a whole run (fresh process each; peak resident set during the run (VmHWM, reset before it) minus the resident set just before it, "
        f"model loaded and warmed up, so one batch's activations are included; strip width {args.strip} px, "
        "so both slides are processed in several strips):\n\n"
        + table(mem_rows, ["slide", "area (Mpx)", "tiles predicted", "seconds", "peak RSS growth MiB", "RGB level 0 MiB"])
    )
    print(body)
    command = "python benchmarks/wsi.py" + (f" --model {args.model}" if args.model else "") + f" --side {args.side} --mem-side {args.mem_side} --tile {args.tile} --batch {args.batch} --repeats {args.repeats}"
    if not args.dry_run:
        write_section("Whole-slide inference: streaming overhead, tissue skipping, memory", body, command=command)


if __name__ == "__main__":
    main()
