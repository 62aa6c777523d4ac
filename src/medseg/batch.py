"""Cohort runs on Dask distributed: one task per input, a ledger so that nothing is lost or done twice.

``medseg batch`` runs, for every input of a cohort, the very per-input function of ``medseg segment``,
``medseg wsi`` or ``medseg biometry`` (one implementation, in :mod:`medseg.cli`) as one Dask task, on a
``LocalCluster`` of this machine (one worker process per core, one thread each) or on an existing
cluster (``--scheduler tcp://host:8786``). Items that need a GPU ask for the Dask resource ``GPU=1``,
so each GPU runs one item at a time.

OUTDIR holds the outputs of every item (exactly what the single-input command writes), ``ledger.json``
(per item: the input's path, size and modification time, the pack's sha256, the options that shape
the outputs, status, outputs, seconds, worker, result or error) and ``summary.csv``. The ledger is
rewritten atomically after every finished item, so a re-run skips what is done and unchanged, redoes
what changed and never loses a finished item. A failing item records its one-line reason and never
stops the others; a worker process that dies has its item retried on another (Dask's
``distributed.scheduler.allowed-failures``), and an item that kills workers every time is recorded as
failed.

Adding a task is one entry in :data:`TASKS`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from medseg.errors import InputError, MedsegError, ModelError, UsageError

if TYPE_CHECKING:  # the CLI builds its parser from this module: torch, numpy and the readers load only when a run starts
    import numpy as np

    from medseg.engine.progress import CancelToken, Job

LEDGER = "ledger.json"
SUMMARY = "summary.csv"
LOCK = ".batch.lock"
LEDGER_FORMAT = 1
SUMMARY_COLUMNS = ("item", "status", "seconds", "worker", "result", "error")
EXIT_SOME_FAILED = 3
NOT_IN_KEY = ("device", "batch_size")  # options that do not change an item's outputs
RESERVED = ("summary", "ledger", "biometry")  # item names whose outputs would clash with OUTDIR's own files


# --------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """What one batch item is.

    ``run(path, outdir, pack, options)`` runs in a worker process, writes the item's outputs exactly as
    the single-input command does, and returns (written paths, one line of objects or measurements).
    ``options`` names the task's options besides the predictor's (they enter the ledger key, so a
    change redoes the items); ``finish(outdir, names)`` may write a cohort-wide file at the end;
    ``folders``: an item is a folder of files (a multi-sequence study) rather than one file.
    """

    name: str
    help: str
    suffixes: Callable[[], tuple[str, ...]]  # the input files a folder is expanded to
    run: Callable[[Path, Path, Any, dict], tuple[list[Path], str]]
    options: tuple[str, ...] = ()
    finish: Callable[[Path, list[str]], Path | None] | None = None
    folders: bool = False  # each input is a folder (a study), not a file


def _predictor_args(options: dict) -> SimpleNamespace:
    """The options as the parsed command line that :func:`medseg.cli.predict_config` reads."""
    return SimpleNamespace(**options)


def class_fractions(labels: np.ndarray, classes: Sequence[Any]) -> str:
    """'name 12.3%, ...' for every non-background class of a label image or stack."""
    import numpy as np

    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64, copy=False))
    total = max(int(counts.sum()), 1)
    parts = [f"{c.name} {100.0 * (counts[c.value] if c.value < len(counts) else 0) / total:.1f}%" for c in classes if c.value != 0]
    return ", ".join(parts)


def _segment_item(path: Path, outdir: Path, pack, options: dict) -> tuple[list[Path], str]:
    from medseg.cli import predict_config, segment_file
    from medseg.engine import Predictor
    from medseg.engine.progress import run_sync

    predictor = Predictor(pack, predict_config(_predictor_args(options), pack))
    out, result = run_sync(segment_file(predictor, path, outdir, mpp=options.get("mpp")))
    return [out], class_fractions(result.labels, pack.classes)


def _biometry_item(path: Path, outdir: Path, pack, options: dict) -> tuple[list[Path], str]:
    from medseg.cli import biometry_file, predict_config
    from medseg.engine.progress import run_sync
    from medseg.io import stem_of
    from medseg.measure.ultrasound import summary, write_csv

    config = predict_config(_predictor_args(options), pack)
    result, labels = run_sync(biometry_file(path, pack, config, options["method"], options.get("spacing"), options.get("grid"), outdir))
    table = write_csv(result.rows, outdir / f"{stem_of(path)}.csv")
    return [labels, table], summary(result.rows)


def _biometry_finish(outdir: Path, names: list[str]) -> Path | None:
    """OUTDIR/biometry.csv: the per-item tables of the done items, in input order, under one header."""
    header, lines = None, []
    for name in names:
        text = (outdir / f"{name}.csv").read_text(encoding="utf-8").splitlines()
        if not text:
            continue
        header = header or text[0]
        lines.extend(text[1:])
    if header is None:
        return None
    from medseg.io.atomic import atomic_write_text

    path = outdir / "biometry.csv"
    atomic_write_text(path, "\n".join([header, *lines]) + "\n")
    return path


def _wsi_item(path: Path, outdir: Path, pack, options: dict) -> tuple[list[Path], str]:
    from medseg.cli import wsi_objects
    from medseg.engine.progress import run_sync
    from medseg.engine.wsi import SlideConfig, segment_slide_iter
    from medseg.io import stem_of

    stem = stem_of(path)
    cfg = SlideConfig(tile=options.get("tile"), overlap=options.get("overlap"), batch_size=options["batch_size"], device=options["device"],
                      mpp=options.get("mpp"), tissue=options["tissue"], overwrite=True)  # a changed slide replaces its old run; a matching one resumes
    result = run_sync(segment_slide_iter(path, pack, outdir / f"{stem}.zarr", cfg))
    table, geojson = outdir / f"{stem}.csv", outdir / f"{stem}.geojson"
    objects = wsi_objects(result, pack, options.get("min_area_um2"), table, geojson)
    return [result.path, table, geojson], f"{len(objects)} objects"


def _multiseq_item(path: Path, outdir: Path, pack, options: dict) -> tuple[list[Path], str]:
    from medseg.engine.progress import run_sync
    from medseg.io import stem_of
    from medseg.multiseq import segment_study_file_iter, study_files

    out, result = run_sync(segment_study_file_iter(study_files(path), pack, outdir / f"{stem_of(path)}.nii.gz", options["device"]))
    return [out], result.notice()


def _image_suffixes() -> tuple[str, ...]:
    from medseg.io import IMAGE_SUFFIXES

    return IMAGE_SUFFIXES


def _slide_suffixes() -> tuple[str, ...]:
    from medseg.io.slides import SLIDE_SUFFIXES

    return SLIDE_SUFFIXES


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("segment", "what 'medseg segment' writes: OUTDIR/<stem>.png (.tif for stacks)", _image_suffixes, _segment_item, ("mpp",)),
        Task("wsi", "what 'medseg wsi' writes: OUTDIR/<stem>.zarr plus the objects as <stem>.csv and <stem>.geojson", _slide_suffixes, _wsi_item,
             ("mpp", "min_area_um2", "tissue")),
        Task("biometry", "what 'medseg biometry' writes: OUTDIR/<stem>.png labels and <stem>.csv (AoP, HSD per frame); all rows in biometry.csv",
             _image_suffixes, _biometry_item, ("method", "spacing", "grid"), _biometry_finish),
        Task("multiseq", "what 'medseg multiseq --study' writes for each study folder (C0 / LGE or DE / T2 NIfTI files): OUTDIR/<study>.nii.gz",
             lambda: (), _multiseq_item, folders=True),
    )
}


# --------------------------------------------------------------------------- worker side
_PACK_CACHE: dict[tuple[str, str | None], Any] = {}


def _worker_pack(folder: str, sha256: str | None):
    """The pack, loaded once per worker process and checked against the sha256 the run was started with."""
    key = (folder, sha256)
    if key not in _PACK_CACHE:
        from medseg.train.packs import load_pack

        pack = load_pack(folder)
        if sha256 is not None and pack.sha256 != sha256:
            raise ModelError(f"The pack at '{folder}' on worker {socket.gethostname()} has other weights than the one the run started with: install the same pack on every worker.")
        _PACK_CACHE.clear()
        _PACK_CACHE[key] = pack
    return _PACK_CACHE[key]


def _worker() -> tuple[str, Any]:
    try:
        from distributed import get_worker

        w = get_worker()
        return str(w.address), w.name
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}", None


def _gpu_device(device: str, worker_name: Any) -> str:
    """With GPU resources on a local cluster, worker k uses GPU k (modulo the GPUs present)."""
    import torch

    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    index = worker_name if isinstance(worker_name, int) else 0
    return f"cuda:{index % torch.cuda.device_count()}"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_item(task: Task, path: str, outdir: str, pack_folder: str, pack_sha256: str | None, options: dict, gpu: bool = False) -> dict[str, Any]:
    """One batch item, in a worker process: never raises for a bad input, returns its record."""
    t0 = time.perf_counter()
    address, name = _worker()
    record: dict[str, Any] = {"status": "done", "outputs": [], "result": "", "error": "", "worker": address}
    try:
        pack = _worker_pack(pack_folder, pack_sha256)
        opts = dict(options, device=_gpu_device(options["device"], name)) if gpu else options
        written, result = task.run(Path(path), Path(outdir), pack, opts)
        record["outputs"] = [os.path.relpath(p, outdir) for p in written if p is not None]
        record["result"] = result
    except MedsegError as exc:
        record.update(status="failed", error=one_line(str(exc)))
    except Exception as exc:  # noqa: BLE001 - an item's bug must not stop the cohort; its reason is recorded
        record.update(status="failed", error=one_line(f"internal error: {type(exc).__name__}: {exc}"))
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return record


# --------------------------------------------------------------------------- inputs
@dataclass
class Item:
    """One input of the cohort: ``name`` is its output stem; ``problem`` says why it cannot run (missing)."""

    name: str
    path: Path
    problem: str = ""


def read_manifest_csv(path: str | os.PathLike) -> list[Path]:
    """The inputs listed in a CSV's ``path`` column (relative paths are relative to the CSV's folder)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            column = next((c for c in columns if c and c.strip().lower() in ("path", "input", "file", "image", "slide")), None)
            if column is None:
                raise UsageError(f"Manifest '{path}' has no 'path' column (it has: {', '.join(columns) or 'nothing'}): name the column of input files 'path'.")
            values = [(row.get(column) or "").strip() for row in reader]
    except OSError as exc:
        raise InputError(f"Cannot read the manifest '{path}': {exc.strerror or exc}; check the path.") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"Manifest '{path}' is not a readable CSV ({exc}): save it as UTF-8 CSV with a 'path' column.") from exc
    files = [Path(v) if Path(v).is_absolute() else path.parent / v for v in values if v and not v.startswith("#")]
    if not files:
        raise UsageError(f"Manifest '{path}' lists no inputs: put one input file per row in its 'path' column.")
    return files


def gather_items(inputs: Sequence[str], manifest: str | None, task: Task) -> list[Item]:
    """Items from INPUTS (files or folders; a missing one stops the run) and/or a manifest (a missing file
    there is a failed item, so one bad row does not stop a cohort)."""
    from medseg.cli import collect_inputs
    from medseg.io import stem_of

    listed = read_manifest_csv(manifest) if manifest else []
    present = [str(p) for p in listed if p.exists()]
    files = _study_folders([*inputs, *present]) if task.folders else collect_inputs([*inputs, *present], task.suffixes()) if (inputs or present) else []
    items = [Item(stem_of(f), f) for f in files]
    names = {i.name: i.path for i in items}
    for p in listed:
        if not p.exists():
            name = stem_of(p)
            if name in names:
                raise UsageError(f"'{p}' and '{names[name]}' would both be written as '{name}': list them in different runs.")
            names[name] = p
            items.append(Item(name, p, f"'{p}' does not exist: check the path in the manifest."))
    if not items:
        raise UsageError("Give the inputs (files or folders) or a --manifest CSV with a 'path' column.")
    for item in items:
        if item.name.lower() in RESERVED:
            raise UsageError(f"'{item.path}' would be written over OUTDIR's own {item.name}.csv/.json: rename it (or copy it under another name).")
    return items


def _study_folders(inputs: Sequence[str]) -> list[Path]:
    """Folder inputs as they are (one item each); a file or a missing path stops the run."""
    folders = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise InputError(f"'{p}' does not exist: check the path.")
        if not p.is_dir():
            raise UsageError(f"'{p}' is a file, but this task takes one folder per study: give the study folders.")
        folders.append(p)
    return folders


def _fingerprint(path: Path) -> tuple[int, int]:
    """(size, newest modification time) of a file, or of the files directly in a folder."""
    if path.is_dir():
        stats = [f.stat() for f in sorted(path.iterdir()) if f.is_file()]
        return sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=path.stat().st_mtime_ns)
    st = path.stat()
    return st.st_size, st.st_mtime_ns


# --------------------------------------------------------------------------- ledger
class Ledger:
    """OUTDIR/ledger.json: what each item's outputs were made from; rewritten atomically after every item."""

    def __init__(self, outdir: Path) -> None:
        self.path = outdir / LEDGER
        self.items: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.items = dict(data["items"])
            except (ValueError, KeyError, TypeError) as exc:
                raise InputError(f"The ledger '{self.path}' is damaged ({type(exc).__name__}): move it away to redo every item, or choose another output folder.") from exc

    def current(self, name: str, key: dict[str, Any], outdir: Path, retry_failed: bool) -> dict[str, Any] | None:
        """The entry of an item whose outputs are still valid for ``key`` (or whose failure stands), else None."""
        entry = self.items.get(name)
        if not entry or entry.get("key") != key:
            return None
        if entry.get("status") == "done" and all((outdir / o).exists() for o in entry.get("outputs", [])):
            return entry
        if entry.get("status") == "failed" and not retry_failed:
            return entry
        return None

    def record(self, name: str, entry: dict[str, Any]) -> None:
        from medseg.io.atomic import atomic_write_text

        self.items[name] = entry
        atomic_write_text(self.path, json.dumps({"format": LEDGER_FORMAT, "items": self.items}, indent=1, sort_keys=True) + "\n")


def item_key(item: Item, task: Task, pack_id: str, pack_sha256: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """What an item's outputs depend on: the input (path, size, modification time; for a folder, of its files), task, pack and options."""
    try:
        size, mtime = _fingerprint(item.path)
    except OSError:
        size, mtime = None, None
    shaping = {k: v for k, v in options.items() if k not in NOT_IN_KEY}
    return {"input": str(item.path.resolve()), "size": size, "mtime_ns": mtime, "task": task.name, "pack": pack_id,
            "pack_sha256": pack_sha256, "options": json.loads(json.dumps(shaping, sort_keys=True))}


class _Lock:
    """OUTDIR/.batch.lock: one run per output folder at a time (a lock of a process that is gone is taken over)."""

    def __init__(self, outdir: Path) -> None:
        self.path = outdir / LOCK
        self.held = False

    def __enter__(self) -> "_Lock":
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == me["host"] and not _alive(int(other.get("pid", -1))):
                    self.path.unlink(missing_ok=True)
                    continue
                raise MedsegError(f"Another medseg batch (process {other.get('pid', '?')} on {other.get('host', '?')}) is writing to '{self.path.parent}': "
                                  f"wait for it, or delete '{self.path}' if no run is active.") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise MedsegError(f"Cannot lock the output folder '{self.path.parent}': delete '{self.path}' if no run is active.")

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- cluster
def parse_resources(text: str | None) -> dict[str, float]:
    """'GPU=1' or 'GPU=1,MEM=4e9' -> {'GPU': 1.0, ...}: what each item needs of the workers' Dask resources."""
    if not text:
        return {}
    found: dict[str, float] = {}
    for part in text.replace(",", " ").split():
        name, _, value = part.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not name or amount <= 0:
            raise UsageError(f"--resources '{text}' must be NAME=AMOUNT pairs with positive amounts, e.g. GPU=1.")
        found[name] = amount
    return found


def default_workers(resources: dict[str, float]) -> int:
    """One worker per GPU when items need a GPU, else one per CPU core available to this process."""
    if "GPU" in resources:
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise MedsegError("--resources GPU asks for GPUs but this machine has none that torch can use: leave it out, or give --scheduler of a cluster with GPU workers.")
        return max(1, int(n // resources["GPU"]))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _dashboard_available() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


# Dask settings of the local cluster (and the ones to give a cluster of your own, see the README):
# - one task per worker at a time: items run for seconds to hours, so holding a second one back on a busy
#   worker gains nothing, and a worker that dies then takes only its own item down with it (Dask counts a
#   death against every task the worker held);
# - no MALLOC_TRIM_THRESHOLD_ in the worker processes: Dask sets it to give memory back to the system,
#   but it also fixes glibc's mmap threshold, so every tensor allocation maps and faults in fresh pages;
#   torch inference ran 1.5-1.8x slower in such workers than in a plain process here;
# - no statistical profiler in the workers: it samples every thread's stack 100 times a second, busy or
#   idle, for a dashboard page that a batch run does not need.
CLUSTER_CONFIG = {
    "distributed.scheduler.worker-saturation": 1.0,
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
}


def cluster_config_yaml() -> str:
    """:data:`CLUSTER_CONFIG` as a Dask YAML file, for the scheduler and workers of a cluster you start yourself
    (e.g. ``~/.config/dask/medseg.yaml``, or a folder named by ``DASK_CONFIG``)."""
    import yaml

    nested: dict[str, Any] = {}
    for key, value in CLUSTER_CONFIG.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return yaml.safe_dump(nested, sort_keys=True)


def open_client(workers: int | None, scheduler: str | None, resources: dict[str, float]):
    """(client, cluster or None): a new LocalCluster of worker processes, or a client of an existing scheduler."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise MedsegError("Cohort runs need Dask distributed: install it with pip install 'napari-medseg[distributed]'.") from exc
    import logging

    import dask

    if scheduler:
        try:  # how long to try: Dask's distributed.comm.timeouts.connect (30 s unless configured)
            client = Client(scheduler, timeout=dask.config.get("distributed.comm.timeouts.connect"))
        except (OSError, TimeoutError, ValueError) as exc:
            raise MedsegError(f"Cannot reach the Dask scheduler at '{scheduler}' ({one_line(str(exc))[:160]}): start it with 'dask scheduler' and "
                              f"'dask worker {scheduler}', or leave out --scheduler to run on this machine.") from exc
        try:
            client.wait_for_workers(1, timeout=30)
        except (TimeoutError, OSError) as exc:
            client.close()
            raise MedsegError(f"The Dask scheduler at '{scheduler}' has no workers: start some with 'dask worker {scheduler}'.") from exc
        if resources:
            offered = [w.get("resources", {}) for w in client.scheduler_info(n_workers=-1)["workers"].values()]
            if not any(all(r.get(k, 0) >= v for k, v in resources.items()) for r in offered):
                client.close()
                wanted = " ".join(f"{k}={v:g}" for k, v in resources.items())
                raise MedsegError(f"No worker of the cluster at '{scheduler}' offers {wanted}: start workers with 'dask worker {scheduler} --resources \"{wanted}\"'.")
        return client, None
    n = workers if workers is not None else default_workers(resources)
    if n < 1:
        raise UsageError(f"--workers {n} must be at least 1.")
    with dask.config.set(CLUSTER_CONFIG):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1", silence_logs=logging.ERROR,
                               dashboard_address="127.0.0.1:0", resources=dict(resources) or None)  # a free port: runs side by side never clash
    return Client(cluster), cluster


def dashboard_link(client, local: bool) -> str | None:
    """The dashboard address when the scheduler serves one (its status pages need bokeh; a remote scheduler may have it)."""
    try:
        if "dashboard" not in client.scheduler_info().get("services", {}) or (local and not _dashboard_available()):
            return None
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - the address is a courtesy
        return None


# --------------------------------------------------------------------------- the run
@dataclass
class BatchResult:
    """What a batch run did: one summary row per item (input order) and the totals."""

    rows: list[dict[str, Any]]
    seconds: float
    workers: int
    summary_path: Path
    ledger_path: Path
    dashboard: str | None = None
    extra: list[Path] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]

    @property
    def ran(self) -> int:
        return sum(r["status"] in ("done", "failed") and r.get("ran", False) for r in self.rows)

    def total_line(self) -> str:
        rate = f" ({self.ran / self.seconds:.2f} items/s on {self.workers} workers)" if self.ran and self.seconds > 0 else ""
        return (f"{len(self.rows)} items: {self.count('done')} done, {self.count('skipped')} skipped (unchanged), {self.count('failed')} failed "
                f"in {self.seconds:.1f} s{rate}; summary in {self.summary_path}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _summary_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _killed_reason(exc: BaseException) -> str:
    tries = getattr(exc, "allowed_failures", None)
    times = f" {tries + 1} times" if isinstance(tries, int) else " repeatedly"
    return (f"the item stopped a worker process{times} (it crashed the process or ran out of memory): run it alone with the single-input "
            "command to see why.")


def batch_iter(
    items: Sequence[Item],
    task: Task | str,
    model: str,
    outdir: str | os.PathLike,
    options: dict[str, Any],
    workers: int | None = None,
    scheduler: str | None = None,
    resources: dict[str, float] | None = None,
    retry_failed: bool = False,
    log: Callable[[str], None] = lambda _: None,
    cancel: CancelToken | None = None,
) -> Job[BatchResult]:
    """Generator: run every item that is not done and unchanged as one Dask task; yields :class:`Progress`
    per finished item (message: done, failed, rate) and returns the :class:`BatchResult`.

    ``options``: the predictor options of the single-input commands (``tile``, ``overlap``, ``batch_size``,
    ``device``, ...) and the task's own (see :data:`TASKS`); all but device and batch size enter the ledger key.
    Nothing is started when every item is current.
    """
    from medseg.train.packs import find_pack, load_pack

    task = TASKS[task] if isinstance(task, str) else task
    resources = dict(resources or {})
    folder = find_pack(model).resolve()
    pack = load_pack(folder)  # a tampered or incompatible pack stops the run here, before any cluster starts
    out = Path(outdir).resolve()
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the output folder '{out}': {exc.strerror or exc}; choose a writable folder.") from exc
    try:
        return (yield from _batch(items, task, pack, folder, out, options, workers, scheduler, resources, retry_failed, log, cancel))
    except MedsegError:
        if created and not any(out.iterdir()):
            out.rmdir()  # a run that could not start leaves nothing behind
        raise


def _batch(items, task, pack, folder, out, options, workers, scheduler, resources, retry_failed, log, cancel):
    from medseg.io.atomic import atomic_write_text

    t0 = time.perf_counter()
    with _Lock(out):
        ledger = Ledger(out)
        rows: dict[str, dict[str, Any]] = {}
        todo: list[tuple[Item, dict[str, Any]]] = []
        for item in items:
            key = item_key(item, task, pack.id, pack.sha256, options)
            if item.problem:
                entry = {"key": key, "status": "failed", "outputs": [], "seconds": 0.0, "worker": "", "result": "", "error": item.problem, "finished": _now()}
                ledger.record(item.name, entry)
                rows[item.name] = {"item": item.name, **entry, "ran": True}
                continue
            entry = ledger.current(item.name, key, out, retry_failed)
            if entry is not None:
                rows[item.name] = {"item": item.name, **entry, "status": "skipped" if entry["status"] == "done" else "failed"}
            else:
                todo.append((item, key))
        missing = sum(bool(i.problem) for i in items)
        log(f"{len(items)} items: {len(todo)} to run, {len(items) - len(todo) - missing} unchanged since they were run"
            + (f", {missing} missing" if missing else ""))
        n_workers, link = 0, None
        if todo:
            n_workers, link = yield from _run_on_dask(todo, task, out, folder, pack.sha256, options, workers, scheduler, resources, ledger, rows, log, cancel)
        names = [i.name for i in items]
        ordered = [rows[n] for n in names]
        extra = []
        if task.finish is not None:
            made = task.finish(out, [r["item"] for r in ordered if r["status"] in ("done", "skipped")])
            extra = [made] if made else []
        summary = out / SUMMARY
        atomic_write_text(summary, _summary_csv(ordered))
    return BatchResult(ordered, time.perf_counter() - t0, n_workers, summary, ledger.path, link, extra)


def _run_on_dask(todo, task, out, folder, sha, options, workers, scheduler, resources, ledger, rows, log, cancel):
    from distributed import KilledWorker, as_completed

    from medseg.engine.progress import Progress, check_cancel

    client, cluster = open_client(workers, scheduler, resources)
    futures: dict[Any, tuple[Item, dict[str, Any]]] = {}
    try:
        info = client.scheduler_info(n_workers=-1)
        n_workers = len(info["workers"])
        link = dashboard_link(client, local=cluster is not None)
        where = f"the cluster at {scheduler}" if scheduler else f"a local cluster of {n_workers} worker processes"
        log(f"running on {where}" + (f"; dashboard: {link}" if link else ""))
        gpu = "GPU" in resources
        for item, key in todo:
            fut = client.submit(run_item, task, str(item.path), str(out), str(folder), sha, dict(options), gpu,
                                key=f"medseg-{task.name}-{item.name}-{uuid.uuid4().hex[:8]}", pure=False, resources=resources or None)
            futures[fut] = (item, key)
        total, done, failed = len(todo), 0, 0
        started = time.perf_counter()
        yield Progress(0, total, f"0 done, 0 failed on {n_workers} workers")
        for fut in as_completed(list(futures)):
            item, key = futures.pop(fut)
            try:
                record = fut.result()
            except KilledWorker as exc:
                record = {"status": "failed", "outputs": [], "result": "", "error": _killed_reason(exc), "worker": str(getattr(exc, "last_worker", "") or ""), "seconds": 0.0}
            except Exception as exc:  # noqa: BLE001 - lost to the cluster (cancelled, comm failure): recorded, the others go on
                record = {"status": "failed", "outputs": [], "result": "", "error": one_line(f"{type(exc).__name__}: {exc}"), "worker": "", "seconds": 0.0}
            fut.release()
            entry = {"key": key, **record, "finished": _now()}
            ledger.record(item.name, entry)
            rows[item.name] = {"item": item.name, **entry, "ran": True}
            done += record["status"] == "done"
            failed += record["status"] == "failed"
            rate = (done + failed) / max(time.perf_counter() - started, 1e-9)
            yield Progress(done + failed, total, f"{done} done, {failed} failed, {rate:.2f} items/s")
            check_cancel(cancel)
        return n_workers, link
    finally:
        if futures:
            client.cancel(list(futures))
        client.close()
        if cluster is not None:
            cluster.close()


# --------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    """``medseg batch``: registered by one line in :mod:`medseg.cli`."""
    from medseg.cli import _add_predict_options
    from medseg.measure.ultrasound import METHODS

    tasks = "; ".join(f"{t.name}: {t.help}" for t in TASKS.values())
    p = sub.add_parser(
        "batch",
        help="run a pack over a whole cohort on Dask (this machine or a cluster), resumable",
        description="Run one task per input on Dask distributed: a local cluster of worker processes (default) or an existing cluster "
        f"(--scheduler). Each item writes exactly what the single-input command writes ({tasks}). OUTDIR/ledger.json records "
        "finished items, so rerunning skips what is done and unchanged and redoes what changed; OUTDIR/summary.csv lists every item. "
        "Exit 0 when every item succeeded, 3 when some failed, 1 when the run could not start.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="input files or folders of them")
    p.add_argument("--manifest", metavar="FILE.csv", help="a CSV whose 'path' column lists the inputs (relative to the CSV's folder)")
    p.add_argument("--task", required=True, choices=list(TASKS), help="which single-input command each item runs")
    p.add_argument("--model", "-m", required=True, help="pack id or pack folder (see 'medseg models')")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder: the items' outputs, ledger.json and summary.csv")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, help="worker processes of the local cluster (default: one per CPU core, or one per GPU with --resources GPU=1)")
    where.add_argument("--scheduler", metavar="ADDRESS", help="run on an existing Dask cluster, e.g. tcp://host:8786 (started with 'dask scheduler' and 'dask worker ADDRESS')")
    p.add_argument("--resources", metavar="NAME=N", help="Dask resources each item needs, e.g. GPU=1: each GPU then runs one item at a time")
    p.add_argument("--retry-failed", action="store_true", help="run again the items that failed before although their inputs did not change")
    p.add_argument("--mpp", type=float, default=None, help="segment, wsi: pixel size of the inputs in µm (as for 'medseg segment' / 'medseg wsi')")
    p.add_argument("--method", choices=METHODS, default=None, help="biometry: contour (default) or ellipse")
    p.add_argument("--spacing", metavar="MM[,MM]", default=None, help="biometry: pixel size in mm where the files do not give it")
    p.add_argument("--grid", type=int, default=None, metavar="N", help="biometry: measure on N x N label maps (512: IUGC pixels)")
    p.add_argument("--min-area-um2", type=float, default=None, help="wsi: drop objects smaller than this (default: the pack's)")
    p.add_argument("--no-tissue", dest="tissue", action="store_const", const=False, default=None, help="wsi: predict every tile, glass included")
    before = {a.dest for a in p._actions}
    _add_predict_options(p)
    p.set_defaults(run=_run_batch, predict_options=[a.dest for a in p._actions if a.dest not in before])


_TASK_FLAGS = {"mpp": "--mpp", "method": "--method", "spacing": "--spacing", "grid": "--grid", "min_area_um2": "--min-area-um2", "tissue": "--no-tissue"}


def options_from_args(args, task: Task) -> dict[str, Any]:
    """The run options of ``task`` from the parsed command line; a flag of another task is bad usage."""
    from medseg.cli import _parse_spacing

    for name, flag in _TASK_FLAGS.items():
        if getattr(args, name) is not None and name not in task.options:
            raise UsageError(f"{flag} does not apply to --task {task.name}: leave it out.")
    if args.grid is not None and args.grid < 16:
        raise UsageError(f"--grid {args.grid} is too small: use at least 16 (512 for IUGC-comparable pixels).")
    options = {k: getattr(args, k) for k in args.predict_options}  # the predictor flags of 'medseg segment', whatever they are
    options.update({k: getattr(args, k) for k in task.options})
    if "method" in task.options:
        options["method"] = args.method or "contour"
    if "spacing" in task.options:
        options["spacing"] = _parse_spacing(args.spacing)
    if "tissue" in task.options:
        options["tissue"] = args.tissue is not False
    return options


def parse_options(task: str, *flags: str) -> dict[str, Any]:
    """The options ``medseg batch --task TASK FLAGS...`` would run with (for scripts and tests)."""
    from medseg.cli import build_parser

    args = build_parser().parse_args(["batch", "--task", task, "--model", "-", "--output", "-", *flags])
    return options_from_args(args, TASKS[task])


def _run_batch(args) -> int:
    from medseg.cli import _say, drive

    task = TASKS[args.task]
    options = options_from_args(args, task)
    resources = parse_resources(args.resources)
    items = gather_items(args.inputs, args.manifest, task)
    job = batch_iter(items, task, args.model, args.output, options, workers=args.workers, scheduler=args.scheduler,
                     resources=resources, retry_failed=args.retry_failed, log=_say)
    result = drive(job, desc=f"batch {task.name}", unit="item")
    failed = result.failed
    for row in failed[:10]:
        _say(f"failed: {row['item']}: {row['error']}")
    if len(failed) > 10:
        _say(f"... and {len(failed) - 10} more failed items (see {result.summary_path})")
    for path in result.extra:
        _say(f"cohort table -> {path}")
    _say(result.total_line())
    return EXIT_SOME_FAILED if failed else 0


__all__ = ["BatchResult", "Item", "Ledger", "TASKS", "Task", "add_parser", "batch_iter", "gather_items", "parse_options", "parse_resources", "read_manifest_csv", "run_item"]
