"""`medseg batch` on a real Dask LocalCluster of 2 worker processes: outputs identical to the single-input
commands, a corrupt input recorded and not fatal, re-runs that skip what is done and redo what changed,
a killed worker that loses nothing, and an item that keeps killing workers marked failed."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.conftest import REPO, data_dir

pytest.importorskip("distributed")

FRAMES = ["03744", "03745", "03749", "03750", "03751"]
PACK = "ultrasound-fhps"


def medseg(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The command as a person runs it; one torch thread, as in a Dask worker process."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "medseg.cli", *args], capture_output=True, text=True, env=full_env, timeout=300, cwd=REPO)


def run_main(capsys, *args: str) -> tuple[int, str]:
    """The command in this process with one torch thread, as in a Dask worker process: (exit code, stderr)."""
    import torch

    from medseg.cli import main

    if capsys is not None:
        capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(list(args))
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().err if capsys is not None else ""


def read_summary(outdir: Path) -> dict[str, dict[str, str]]:
    with open(outdir / "summary.csv", newline="", encoding="utf-8") as fh:
        return {row["item"]: row for row in csv.DictReader(fh)}


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix == ".png"}


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes (1 thread each, as 'medseg batch' starts) that gives up on an item after it killed 2 workers."""
    import dask
    from distributed import LocalCluster

    from medseg.batch import CLUSTER_CONFIG

    with dask.config.set({**CLUSTER_CONFIG, "distributed.scheduler.allowed-failures": 1}):
        c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL)
    yield c
    c.close()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Five real ultrasound frames and a corrupt PNG, and what 'medseg segment' writes for the frames."""
    images = data_dir("psfhs") / "images"
    root = tmp_path_factory.mktemp("cohort")
    inputs = root / "in"
    inputs.mkdir()
    for name in FRAMES:
        shutil.copy(images / f"{name}.png", inputs / f"{name}.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated in transit")
    ref = root / "ref"
    assert run_main(None, "segment", *[str(inputs / f"{n}.png") for n in FRAMES], "--model", PACK, "-o", str(ref), "--device", "cpu")[0] == 0
    return root, inputs, ref


@pytest.fixture(scope="module")
def first_run(cohort):
    """The cohort through 'medseg batch' on its own local cluster of 2 worker processes."""
    root, inputs, _ = cohort
    out = root / "out"
    r = medseg("batch", str(inputs), "--task", "segment", "--model", PACK, "-o", str(out), "--workers", "2", "--device", "cpu")
    return r, out


def test_six_items_one_corrupt_give_five_identical_outputs_and_one_recorded_failure(cohort, first_run):
    _, _, ref = cohort
    r, out = first_run
    assert r.returncode == 3, r.stderr  # some items failed
    assert "local cluster of 2 worker processes" in r.stderr
    for name in FRAMES:
        assert (out / f"{name}.png").read_bytes() == (ref / f"{name}.png").read_bytes(), name
    assert not (out / "broken.png").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary or lock files
    rows = read_summary(out)
    assert list(rows) == sorted(FRAMES + ["broken"])  # input order (the folder's, sorted)
    assert {rows[n]["status"] for n in FRAMES} == {"done"} and rows["broken"]["status"] == "failed"
    assert "not an image medseg can read" in rows["broken"]["error"] and "\n" not in rows["broken"]["error"]
    assert all(rows[n]["worker"].startswith("tcp://127.0.0.1:") and float(rows[n]["seconds"]) > 0 for n in FRAMES)
    assert len({rows[n]["worker"] for n in FRAMES}) == 2  # both workers took items
    assert all("fetal head" in rows[n]["result"] for n in FRAMES)
    assert "failed: broken: 'broken.png' is not an image" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("6 items: 5 done, 0 skipped (unchanged), 1 failed in ")
    ledger = json.loads((out / "ledger.json").read_text())["items"]
    assert ledger["03744"]["key"]["pack_sha256"] == json.loads((REPO / "resources/packs" / PACK / "manifest.json").read_text())["weights"]["sha256"]
    assert ledger["03744"]["outputs"] == ["03744.png"] and ledger["broken"]["status"] == "failed"


def test_rerun_does_no_work_and_a_changed_input_is_redone_alone(cohort, first_run, cluster, tmp_path, capsys):
    root, inputs, _ = cohort
    _, out = first_run
    before = mtimes(out)
    ledger_before = json.loads((out / "ledger.json").read_text())["items"]

    code, err = run_main(capsys, "batch", str(inputs), "--task", "segment", "--model", PACK, "-o", str(out), "--scheduler", "tcp://127.0.0.1:1")
    assert code == 3, err  # the corrupt file still stands failed
    assert "6 items: 0 to run, 6 unchanged" in err and "Cannot reach" not in err  # nothing to run: no cluster needed
    assert mtimes(out) == before
    rows = read_summary(out)
    assert {rows[n]["status"] for n in FRAMES} == {"skipped"} and rows["broken"]["status"] == "failed"

    changed = inputs / "03749.png"
    shutil.copy(data_dir("psfhs") / "images" / "04510.png", changed)
    os.utime(changed, ns=(before["03749.png"] + 10**9, before["03749.png"] + 10**9))
    code, err = run_main(capsys, "batch", str(inputs), "--task", "segment", "--model", PACK, "-o", str(out), "--scheduler", cluster.scheduler_address, "--device", "cpu")
    assert code == 3, err
    assert "6 items: 1 to run, 5 unchanged" in err
    rows = read_summary(out)
    assert rows["03749"]["status"] == "done" and {rows[n]["status"] for n in FRAMES if n != "03749"} == {"skipped"}
    after = mtimes(out)
    assert after["03749.png"] != before["03749.png"] and {k: v for k, v in after.items() if k != "03749.png"} == {k: v for k, v in before.items() if k != "03749.png"}
    code, err = run_main(capsys, "segment", str(changed), "--model", PACK, "-o", str(tmp_path), "--device", "cpu")
    assert code == 0, err
    assert (out / "03749.png").read_bytes() == (tmp_path / "03749.png").read_bytes()
    ledger = json.loads((out / "ledger.json").read_text())["items"]
    assert ledger["03744"] == ledger_before["03744"] and ledger["03749"]["finished"] >= ledger_before["03749"]["finished"]
    assert ledger["03749"]["key"]["size"] == changed.stat().st_size

    code, err = run_main(capsys, "batch", str(inputs), "--task", "segment", "--model", PACK, "-o", str(out), "--scheduler", cluster.scheduler_address, "--retry-failed")
    assert code == 3 and "6 items: 1 to run" in err  # only the failed item is tried again


def test_biometry_items_match_medseg_biometry(cohort, cluster, tmp_path, capsys):
    _, inputs, _ = cohort
    two = [str(inputs / "03744.png"), str(inputs / "03750.png")]
    out, ref = tmp_path / "out", tmp_path / "ref"
    code, err = run_main(capsys, "batch", *two, "--task", "biometry", "--model", PACK, "-o", str(out), "--scheduler", cluster.scheduler_address, "--grid", "512", "--device", "cpu")
    assert code == 0, err
    assert err.strip().splitlines()[-1].startswith("2 items: 2 done, 0 skipped (unchanged), 0 failed")
    code, err = run_main(capsys, "biometry", *two, "--model", PACK, "--csv", str(ref / "all.csv"), "-o", str(ref), "--grid", "512", "--device", "cpu")
    assert code == 0, err
    assert (out / "biometry.csv").read_bytes() == (ref / "all.csv").read_bytes()  # the per-item tables, in input order
    for f in two:
        stem = Path(f).stem
        assert (out / f"{stem}.png").read_bytes() == (ref / f"{stem}.png").read_bytes()
        assert (out / f"{stem}.csv").read_text().splitlines()[1:] == [line for line in (ref / "all.csv").read_text().splitlines() if line.startswith(stem)]
    rows = read_summary(out)
    assert all("AoP" in rows[s]["result"] or "frames measured" in rows[s]["result"] for s in ("03744", "03750"))


def test_wsi_items_match_medseg_wsi(cluster, tmp_path, capsys):
    import zarr

    from tests.slide_fixtures import write_mosaic_slide

    slides = [write_mosaic_slide(tmp_path, f"slide{i}.tif", rows=1, cols=2, tile=128, gap=32, seed=i)[0] for i in range(2)]
    out = tmp_path / "out"
    code, err = run_main(capsys, "batch", *map(str, slides), "--task", "wsi", "--model", "kidney-glomeruli", "-o", str(out), "--scheduler", cluster.scheduler_address,
                         "--min-area-um2", "100", "--device", "cpu")
    assert code == 0, err
    rows = read_summary(out)
    for slide in slides:
        stem = slide.stem
        ref = tmp_path / "ref"
        code, err = run_main(capsys, "wsi", str(slide), "--model", "kidney-glomeruli", "-o", str(ref / f"{stem}.zarr"), "--csv", str(ref / f"{stem}.csv"),
                             "--geojson", str(ref / f"{stem}.geojson"), "--min-area-um2", "100", "--device", "cpu")
        assert code == 0, err
        mine, theirs = zarr.open_group(str(out / f"{stem}.zarr"), mode="r"), zarr.open_group(str(ref / f"{stem}.zarr"), mode="r")
        assert np.array_equal(mine["labels/0"][:], theirs["labels/0"][:]) and np.array_equal(mine["confidence"][:], theirs["confidence"][:])
        assert (out / f"{stem}.csv").read_bytes() == (ref / f"{stem}.csv").read_bytes()
        assert (out / f"{stem}.geojson").read_bytes() == (ref / f"{stem}.geojson").read_bytes()
        n = len((ref / f"{stem}.csv").read_text().splitlines()) - 1
        assert rows[stem]["status"] == "done" and rows[stem]["result"] == f"{n} objects"


def test_killing_a_worker_mid_run_loses_no_item(cohort, cluster, tmp_path):
    """Six 4-frame loops; when the first is done, the worker busy with another is killed (SIGKILL): its item
    runs again on the worker Dask restarts, and every output equals a plain sequential run."""
    import torch
    from distributed import Client

    from medseg.batch import TASKS, batch_iter, gather_items, parse_options
    from medseg.cli import segment_file
    from medseg.engine import Predictor, PredictConfig
    from medseg.engine.progress import run_sync
    from medseg.io import read_image
    from medseg.train.packs import resolve

    _, inputs, _ = cohort
    loops = tmp_path / "loops"
    loops.mkdir()
    frames = np.stack([read_image(inputs / f"{n}.png").array for n in FRAMES[:4]])
    for i in range(6):
        tifffile.imwrite(loops / f"loop{i}.tif", np.roll(frames, i, axis=0))
    client = Client(cluster)
    pids = client.run(os.getpid)
    killed: list[int] = []

    def kill_a_busy_worker(event) -> None:
        if killed or event.done < 1:
            return
        busy = [addr for addr, keys in client.processing().items() if keys and addr in pids]
        if busy:
            killed.append(pids[busy[0]])
            os.kill(pids[busy[0]], signal.SIGKILL)

    out = tmp_path / "out"
    items = gather_items([str(loops)], None, TASKS["segment"])
    result = run_sync(batch_iter(items, "segment", PACK, out, parse_options("segment", "--device", "cpu"), scheduler=cluster.scheduler_address), kill_a_busy_worker)
    assert killed, "no worker was busy when the first item finished"
    assert [r["status"] for r in result.rows] == ["done"] * 6 and not result.failed
    client.wait_for_workers(2, timeout=60)
    assert killed[0] not in client.run(os.getpid).values()  # the killed process is gone; Dask started another
    client.close()
    pack = resolve(PACK)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker processes
    try:
        predictor = Predictor(pack, PredictConfig(tile=pack.tile, overlap=pack.overlap, batch_size=4, device="cpu"))
        for i in range(6):
            run_sync(segment_file(predictor, loops / f"loop{i}.tif", tmp_path / "ref"))
    finally:
        torch.set_num_threads(threads)
    for i in range(6):
        assert np.array_equal(tifffile.imread(out / f"loop{i}.tif"), tifffile.imread(tmp_path / "ref" / f"loop{i}.tif")), i


def _crash_on_purpose(path: Path, outdir: Path, pack, options: dict):
    """Like the segment task, but the input named 'crash' ends the worker process as a segfault would."""
    from medseg.batch import TASKS

    if path.stem == "crash":
        os._exit(1)
    return TASKS["segment"].run(path, outdir, pack, options)


def test_an_item_that_kills_workers_is_marked_failed_and_the_others_finish(cohort, cluster, tmp_path):
    from medseg.batch import TASKS, Task, batch_iter, gather_items, parse_options
    from medseg.engine.progress import run_sync

    _, inputs, _ = cohort
    folder = tmp_path / "in"
    folder.mkdir()
    for name in FRAMES[:3]:
        shutil.copy(inputs / f"{name}.png", folder / f"{name}.png")
    shutil.copy(inputs / "03744.png", folder / "crash.png")
    task = Task("segment", TASKS["segment"].help, TASKS["segment"].suffixes, _crash_on_purpose, TASKS["segment"].options)
    items = gather_items([str(folder)], None, task)
    result = run_sync(batch_iter(items, task, PACK, tmp_path / "out", parse_options("segment", "--device", "cpu"), scheduler=cluster.scheduler_address))
    rows = {r["item"]: r for r in result.rows}
    assert rows["crash"]["status"] == "failed" and "stopped a worker process 2 times" in rows["crash"]["error"]
    assert [rows[n]["status"] for n in FRAMES[:3]] == ["done"] * 3
    assert read_summary(tmp_path / "out")["crash"]["status"] == "failed"


def test_manifest_with_a_missing_file_and_bad_usage(cohort, cluster, tmp_path, capsys, monkeypatch):
    import dask

    _, inputs, _ = cohort
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"path,site\n{inputs / '03744.png'}\nmissing.png,B\n", encoding="utf-8")
    out = tmp_path / "out"
    code, err = run_main(capsys, "batch", "--manifest", str(manifest), "--task", "segment", "--model", PACK, "-o", str(out), "--scheduler", cluster.scheduler_address)
    assert code == 3, err
    rows = read_summary(out)
    assert rows["03744"]["status"] == "done" and rows["missing"]["status"] == "failed" and "does not exist" in rows["missing"]["error"]

    (tmp_path / "bad.csv").write_text("file name\nx.png\n", encoding="utf-8")
    code, err = run_main(capsys, "batch", "--manifest", str(tmp_path / "bad.csv"), "--task", "segment", "--model", PACK, "-o", str(tmp_path / "o"))
    assert code == 2 and "no 'path' column" in err
    shutil.copy(inputs / "03744.png", tmp_path / "summary.png")
    code, err = run_main(capsys, "batch", str(tmp_path / "summary.png"), "--task", "biometry", "--model", PACK, "-o", str(tmp_path / "o"))
    assert code == 2 and "would be written over OUTDIR's own summary" in err
    code, err = run_main(capsys, "batch", str(inputs), "--task", "segment", "--model", PACK, "-o", str(tmp_path / "o"), "--method", "ellipse")
    assert code == 2 and "--method does not apply to --task segment" in err
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        code, err = run_main(capsys, "batch", str(inputs), "--task", "segment", "--model", PACK, "-o", str(tmp_path / "o"), "--scheduler", "tcp://127.0.0.1:1")
    assert code == 1 and "Cannot reach the Dask scheduler at 'tcp://127.0.0.1:1'" in err and len(err.strip().splitlines()) == 2  # the plan, then one error line
    assert not (tmp_path / "o").exists()  # a run that could not start leaves nothing behind
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    code, err = run_main(capsys, "batch", str(inputs), "--task", "segment", "--model", PACK, "-o", str(tmp_path / "o"), "--resources", "GPU=1")
    assert code == 1 and "this machine has none" in err and not (tmp_path / "o").exists()
    code, err = run_main(capsys, "batch", str(inputs), "--task", "segment", "--model", PACK, "-o", str(tmp_path / "o"), "--resources", "GPU")
    assert code == 2 and "NAME=AMOUNT" in err
    code, err = run_main(capsys, "batch", str(inputs), "--task", "segment", "--model", PACK, "-o", str(tmp_path / "o"), "--resources", "GPU=1",
                         "--scheduler", cluster.scheduler_address)
    assert code == 1 and "No worker of the cluster" in err and "--resources \"GPU=1\"" in err and not (tmp_path / "o").exists()


def test_multiseq_items_are_study_folders_matching_medseg_multiseq(cluster, tmp_path, capsys):
    """Each study folder is one item; its label volume equals 'medseg multiseq --study' on it; a folder without
    sequences is a recorded failure; a changed sequence file redoes only its study."""
    from medseg.io.nifti import read_nifti

    studies = tmp_path / "studies"
    for sid in ("subject_110", "subject_111"):
        src = data_dir("myops") / sid
        (studies / sid).mkdir(parents=True)
        for name in ("C0.nii.gz", "DE.nii.gz", "gd.nii.gz"):  # no T2; the label map must be ignored
            shutil.copy2(src / name, studies / sid / name)
    (studies / "empty_study").mkdir()
    (studies / "empty_study" / "notes.txt").write_text("no images here")
    folders = [str(p) for p in sorted(studies.iterdir())]
    out = tmp_path / "out"
    args = ("batch", *folders, "--task", "multiseq", "--model", "cardiac-myops", "-o", str(out), "--scheduler", cluster.scheduler_address, "--device", "cpu")
    code, err = run_main(capsys, *args)
    assert code == 3, err
    rows = read_summary(out)
    assert rows["empty_study"]["status"] == "failed" and "no NIfTI file named after a sequence" in rows["empty_study"]["error"]
    for sid in ("subject_110", "subject_111"):
        assert rows[sid]["status"] == "done" and "C0" in rows[sid]["result"] and "LGE" in rows[sid]["result"]
        ref = tmp_path / f"{sid}-ref.nii.gz"
        code, err = run_main(capsys, "multiseq", "--study", str(studies / sid), "-o", str(ref), "--device", "cpu")
        assert code == 0, err
        got, want = read_nifti(out / f"{sid}.nii.gz"), read_nifti(ref)
        np.testing.assert_array_equal(got.array, want.array)
        np.testing.assert_allclose(got.affine, want.affine)
        assert set(np.unique(got.array)) <= {0, 200, 500, 600, 1220, 2221} and (got.array > 0).any()

    before = (out / "subject_110.nii.gz").stat().st_mtime_ns
    later = (studies / "subject_111" / "C0.nii.gz").stat().st_mtime_ns + 10**9
    os.utime(studies / "subject_111" / "C0.nii.gz", ns=(later, later))
    code, err = run_main(capsys, *args)
    assert code == 3, err
    assert err.strip().splitlines()[-1].startswith("3 items: 1 done, 1 skipped (unchanged), 1 failed"), err
    rows = read_summary(out)
    assert rows["subject_110"]["status"] == "skipped" and rows["subject_111"]["status"] == "done"
    assert (out / "subject_110.nii.gz").stat().st_mtime_ns == before


def test_multiseq_task_takes_folders_not_files(cluster, tmp_path, capsys):
    f = tmp_path / "C0.nii.gz"
    f.write_bytes(b"not a volume")
    code, err = run_main(capsys, "batch", str(f), "--task", "multiseq", "--model", "cardiac-myops", "-o", str(tmp_path / "out"),
                         "--scheduler", cluster.scheduler_address)
    assert code == 2 and "one folder per study" in err
