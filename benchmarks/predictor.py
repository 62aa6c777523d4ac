"""How much does tiling cost? The tiled Predictor against (a) the bare model forward on the same
tiles, (b) MONAI's sliding_window_inference with the same tile, overlap and Gaussian blending, and
(c) peak memory at two image sizes 4x apart in area (each measured in a fresh process).

    python benchmarks/predictor.py [--arch unet] [--size 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import table, write_section  # noqa: E402

from medseg.engine import PredictConfig, Predictor  # noqa: E402
from medseg.engine.predictor import tile_starts  # noqa: E402
from medseg.train.packs import untrained_pack  # noqa: E402

TILE, OVERLAP, BATCH = 256, 0.25, 4


def make_image(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    img = 100 + 60 * np.sin(xx / 23.0) * np.cos(yy / 31.0) + rng.normal(0, 10, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def bare_forward_seconds(pack, image: np.ndarray) -> float:
    """The model alone on exactly the Predictor's tiles, pre-normalised, batched the same way."""
    h, w = image.shape
    stride = int(round(TILE * (1 - OVERLAP)))
    mean, std = pack.normaliser.frame_stats(image[..., None])
    tiles = [((image[y : y + TILE, x : x + TILE].astype(np.float32) - mean) / std)[None] for y in tile_starts(h, TILE, stride) for x in tile_starts(w, TILE, stride)]
    batches = [torch.from_numpy(np.stack(tiles[i : i + BATCH])) for i in range(0, len(tiles), BATCH)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            torch.softmax(pack.model(b), 1)
    return time.perf_counter() - t0


def predictor_seconds(pack, image: np.ndarray) -> float:
    cfg = PredictConfig(tile=TILE, overlap=OVERLAP, batch_size=BATCH, device="cpu")
    t0 = time.perf_counter()
    Predictor(pack, cfg).predict(image)
    return time.perf_counter() - t0


def monai_seconds(pack, image: np.ndarray) -> float:
    from monai.inferers import sliding_window_inference

    mean, std = pack.normaliser.frame_stats(image[..., None])
    t0 = time.perf_counter()
    x = torch.from_numpy((image.astype(np.float32) - mean) / std)[None, None]
    with torch.inference_mode():
        out = sliding_window_inference(x, (TILE, TILE), BATCH, lambda t: torch.softmax(pack.model(t), 1), overlap=OVERLAP, mode="gaussian", sigma_scale=0.125)
        out.argmax(1).to(torch.uint8).numpy()
    return time.perf_counter() - t0


def memory_child(arch: str, size: int, engine: str) -> dict:
    """Runs in a fresh process: peak RSS growth of one prediction over the state before it."""
    torch.manual_seed(0)
    pack = untrained_pack(arch, in_channels=1, num_classes=3)
    image = make_image(size)
    small = make_image(2 * TILE)  # a full batch of tiles: the model's own activations are in the baseline
    (predictor_seconds if engine == "medseg" else monai_seconds)(pack, small)  # warm up allocators and kernels
    before = _rss_now()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (predictor_seconds if engine == "medseg" else monai_seconds)(pack, image)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"growth": max(peak, peak_before) - before, "output": size * size}


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="unet")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("SIZE", "ENGINE"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.child:
        print(json.dumps(memory_child(args.arch, int(args.child[0]), args.child[1])))
        return

    torch.manual_seed(0)
    pack = untrained_pack(args.arch, in_channels=1, num_classes=3)
    image = make_image(args.size)
    predictor_seconds(pack, make_image(TILE))  # warm-up
    runs = {"bare": [], "medseg": [], "monai": []}
    for _ in range(args.repeats):  # interleaved, so drift hits all three alike
        runs["bare"].append(bare_forward_seconds(pack, image))
        runs["medseg"].append(predictor_seconds(pack, image))
        runs["monai"].append(monai_seconds(pack, image))
    best = {k: min(v) for k, v in runs.items()}
    n_tiles = len(tile_starts(args.size, TILE, int(round(TILE * (1 - OVERLAP))))) ** 2
    rows = [
        {"engine": "bare model forward on the same tiles", "seconds (best of %d)" % args.repeats: f"{best['bare']:.2f}", "tiles/s": f"{n_tiles / best['bare']:.1f}", "throughput vs bare": "1.00"},
        {"engine": "medseg Predictor (tiles, Gaussian blend, argmax)", "seconds (best of %d)" % args.repeats: f"{best['medseg']:.2f}", "tiles/s": f"{n_tiles / best['medseg']:.1f}", "throughput vs bare": f"{best['bare'] / best['medseg']:.2f}"},
        {"engine": "MONAI sliding_window_inference (same tile, overlap, Gaussian)", "seconds (best of %d)" % args.repeats: f"{best['monai']:.2f}", "tiles/s": f"{n_tiles / best['monai']:.1f}", "throughput vs bare": f"{best['bare'] / best['monai']:.2f}"},
    ]
    cols = ["engine", "seconds (best of %d)" % args.repeats, "tiles/s", "throughput vs bare"]
    mem_rows = []
    for engine in ("medseg", "monai"):
        for size in (args.size, args.size * 2):
            out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--child", str(size), engine], capture_output=True, text=True, check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            mem_rows.append({"engine": engine, "image": f"{size}x{size}", "peak growth MiB": f"{m['growth'] / 2**20:.1f}", "uint8 output MiB": f"{m['output'] / 2**20:.1f}", "input image MiB": f"{size * size / 2**20:.1f}"})
    body = (
        f"Model: `{args.arch}` small config (untrained, 1 channel, 3 classes); grey image {args.size}x{args.size}; tile {TILE}, overlap {OVERLAP}, batch {BATCH}, "
        f"{n_tiles} tiles; CPU.\n\n"
        + table(rows, cols)
        + f"\n\nmedseg / MONAI speed ratio: **{best['monai'] / best['medseg']:.2f}x** (above 1 = medseg faster).\n\n"
        "Peak memory growth of one prediction (resident set, each in a fresh process after a warm-up; includes the model's activations for one batch):\n\n"
        + table(mem_rows, ["engine", "image", "peak growth MiB", "uint8 output MiB", "input image MiB"])
    )
    print(body)
    write_section("Predictor: tiling overhead, MONAI, memory", body, command=f"python benchmarks/predictor.py --arch {args.arch} --size {args.size} --repeats {args.repeats}")


if __name__ == "__main__":
    main()
