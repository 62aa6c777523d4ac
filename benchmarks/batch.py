"""Cohort runs: what does Dask scheduling cost per item, and what do more worker processes buy?

Side by side in one run, on the same items (real PSFHS ultrasound frames, ``data/psfhs``) and the same
per-item function (``medseg.batch.run_item``, which writes exactly what ``medseg segment`` writes):

1. a plain sequential loop in this process (one torch thread, the pack loaded once);
2. ``batch_iter`` on a ``LocalCluster`` of 1 and of 2 worker processes (1 thread each), as ``medseg batch``
   starts one;
3. ``batch_iter`` through an external ``dask scheduler`` and two ``dask worker`` processes started here
   on localhost (``medseg batch --scheduler``).

Two item sizes: a single 256 x 256 frame (tens of ms of work: the overhead shows) and a loop of
``--frames`` frames (the work dominates). Workers and the loop's process are warmed (torch imported, pack
loaded, one item of each workload run) before the clock starts; the start-up is reported on its own. The runs are interleaved over
``--repeats`` rounds and the best time of each is kept, so that load from other work on a shared
machine falls on all of them alike. The sequential loop runs
in a fresh process of its own. The per-item overhead is the run time on 1 worker spent outside the items
(each item times itself), solved from runs of N items and of 1 item into a fixed cost per run
(connecting, checking the pack, summary) and a cost per item (submitting, scheduling, collecting,
ledger update). Every batch output is checked byte-equal to
the sequential loop's.

    python benchmarks/batch.py [--items 16] [--frames 12] [--repeats 3] [--model ultrasound-fhps]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import dask  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _results import table, write_section  # noqa: E402

from medseg.batch import CLUSTER_CONFIG, TASKS, batch_iter, cluster_config_yaml, gather_items, parse_options, run_item  # noqa: E402
from medseg.engine.progress import run_sync  # noqa: E402
from medseg.train.packs import find_pack, load_pack  # noqa: E402


def make_items(folder: Path, items: int, frames: int) -> tuple[Path, Path]:
    """``items`` single frames and ``items`` loops of ``frames`` frames, from real PSFHS images."""
    import imageio.v3 as iio
    import tifffile

    data = Path(os.environ.get("MEDSEG_DATA", ROOT.parent / "shared" / "data")) / "psfhs" / "images"
    names = sorted(data.glob("*.png"))[: items + frames]
    if len(names) < items + frames:
        sys.exit(f"benchmarks/batch.py needs {items + frames} PSFHS images in {data}")
    single, loops = folder / "frames", folder / "loops"
    single.mkdir()
    loops.mkdir()
    arrays = [iio.imread(p) for p in names]
    for i in range(items):
        shutil.copy(names[i], single / names[i].name)
        tifffile.imwrite(loops / f"loop{i:03d}.tif", np.stack(arrays[i : i + frames]))
    return single, loops


def sequential(folder: Path, out: Path, pack_folder: Path, sha: str) -> float:
    """The plain loop, in a fresh process of its own (as a script would run it; this process hosts schedulers
    and clients whose threads would slow a loop here); the clock starts after the pack is loaded."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, __file__, "--sequential", str(folder), str(out), str(pack_folder), sha], env=env,
                         capture_output=True, text=True, check=True)
    return float(run.stdout.strip().splitlines()[-1])


def _sequential_here(folder: Path, out: Path, pack_folder: Path, sha: str) -> None:
    torch.set_num_threads(1)
    options = parse_options("segment", "--device", "cpu")
    files = sorted(folder.iterdir())
    run_item(TASKS["segment"], str(files[0]), str(out / "warm-up"), str(pack_folder), sha, options)  # pack loaded, first forward done
    t0 = time.perf_counter()
    for f in files:
        record = run_item(TASKS["segment"], str(f), str(out), str(pack_folder), sha, options)
        assert record["status"] == "done", record
    print(time.perf_counter() - t0)


def on_dask(folder: Path, out: Path, pack_folder: Path, address: str, options: dict) -> tuple[float, float]:
    """(seconds of the whole run, seconds spent inside the items)."""
    items = gather_items([str(folder)], None, TASKS["segment"])
    t0 = time.perf_counter()
    result = run_sync(batch_iter(items, "segment", str(pack_folder), out, options, scheduler=address))
    seconds = time.perf_counter() - t0
    assert not result.failed, result.failed
    return seconds, sum(float(r["seconds"]) for r in result.rows)


def warm(client, pack_folder: Path, sha: str, n: int, firsts: dict[str, Path], scratch: Path) -> None:
    """Every worker imports torch and medseg, loads the pack and runs one item of each workload, as the sequential loop does."""
    client.wait_for_workers(n, timeout=120)
    options = parse_options("segment", "--device", "cpu")
    for folder in firsts.values():
        client.run(run_item, TASKS["segment"], str(next(folder.iterdir())), str(scratch), str(pack_folder), sha, options)


def same_outputs(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".png", ".tif"))
    assert names == sorted(p.name for p in b.iterdir() if p.suffix in (".png", ".tif")), (a, b)
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), f"{a / n} differs from {b / n}"


def external_cluster(tmp: Path, workers: int):
    """``dask scheduler`` + ``workers`` x ``dask worker`` on localhost, configured with the README's Dask YAML
    (``medseg.batch.cluster_config_yaml``); returns (address, processes)."""
    dask_cli = str(Path(sys.executable).with_name("dask"))
    config = tmp / "dask-config"
    config.mkdir()
    (config / "medseg.yaml").write_text(cluster_config_yaml())
    env = dict(os.environ, DASK_CONFIG=str(config))
    info = tmp / "scheduler.json"
    log = tmp / "cluster.log"
    with open(log, "w") as fh:
        procs = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(info)],
                                  env=env, stdout=fh, stderr=subprocess.STDOUT)]
        deadline = time.time() + 120
        while not info.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(info.read_text())["address"]
        for _ in range(workers):
            procs.append(subprocess.Popen([dask_cli, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--dashboard-address", "127.0.0.1:0"],
                                          env=env, stdout=fh, stderr=subprocess.STDOUT))
    return address, procs


def stop(procs) -> None:
    for p in reversed(procs):
        p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=16, help="items per workload (default 16)")
    ap.add_argument("--frames", type=int, default=12, help="frames per loop item (default 12)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best time of each is kept (default 3)")
    ap.add_argument("--model", default="ultrasound-fhps", help="pack (default ultrasound-fhps)")
    ap.add_argument("--no-write", action="store_true", help="print the table instead of writing benchmarks/RESULTS.md")
    ap.add_argument("--sequential", nargs=4, metavar=("FOLDER", "OUT", "PACK", "SHA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sequential:
        folder, out, pack, sha = args.sequential
        _sequential_here(Path(folder), Path(out), Path(pack), sha)
        return
    torch.set_num_threads(1)
    from distributed import Client, LocalCluster

    load_before = os.getloadavg()
    pack_folder = find_pack(args.model).resolve()
    sha = load_pack(pack_folder).sha256
    options = parse_options("segment", "--device", "cpu")
    n = args.items
    with tempfile.TemporaryDirectory(prefix="medseg-bench-batch-") as tmp_name:
        tmp = Path(tmp_name)
        workloads = dict(zip(("frame", "loop"), make_items(tmp, n, args.frames)))
        firsts = {}
        for w, folder in workloads.items():
            firsts[w] = tmp / f"first-{w}"
            firsts[w].mkdir()
            shutil.copy(sorted(folder.iterdir())[0], firsts[w])

        runs: dict[str, dict] = {}  # name -> {"workers", "start", "address"}
        clients, clusters, procs = [], [], []
        try:
            for k in (1, 2):
                t0 = time.perf_counter()
                with dask.config.set(CLUSTER_CONFIG):
                    cluster = LocalCluster(n_workers=k, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                           silence_logs=logging.ERROR)
                client = Client(cluster)
                warm(client, pack_folder, sha, k, firsts, tmp / "warm-up")
                runs[f"LocalCluster {k}"] = {"workers": k, "start": time.perf_counter() - t0, "address": cluster.scheduler_address}
                clusters.append(cluster)
                clients.append(client)
            t0 = time.perf_counter()
            address, procs = external_cluster(tmp, 2)
            client = Client(address)
            warm(client, pack_folder, sha, 2, firsts, tmp / "warm-up")
            clients.append(client)
            runs["dask scheduler + 2 dask worker"] = {"workers": 2, "start": time.perf_counter() - t0, "address": address}

            best: dict[tuple[str, str], float] = {}
            inside: dict[tuple[str, str], float] = {}  # seconds inside the items, of the best run

            def keep(key: tuple[str, str], seconds: float | tuple[float, float]) -> None:
                total, within = seconds if isinstance(seconds, tuple) else (seconds, seconds)
                if total < best.get(key, float("inf")):
                    best[key], inside[key] = total, within

            for r in range(args.repeats):  # interleaved, so that load from other work falls on every run alike
                for w, folder in workloads.items():
                    keep(("sequential loop", w), sequential(folder, tmp / f"seq-{w}-{r}", pack_folder, sha))
                    for name, run in runs.items():
                        out = tmp / f"{name.replace(' ', '_')}-{w}-{r}"
                        keep((name, w), on_dask(folder, out, pack_folder, run["address"], options))
                        same_outputs(tmp / f"seq-{w}-{r}", out)
                    keep(("one item", w), on_dask(firsts[w], tmp / f"one-{w}-{r}", pack_folder, runs["LocalCluster 1"]["address"], options))
        finally:
            for c in clients:
                c.close()
            for c in clusters:
                c.close()
            stop(procs)
    load_after = os.getloadavg()

    per_item = {w: best[("sequential loop", w)] / n for w in workloads}
    out_rows = []
    for name, workers, start in [("sequential loop", 1, None)] + [(k, v["workers"], v["start"]) for k, v in runs.items()]:
        row = {"run": name.replace("LocalCluster 1", "LocalCluster").replace("LocalCluster 2", "LocalCluster"), "worker processes": workers,
               "start + warm-up (s)": "-" if start is None else f"{start:.1f}"}
        for w, label in (("frame", "1 frame"), ("loop", f"{args.frames}-frame loop")):
            row[f"{label}: items/s"] = f"{n / best[(name, w)]:.2f}"
            row[f"{label}: speed-up"] = f"{best[('sequential loop', w)] / best[(name, w)]:.2f}x"
        out_rows.append(row)
    # time outside the items on 1 worker = fixed cost of a run + items x per-item overhead; runs of N and of 1 item solve for both
    outside_n = {w: best[("LocalCluster 1", w)] - inside[("LocalCluster 1", w)] for w in workloads}
    outside_1 = {w: best[("one item", w)] - inside[("one item", w)] for w in workloads}
    overhead = {w: (outside_n[w] - outside_1[w]) / (n - 1) * 1000 for w in workloads}
    fixed = {w: outside_1[w] * 1000 - overhead[w] for w in workloads}
    in_worker = {w: inside[("LocalCluster 1", w)] / n * 1000 for w in workloads}
    body = (
        f"{n} items per workload, pack `{args.model}` on the CPU (one torch thread per process); best of {args.repeats} interleaved rounds; "
        "every batch output checked byte-equal to the sequential loop's.\n\n"
        + table(out_rows, list(out_rows[0]))
        + f"\n\nScheduling overhead per item on 1 worker (run time outside the items, from runs of {n} items and of 1 item): "
        f"{overhead['frame']:.0f} ms per single-frame item and {overhead['loop']:.0f} ms per {args.frames}-frame loop item, against "
        f"{in_worker['frame']:.0f} ms and {in_worker['loop']:.0f} ms inside each item on that worker and {per_item['frame'] * 1000:.0f} ms and "
        f"{per_item['loop'] * 1000:.0f} ms per item in the sequential loop. Fixed cost of a run (connecting to the scheduler, checking the pack, "
        f"summary): {fixed['frame']:.0f} ms and {fixed['loop']:.0f} ms.\n\n"
        f"**Machine caveat:** this machine has only 2 CPU cores, shared with other work while this ran (load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after; 2.0 would mean both cores busy). A second worker process can therefore buy at most 2x here, and less "
        "when the other work holds the cores; on a dedicated many-core machine or a cluster the items/s scale with the worker processes "
        "until the per-item overhead above dominates."
    )
    command = f"python benchmarks/batch.py --items {args.items} --frames {args.frames} --repeats {args.repeats} --model {args.model}"
    print(body)
    if not args.no_write:
        write_section("Cohort runs on Dask (medseg batch)", body, command)


if __name__ == "__main__":
    main()
