"""How much does tiling cost? The tiled Predictor against (a) the bare model forward on the same
tiles, (b) MONAI's sliding_window_inference with the same tile, overlap and Gaussian blending, and
(c) peak memory at two image sizes 4x apart in area (each measured in a fresh process).

Times are taken both as wall-clock and as this process's CPU time; with one torch thread (the default)
the CPU time is what the work costs even when other programs share the cores, so the ratios use it.

    python benchmarks/predictor.py [--arch unet] [--size 1024] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import measure_growth  # noqa: E402
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


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) since ``t0``."""
    return time.perf_counter() - t0[0], time.process_time() - t0[1]


def bare_forward_seconds(pack, image: np.ndarray) -> tuple[float, float]:
    """The model alone on exactly the Predictor's tiles, pre-normalised, batched the same way."""
    h, w = image.shape
    stride = int(round(TILE * (1 - OVERLAP)))
    mean, std = pack.normaliser.frame_stats(image[..., None])
    tiles = [((image[y : y + TILE, x : x + TILE].astype(np.float32) - mean) / std)[None] for y in tile_starts(h, TILE, stride) for x in tile_starts(w, TILE, stride)]
    batches = [torch.from_numpy(np.stack(tiles[i : i + BATCH])) for i in range(0, len(tiles), BATCH)]
    t0 = _clock()
    with torch.inference_mode():
        for b in batches:
            torch.softmax(pack.model(b), 1)
    return _since(t0)


def predictor_seconds(pack, image: np.ndarray) -> tuple[float, float]:
    cfg = PredictConfig(tile=TILE, overlap=OVERLAP, batch_size=BATCH, device="cpu")
    t0 = _clock()
    Predictor(pack, cfg).predict(image)
    return _since(t0)


def monai_seconds(pack, image: np.ndarray) -> tuple[float, float]:
    from monai.inferers import sliding_window_inference

    mean, std = pack.normaliser.frame_stats(image[..., None])
    t0 = _clock()
    x = torch.from_numpy((image.astype(np.float32) - mean) / std)[None, None]
    with torch.inference_mode():
        out = sliding_window_inference(x, (TILE, TILE), BATCH, lambda t: torch.softmax(pack.model(t), 1), overlap=OVERLAP, mode="gaussian", sigma_scale=0.125)
        out.argmax(1).to(torch.uint8).numpy()
    return _since(t0)


def memory_child(arch: str, size: int, engine: str) -> dict:
    """Runs in a fresh process: peak RSS growth of one prediction over the state before it."""
    torch.manual_seed(0)
    pack = untrained_pack(arch, in_channels=1, num_classes=3)
    image = make_image(size)
    small = make_image(2 * TILE)  # a full batch of tiles: the model's own activations are in the baseline
    (predictor_seconds if engine == "medseg" else monai_seconds)(pack, small)  # warm up allocators and kernels
    growth, _ = measure_growth(lambda: (predictor_seconds if engine == "medseg" else monai_seconds)(pack, image))
    return {"growth": growth, "output": size * size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="unet")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=2, metavar=("SIZE", "ENGINE"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
    wall = {k: min(w for w, _ in v) for k, v in runs.items()}
    cpu = {k: min(c for _, c in v) for k, v in runs.items()}
    n_tiles = len(tile_starts(args.size, TILE, int(round(TILE * (1 - OVERLAP))))) ** 2
    names = {"bare": "bare model forward on the same tiles", "medseg": "medseg Predictor (tiles, Gaussian blend, argmax)",
             "monai": "MONAI sliding_window_inference (same tile, overlap, Gaussian)"}
    rows = [{"engine": names[k], "CPU s (best of %d)" % args.repeats: f"{cpu[k]:.2f}", "wall s (best of %d)" % args.repeats: f"{wall[k]:.2f}",
             "tiles per CPU s": f"{n_tiles / cpu[k]:.1f}", "throughput vs bare (CPU time)": f"{cpu['bare'] / cpu[k]:.2f}"} for k in names]
    cols = ["engine", "CPU s (best of %d)" % args.repeats, "wall s (best of %d)" % args.repeats, "tiles per CPU s", "throughput vs bare (CPU time)"]
    mem_rows = []
    for engine in ("medseg", "monai"):
        for size in (args.size, args.size * 2):
            growths = []
            for _ in range(3):  # the allocator's peaks vary from process to process: the median of three
                out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--threads", str(args.threads), "--child", str(size), engine],
                                     capture_output=True, text=True, check=True)
                growths.append(json.loads(out.stdout.strip().splitlines()[-1])["growth"])
            m = {"growth": sorted(growths)[1], "output": size * size}
            mem_rows.append({"engine": engine, "image": f"{size}x{size}", "peak growth MiB": f"{m['growth'] / 2**20:.1f}", "uint8 output MiB": f"{m['output'] / 2**20:.1f}", "input image MiB": f"{size * size / 2**20:.1f}"})
    body = (
        f"Model: `{args.arch}` small config (untrained, 1 channel, 3 classes); grey image {args.size}x{args.size}; tile {TILE}, overlap {OVERLAP}, batch {BATCH}, "
        f"{n_tiles} tiles; CPU, {args.threads} torch thread(s).\n\n"
        + table(rows, cols)
        + f"\n\nmedseg / MONAI speed ratio (CPU time): **{cpu['monai'] / cpu['medseg']:.2f}x** (above 1 = medseg faster).\n\n"
        "Peak memory growth of one prediction (peak resident set over the resident set just before it, median of three fresh processes, each after a warm-up; includes the model's activations for one batch):\n\n"
        + table(mem_rows, ["engine", "image", "peak growth MiB", "uint8 output MiB", "input image MiB"])
    )
    print(body)
    write_section("Predictor: tiling overhead, MONAI, memory", body, command=f"python benchmarks/predictor.py --arch {args.arch} --size {args.size} --repeats {args.repeats} --threads {args.threads}")


if __name__ == "__main__":
    main()
