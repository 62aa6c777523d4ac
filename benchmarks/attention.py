"""How do the efficient attentions grow with the token count? One attention module of each kind at the
same width (C = 64, the stage-1 width, each with its own head layout) on a square token map of side 32,
64, 128 and 256 (1k, 4k, 16k and 64k tokens), batch 1, forward only under ``torch.inference_mode``:

* plain multi-head self-attention (2 heads of 32, qkv/proj Linear), twice: with PyTorch's fused
  ``scaled_dot_product_attention`` (its CPU kernel is itself memory-efficient: it never holds the N x N
  matrix) and "materialised" (explicit ``softmax(Q K^T) V``, the N x N matrix is allocated);
* DCA (§1.3): Differential Cross Attention, G = 7 summary tokens per side, 1 differential head;
* Compressed Attention (§2.3): stage-1 ratios (keep 0.5, merge 0.3), budgets from the runtime N, 2 heads;
* DSSA (§3.3): stage-1 setting (k1 = 1, n_win = 8), the stage-3 setting (k1 = 16, n_win = 8) and, for
  comparison only, k1 = 1 with the region size held at 8 x 8 (n_win = side / 8, not a published setting);
* MSLA (§4.4): the GFE (stage-3/4) mixer, 4 depthwise branches of 16 channels, one shared linear-attention
  head of width 16, spatial layout.

Latency = median of the timed forwards after one untimed forward at the same size: as many as fit in 2 s
(at most 15) for cheap sizes, else ``--repeats`` (fewer if they would exceed ``--per-size-budget``). One
intra-op thread by default (``--threads``): on a 2-core machine shared with other jobs, two OpenMP threads
stall at barriers whenever the other core is busy and single forwards then swing by 10-100x. Peak
memory = growth of the resident set's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
over the resident set just before that first forward, in a fresh process per (module, size) after a
warm-up on a 16 x 16 map; it includes the (N x C) output. A size is skipped when the extrapolation from the
sizes already measured (local growth exponent, at least 1) predicts more than ``--max-seconds`` per forward
or more than ``--max-gib`` of memory (or more than 70 % of the memory available now). The growth exponent is
the least-squares slope of log(latency) and log(memory) against log(N) over the sizes measured; the slope
between the last two measured sizes is given too (it is not flattened by fixed overheads at small N).

    python benchmarks/attention.py [--sides 32 64 128 256] [--repeats 3] [--max-seconds 90] [--max-gib 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import table, write_section  # noqa: E402

from medseg.models.dcaunet import DifferentialCrossAttention, lambda_init_schedule  # noqa: E402
from medseg.models.medformer import DSSA, dssa_budget  # noqa: E402
from medseg.models.mslaunet import MSLA  # noqa: E402
from medseg.models.tcsaformer import CompressedAttention, tcsa_budgets  # noqa: E402

WIDTH = 64  # stage-1 width of TCSAFormer, DCAU-Net, MedFormer-S and MSLAU-Net
HEAD_DIM = 32
WARM_SIDE = 16
CHEAP_RUNS, CHEAP_SECONDS = 15, 2.0


class PlainMHSA(nn.Module):
    """Plain multi-head self-attention on channels-last (B, H, W, C): qkv Linear, attention, proj Linear.

    ``materialise=False``: ``F.scaled_dot_product_attention`` (fused; on the CPU a flash-style kernel that
    never holds the N x N scores). ``materialise=True``: the textbook ``softmax(Q K^T / sqrt(d)) V`` with
    the (heads, N, N) score matrix allocated.
    """

    def __init__(self, dim: int, num_heads: int, materialise: bool = False) -> None:
        super().__init__()
        self.num_heads, self.materialise = num_heads, materialise
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.materialise:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
            out = attn.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class FixedRegionDSSA(DSSA):
    """DSSA with ``n_win`` chosen per call so the region stays ``region x region`` (comparison only)."""

    def __init__(self, dim: int, num_heads: int, region: int = 8, topk: int = 1) -> None:
        super().__init__(dim, num_heads, n_win=1, topk=topk)
        self.region = region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n_win = max(1, x.shape[1] // self.region)
        return super().forward(x)


# name -> (constructor, what a query scores / attends, formula of the per-query cost)
MODULES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], str]]] = {
    "MHSA, fused SDPA (2 heads x 32)": (
        lambda: PlainMHSA(WIDTH, WIDTH // HEAD_DIM, materialise=False),
        lambda s: f"scores {s * s}",
    ),
    "MHSA, materialised softmax(QKᵀ)V (2 heads x 32)": (
        lambda: PlainMHSA(WIDTH, WIDTH // HEAD_DIM, materialise=True),
        lambda s: f"scores {s * s}",
    ),
    "DCA, G = 7 (1 differential head, sub-heads 32)": (
        lambda: DifferentialCrossAttention(WIDTH, HEAD_DIM, grid=7, lambda_init=lambda_init_schedule(1)),
        lambda s: "scores 2 x 49",
    ),
    "Compressed Attention, stage-1 ratios (2 heads x 32)": (
        lambda: CompressedAttention(WIDTH, WIDTH // HEAD_DIM, keep_ratio=0.5, merge_ratio=0.3),
        lambda s: (lambda b: f"scores {b.n_m}, attends {b.k} (n_m {b.n_m} of {s * s}; matching {(b.n_keep + 1) // 2}x{b.n_keep // 2})")(
            tcsa_budgets(s * s, 0.5, 0.3)
        ),
    ),
    "DSSA stage-1 setting, k1 = 1, n_win = 8 (2 heads x 32)": (
        lambda: DSSA(WIDTH, WIDTH // HEAD_DIM, n_win=8, topk=1),
        lambda s: (lambda b: f"scores {b.k1 * b.area}, attends {b.k2}")(dssa_budget(s, s, 8, 1)),
    ),
    "DSSA stage-3 setting, k1 = 16, n_win = 8 (2 heads x 32)": (
        lambda: DSSA(WIDTH, WIDTH // HEAD_DIM, n_win=8, topk=16),
        lambda s: (lambda b: f"scores {b.k1 * b.area}, attends {b.k2}")(dssa_budget(s, s, 8, 16)),
    ),
    "DSSA, k1 = 1, regions fixed at 8x8 (n_win = side/8; comparison only)": (
        lambda: FixedRegionDSSA(WIDTH, WIDTH // HEAD_DIM, region=8, topk=1),
        lambda s: (lambda b: f"scores {b.k1 * b.area}, attends {b.k2}")(dssa_budget(s, s, max(1, s // 8), 1)),
    ),
    "MSLA, GFE form (4 branches x 16 ch, 1 LA head of 16)": (
        lambda: MSLA(WIDTH, WIDTH // 64, layout="spatial"),
        lambda s: "context 16x16 per branch",
    ),
}


# --------------------------------------------------------------------------- child: one (module, size)
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M).group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(name: str, side: int, repeats: int, budget_s: float, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = MODULES[name][0]().eval()
    with torch.inference_mode():
        warm = torch.randn(1, WARM_SIDE, WARM_SIDE, WIDTH)
        for _ in range(2):
            module(warm)
        del warm
        x = torch.randn(1, side, side, WIDTH)
        gc.collect()
        before = _status_kib("VmRSS")
        if not _reset_peak():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
        t0 = time.perf_counter()
        out = module(x)
        first = time.perf_counter() - t0
        peak = _status_kib("VmHWM")
        del out
        # cheap sizes: more repeats (up to CHEAP_RUNS within CHEAP_SECONDS) so the median resists load spikes
        n_timed = min(CHEAP_RUNS, int(CHEAP_SECONDS / max(first, 1e-6)))
        if n_timed < repeats:
            n_timed = max(1, min(repeats, int(budget_s / max(first, 1e-6))))
        times = []
        for _ in range(n_timed):
            t0 = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t0)
        # multiply-accumulates (conv, linear, matmul, SDPA; not top-k, gathers, soft-max, element-wise)
        with FlopCounterMode(display=False) as counter:
            module(x)
    times.sort()
    return {
        "first_s": first,
        "median_s": times[len(times) // 2],
        "runs": n_timed,
        "peak_growth_bytes": max(0, peak - before) * 1024,
        "macs": counter.get_total_flops() // 2,
    }


# --------------------------------------------------------------------------- parent
def slope(ns: list[int], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(n)."""
    lx, ly = [math.log(n) for n in ns], [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def predict(ns: list[int], ys: list[float], n: int) -> float:
    """Extrapolate to ``n`` with the local exponent of the last two points (at least 1; 2 from a single point)."""
    if len(ns) >= 2:
        e = max(1.0, slope(ns[-2:], ys[-2:]))
    else:
        e = 2.0
    return ys[-1] * (n / ns[-1]) ** e


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", fh.read(), re.M).group(1)) * 1024


def fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def fmt_mib(b: float) -> str:
    mib = b / 2**20
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.1f}"


def fmt_tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sides", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=90.0)
    ap.add_argument("--max-gib", type=float, default=8.0)
    ap.add_argument("--per-size-budget", type=float, default=20.0, help="seconds of timed repeats per size (at least one run)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: stable medians on a shared 2-core machine)")
    ap.add_argument("--only", nargs="*", help="substrings of module names to run (default: all); the results file is written only for a full run")
    ap.add_argument("--child", nargs=2, metavar=("NAME", "SIDE"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.repeats, args.per_size_budget, args.threads)))
        return
    torch.set_num_threads(args.threads)  # for the machine line of RESULTS.md

    sides = sorted(args.sides)
    names = [n for n in MODULES if not args.only or any(s.lower() in n.lower() for s in args.only)]
    load = os.getloadavg()[0]
    results: dict[str, dict[int, dict]] = {}
    t_start = time.perf_counter()
    for name in names:
        results[name] = {}
        ns, ts, ms = [], [], []
        for side in sides:
            n = side * side
            if ns:
                t_pred, m_pred = predict(ns, ts, n), predict(ns, ms, n)
                mem_cap = min(args.max_gib * 2**30, 0.7 * mem_available())
                if t_pred > args.max_seconds or m_pred > mem_cap:
                    why = "predicted " + " and ".join(
                        ([f"{t_pred:.0f} s"] if t_pred > args.max_seconds else []) + ([f"{m_pred / 2**30:.0f} GiB"] if m_pred > mem_cap else [])
                    )
                    results[name][side] = {"skipped": why}
                    print(f"{name:75s} {fmt_tokens(n):>4s} skipped ({why})", flush=True)
                    continue
            cmd = [sys.executable, __file__, "--child", name, str(side), "--repeats", str(args.repeats), "--per-size-budget", str(args.per_size_budget), "--threads", str(args.threads)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(120.0, 4 * args.max_seconds))
            except subprocess.TimeoutExpired:
                results[name][side] = {"skipped": "timed out"}
                print(f"{name:75s} {fmt_tokens(n):>4s} timed out", flush=True)
                continue
            if out.returncode != 0:
                results[name][side] = {"skipped": f"failed (rc {out.returncode})"}
                print(f"{name} {side}: failed\n{out.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[name][side] = r
            ns.append(n)
            ts.append(r["median_s"])
            ms.append(max(r["peak_growth_bytes"], 4096))
            print(f"{name:75s} {fmt_tokens(n):>4s} {fmt_ms(r['median_s']):>8s} ms ({r['runs']} runs)  {fmt_mib(r['peak_growth_bytes']):>7s} MiB", flush=True)
    wall = time.perf_counter() - t_start

    rows, cost_rows = [], []
    cols = ["module"]
    for side in sides:
        cols += [f"{fmt_tokens(side * side)} ms", f"{fmt_tokens(side * side)} MiB"]
    cols += ["latency exponent (LS, all)", "latency exponent (last 2)", "memory exponent (LS, all)", "memory exponent (last 2)", "MACs exponent"]
    for name in names:
        row = {"module": name}
        ns, ts, ms, macs = [], [], [], []
        for side in sides:
            r = results[name][side]
            t = fmt_tokens(side * side)
            if "skipped" in r:
                row[f"{t} ms"] = f"skipped: {r['skipped']}"
                row[f"{t} MiB"] = "–"
                continue
            row[f"{t} ms"] = fmt_ms(r["median_s"]) + ("" if r["runs"] >= args.repeats else f" ({r['runs']} run{'s' if r['runs'] > 1 else ''})")
            row[f"{t} MiB"] = fmt_mib(r["peak_growth_bytes"])
            ns.append(side * side)
            ts.append(r["median_s"])
            ms.append(max(r["peak_growth_bytes"], 4096))
            macs.append(max(r["macs"], 1))
        if len(ns) >= 2:
            row["latency exponent (LS, all)"] = f"**{slope(ns, ts):.2f}**"
            row["latency exponent (last 2)"] = f"{slope(ns[-2:], ts[-2:]):.2f}"
            row["memory exponent (LS, all)"] = f"**{slope(ns, ms):.2f}**"
            row["memory exponent (last 2)"] = f"{slope(ns[-2:], ms[-2:]):.2f}"
            row["MACs exponent"] = f"{slope(ns, macs):.2f}"
        rows.append(row)
        cost_rows.append(
            {
                "module": name,
                **{
                    fmt_tokens(s * s): (f"{results[name][s]['macs'] / 1e9:.3g} GMACs; " if "macs" in results[name][s] else "")
                    + MODULES[name][1](s)
                    for s in sides
                },
            }
        )

    load_note = (
        f" Timings were taken under shared load (1-minute load average {load:.1f} on {os.cpu_count()} cores at the start), so "
        "absolute milliseconds are noisy; the exponents are more robust than single cells."
        if load > 2
        else ""
    )
    body = (
        f"Width C = {WIDTH} (stage-1 width), batch 1, square maps of side {', '.join(map(str, sides))} "
        f"(N = {', '.join(fmt_tokens(s * s) for s in sides)} tokens), forward only under `torch.inference_mode`, CPU, {args.threads} intra-op thread{'s' if args.threads > 1 else ''}"
        f"{' (on a shared 2-core machine two threads stall at OpenMP barriers and medians swing 10-100x)' if args.threads == 1 else ''}. "
        f"ms = median of the timed forwards after one untimed forward at that size: up to {CHEAP_RUNS} within {CHEAP_SECONDS:.0f} s for cheap sizes, "
        f"else {args.repeats} (fewer where noted, to keep each size under ~{args.per_size_budget:.0f} s). MiB = peak resident-set growth of the first forward over the "
        f"state just before it, each (module, size) in a fresh process after a warm-up on a {WARM_SIDE}x{WARM_SIDE} map (includes "
        f"the q/k/v projections and the N x C output: 16 MiB at 64k tokens). Sizes predicted to need more than "
        f"{args.max_seconds:.0f} s or {args.max_gib:.0f} GiB are skipped. Exponents: least-squares slope of log(value) against "
        f"log(N) over the sizes measured (full attention ≈ 2, linear ≈ 1), and the slope between the last two measured sizes "
        f"(less flattened by fixed per-call overheads at small N). Whole run {wall / 60:.1f} min.{load_note}\n\n"
        + table(rows, cols)
        + "\n\nMACs of one forward (FlopCounterMode: conv, linear, matmul, SDPA; top-k, gathers, soft-max and element-wise "
        "ops are not counted; FLOPs = 2 x MACs) and what one query scores (logits computed) and attends (soft-max over) at each "
        "size, from the budget formulas (§1.3, §2.3, §3.3, §4.4):\n\n"
        + table(cost_rows, ["module"] + [fmt_tokens(s * s) for s in sides])
        + "\n\n"
        + NOTES
    )
    print(body)
    if args.only:
        print("(--only given: RESULTS.md not written)")
        return
    cmd = "python benchmarks/attention.py" + ("" if sides == [32, 64, 128, 256] else " --sides " + " ".join(map(str, sides)))
    cmd += "" if args.repeats == 3 else f" --repeats {args.repeats}"
    cmd += "" if args.threads == 1 else f" --threads {args.threads}"
    cmd += "" if args.max_seconds == 90 else f" --max-seconds {args.max_seconds:g}"
    cmd += "" if args.max_gib == 8 else f" --max-gib {args.max_gib:g}"
    write_section("Attention: growth with the token count", body, command=cmd)


NOTES = """Reading the exponents (checked with the profiler on this machine):

* **Fused SDPA vs materialised MHSA.** Both do the same N² work (latency and MACs exponents ≈ 2). PyTorch's
  fused CPU kernel streams over key blocks, so its memory is linear in N (exponent ≈ 1); only the textbook
  form allocates the (heads, N, N) scores (memory exponent ≈ 2: 4 GiB at 16k tokens, 64 GiB predicted at 64k) and
  it is also slower, because writing and re-reading N² floats is memory-bound. "Full attention does not fit"
  is true of the materialised form only.
* **DCA and MSLA are linear** by construction: DCA scores every pixel against 2 x 49 summary tokens (7x7 grid);
  MSLA forms a 16x16 context per branch. MACs and memory grow with exponent ≈ 1.0. Their latency slopes
  between 16k and 64k come out at 1.0-1.6 depending on the run: not an N² term, but memory-bound ops --
  transposing copies, the soft-max over N, element-wise -- slowing down per element once the N x C maps
  (16-48 MiB each at 64k tokens) outgrow the 32 MiB L3, which the other jobs on this machine also use.
  Profiled warm with nothing else of ours running, 16k -> 64k: DCA x4.2, MSLA x5.0 (its token soft-max x8,
  its transposing copies x5-20, the qkv matmul x3.7). (DCA's two SDPA calls take PyTorch's math path, not the fused
  kernel, because the value head is 2d wide while query/key sub-heads are d: an N x 49 score map, still linear.)
* **Compressed Attention is quadratic in N as specified, not linear.** Its budgets are fractions of N
  (§2.3: n_keep = 0.5 N, n_m ≈ 0.35 N, k = n_m / 8), so TKSA computes n_m² ≈ 0.12 N² logits per head before its
  row-top-k and gathers k ∝ N value rows per query, and the bipartite matching forms an (n_keep/2)² similarity
  matrix. Pruning and merging cut the constant, not the order (MACs exponent ≈ 1.9, latency ≈ 2 overall;
  between 16k and 64k the latency slope was 2.0-2.5 across runs: at 16k tokens about half the time is the
  `gather` of the k = 716 value rows per query and a quarter the row top-k, memory-bound work that is not in
  the MAC count and suffers most from the other jobs). It is slower than fused full attention at every size measured. Memory: the
  attention runs in query chunks of at most 16M logits, so its working set is bounded (~0.4 GiB), but two
  quadratic terms remain -- the (n_keep/2)² matching similarity (1 GiB at 64k tokens) and the int64 top-k
  indices of every query, h · n_m · k, which `CompressedAttention.attend` always requests
  (`return_indices=True`) although `forward` only returns them with `return_info=True`: 1 GiB at 64k,
  doubled by their final `torch.cat`. Profiled at 64k tokens the peak is 2.3 GiB, of which ~2.0 GiB are these
  indices; without them it would be ~1.05 GiB (the matching similarity).
* **DSSA with a fixed n_win is quadratic too.** With n_win = 8 regions per side a region holds N / 64 tokens,
  so each query scores k1 · N / 64 keys and attends k2 = k1 · N / 512: work ∝ k1 · N² / 64. At k1 = 1 that term
  overtakes the linear projections only from ~16k tokens (MACs x10 from 16k to 64k, latency exponent ≈ 1.8-2.0);
  at k1 = 16 it dominates from the start (≈ 2). That is the published setting (n_win fixed, 7 or 8; at the
  published 224/256 inputs the stage-1 region is 8x8). Its memory stays near-linear (exponent ≈ 1 from 16k to
  64k) because the token top-k runs in bounded query chunks (the always-kept top-k indices are only
  h · N · k2 int64 here: 128 MiB at 64k, k1 = 1). Holding the region at 8x8 instead (n_win = side / 8, the last
  DSSA row, not a published setting) makes it linear in time too (the R x R region affinity, R = N / 64, is
  negligible at these sizes).
"""


if __name__ == "__main__":
    main()
