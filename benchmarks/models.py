"""Per network and config: trainable parameters, MACs and CPU latency at 256² and 512².

Every registered network (``medseg.models.names()``) in each config, built with 3 input channels and 2
classes, batch 1, eval mode. MACs: ``medseg.models.count_macs`` (``torch.utils.flop_counter.FlopCounterMode``
on one forward: conv, linear, matmul/bmm/einsum and the fused CPU SDPA kernel; soft-max, top-k, gathers,
pooling and element-wise ops are not counted), reported as GMACs; FLOPs = 2 x MACs. Latency: median of
``--repeats`` forwards under ``torch.inference_mode`` after one warm-up forward (the MAC-counting forward
at the same size), one intra-op thread by default (``--threads``; on a shared 2-core machine two OpenMP threads
stall at barriers whenever the other core is busy).

    python benchmarks/models.py [--sizes 256 512] [--repeats 3] [--configs small full]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import table, write_section  # noqa: E402

import medseg.models as models  # noqa: E402

IN_CHANNELS, NUM_CLASSES = 3, 2


def latency(model: torch.nn.Module, size: int, repeats: int, max_seconds: float) -> tuple[float, int]:
    """Median seconds of up to ``repeats`` forwards (fewer when one forward exceeds ``max_seconds / repeats``)."""
    x = torch.randn(1, IN_CHANNELS, size, size)
    times: list[float] = []
    with torch.inference_mode():
        while len(times) < repeats:
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
            if sum(times) > max_seconds and len(times) % 2 == 1:
                break
    times.sort()
    return times[len(times) // 2], len(times)


def fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=["small", "full"])
    ap.add_argument("--max-seconds", type=float, default=120.0, help="stop repeating once one cell has taken this long")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: stable medians on a shared 2-core machine)")
    ap.add_argument("--only", nargs="*", help="network names to run (default: all); RESULTS.md is written only for a full run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    names = [n for n in models.names() if not args.only or n in args.only]
    sizes = args.sizes
    rows = []
    t_start = time.perf_counter()
    for name in names:
        for config in args.configs:
            if config not in models.card(name).configs:
                continue
            torch.manual_seed(0)
            model = models.build(name, IN_CHANNELS, NUM_CLASSES, config).eval()
            row = {"network": f"`{name}`", "title": models.card(name).title, "config": config, "params": f"{models.count_parameters(model):,}"}
            macs, secs = {}, {}
            for size in sizes:
                t0 = time.perf_counter()
                macs[size] = models.count_macs(model, size, IN_CHANNELS)  # also the warm-up forward
                warm = time.perf_counter() - t0
                secs[size], runs = latency(model, size, args.repeats, args.max_seconds)
                row[f"GMACs {size}²"] = f"{macs[size] / 1e9:.2f}"
                row[f"ms {size}²"] = fmt_ms(secs[size]) + ("" if runs >= args.repeats else f" ({runs} run{'s' if runs > 1 else ''})")
                print(f"{name:12s} {config:6s} {size:4d}  params {row['params']:>12s}  {macs[size] / 1e9:7.2f} GMACs  {secs[size] * 1e3:9.1f} ms  (warm-up {warm:.1f} s)", flush=True)
            if len(sizes) >= 2:
                a, b = sizes[0], sizes[-1]
                row[f"MACs ×, {a}²→{b}²"] = f"{macs[b] / macs[a]:.2f}"
                row[f"time ×, {a}²→{b}²"] = f"{secs[b] / secs[a]:.2f}"
            rows.append(row)
            del model
    wall = time.perf_counter() - t_start

    cols = ["network", "title", "config", "params"] + [f"GMACs {s}²" for s in sizes] + [f"ms {s}²" for s in sizes]
    if len(sizes) >= 2:
        cols += [f"MACs ×, {sizes[0]}²→{sizes[-1]}²", f"time ×, {sizes[0]}²→{sizes[-1]}²"]
    pixels = (sizes[-1] / sizes[0]) ** 2
    load_note = (
        f" Timings were taken under shared load (1-minute load average {load:.1f} on {os.cpu_count()} cores at the start): "
        "absolute milliseconds are noisy, compare within a column with care."
        if load > 2
        else ""
    )
    body = (
        f"{IN_CHANNELS} input channels, {NUM_CLASSES} classes, batch 1, eval mode, CPU, {args.threads} intra-op thread{'s' if args.threads > 1 else ''}"
        f"{' (on a shared 2-core machine two OpenMP threads stall at barriers whenever the other core is busy)' if args.threads == 1 else ''}. params = trainable parameters "
        "of the segmentation model as configured. GMACs = multiply-accumulates of one forward counted by "
        "`torch.utils.flop_counter.FlopCounterMode` (conv, linear, matmul and fused SDPA; soft-max, top-k, gathers, pooling and "
        "element-wise ops not counted); **FLOPs = 2 × MACs**. ms = median of "
        f"{args.repeats} forwards under `torch.inference_mode` after a warm-up forward. The last two columns are ratios between "
        f"the two sizes: {pixels:.0f}× the pixels, so {pixels:.0f} means linear in the pixel count. Whole run {wall / 60:.1f} min."
        f"{load_note}\n\n" + table(rows, cols) + "\n\n" + NOTES
    )
    print(body)
    if args.only:
        print("(--only given: RESULTS.md not written)")
        return
    cmd = "python benchmarks/models.py"
    cmd += "" if sizes == [256, 512] else " --sizes " + " ".join(map(str, sizes))
    cmd += "" if args.repeats == 3 else f" --repeats {args.repeats}"
    cmd += "" if args.configs == ["small", "full"] else " --configs " + " ".join(args.configs)
    cmd += "" if args.threads == 1 else f" --threads {args.threads}"
    write_section("Models: parameters, MACs, CPU latency", body, command=cmd)


NOTES = """Checks against SEED_METHODS (numbers there are for other class counts; only the 1x1/3x3 head depends on it):
`dcaunet` full = 23,877,312 (9 classes, §1.6) − 7 x 64; `medformer` full = 31,281,225 (base + UPerNet E=128, 9 classes,
§3.8) − 7 x 129; `mslaunet` full = 21,896,778 (9 classes, §4.6) − 7 x 2,305; `tcsaformer` full = 21,969,472
(1 class, §2.7) + 64 -- all exact. MACs agree with the spec's measurements scaled to 256² (DCAU-Net 5.02 G at 224² ->
≈ 6.6 G; MedFormer 7.37 G at 224² -> ≈ 9.6 G; MSLAU-Net 6.25 G at 256²) except TCSAFormer, 6.91 G here against 7.57 G
measured on the official code: the official TKSA multiplies the masked dense n_m x n_m soft-max by V, ours gathers
the k = n_m / 8 kept values (§2.3 "efficient equivalent", §11.3), which removes 7/8 of the A·V products; summed over
the 26 Compressed-Attention layers at 256² that is 0.66 G, the whole difference.

Growth from 256² to 512²: U-Net, DCAU-Net and MSLAU-Net are linear in the pixels (MACs x4.0). MedFormer's DSSA keeps
n_win fixed, so its region (and the keys each query scores) grows with the image: MACs x4.3-4.4, time about x6-8.
TCSAFormer's token budgets are fractions of the stage's token count, so Compressed Attention is quadratic
(MACs x6-9, time x13-20 across our runs; top-k and gathers are not in the MAC count) -- see the attention benchmark.
"""


if __name__ == "__main__":
    main()
