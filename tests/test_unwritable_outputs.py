"""A run whose files the file system refuses: a disk that fills up or a file size limit in the
middle of a run (torch's checkpoint writer, an artifact), a launch folder where Hydra cannot make
`outputs/`. Each ends in one line `seqexp: error: ...` with exit code 2, the run (if one was
started) FAILED with the line in its `error` tag, and no temporary file left.

The failing writes are real where a test can make them without root: RLIMIT_FSIZE makes every
write past a size fail with EFBIG (SIGXFSZ is ignored, as Python does by default)."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from helpers import run_seqexp, tiny_overrides
from seqexp.core.checkpoint import read_checkpoint
from seqexp.run import experiment
from seqexp.run.tracking import Tracker, store_failure_error

ROOT = Path(__file__).resolve().parent.parent
FSIZE_LIMIT = 3 << 20  # above the store (about 1 MiB), below the training state of epoch 1


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("seqexp: error: ")]


def only_run(db: Path):
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("seqexp").experiment_id])
    return run


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


def test_a_file_size_limit_that_torch_runs_into_mid_run_is_one_line_and_a_failed_run(
        tmp_path, empty_store):
    """The whole process under a file size limit: the store and best.pt fit, the training state
    after epoch 1 (weights and Adam's moments) does not. torch reports the failed write as a
    RuntimeError of its own; the line names the file, its folder and the limit."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "seqexp.apps.cli", "model=gru", "model.hidden_size=256",
         *tiny_overrides(tmp_path / "data", tmp_path / "mlflow.db"), "train.num_threads=1",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
        preexec_fn=_file_size_limit(FSIZE_LIMIT), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "Exception ignored" not in output, output[-3000:]
    expected = (f"seqexp: error: cannot write checkpoints/last.pt in {run_dir} (File too "
                f"large); the file outgrows this process's file size limit: raise it (ulimit -f)")
    assert error_lines(output) == [expected]
    run = only_run(tmp_path / "mlflow.db")
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == expected.removeprefix("seqexp: error: ")
    assert temporaries(run_dir) == []
    # the state written before the failed write is whole: the one of epoch 0
    assert read_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 0


def _refused_ranks_write(how: str, monkeypatch) -> None:
    """The ranks file's write fails: for real (a file size limit of 1 KiB for the time of the
    write) or with the OSError pyarrow raises on a full disk."""
    if how == "ENOSPC":
        def full_disk(table, where, **kwargs):
            with open(where, "wb") as handle:
                handle.write(b"PAR1")  # part of it reaches the disk
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No "
                                        "space left on device")
        monkeypatch.setattr(pq, "write_table", full_disk)  # write_ranks imports it when it writes
        return
    real = experiment.write_ranks

    def limited(*args, **kwargs):
        saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, saved[1]))
        try:
            return real(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, saved)
    monkeypatch.setattr(experiment, "write_ranks", limited)


@pytest.mark.parametrize(("how", "advice"), [
    ("EFBIG", "(File too large); the file outgrows this process's file size limit: raise it "
              "(ulimit -f)"),
    ("ENOSPC", "(No space left on device); free some space there or set "
               "hydra.run.dir=/a/folder/with/space"),
])
def test_an_artifact_the_file_system_refuses_is_one_line_and_a_failed_run(
        how, advice, tmp_path, empty_store, monkeypatch):
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    _refused_ranks_write(how, monkeypatch)
    run_dir = tmp_path / "run"
    code, output = run_seqexp(["model=pop", *tiny_overrides(tmp_path / "data",
                                                            tmp_path / "mlflow.db"),
                               f"hydra.run.dir={run_dir}"])
    assert code == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    expected = f"seqexp: error: cannot write test_ranks.parquet in {run_dir} {advice}"
    assert error_lines(output) == [expected]
    run = only_run(tmp_path / "mlflow.db")
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == expected.removeprefix("seqexp: error: ")
    assert temporaries(run_dir) == [] and not (run_dir / "test_ranks.parquet").exists()


def test_a_store_that_cannot_record_the_failure_is_said_in_the_same_line(
        tmp_path, empty_store, monkeypatch):
    """On a full disk the SQLite store cannot take the run's end either: the line says so, and
    that the next seqexp marks the run FAILED (close_abandoned_runs: its process is gone)."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    _refused_ranks_write("ENOSPC", monkeypatch)

    def full(self, status):
        raise RuntimeError("(sqlite3.OperationalError) database or disk is full")
    monkeypatch.setattr(Tracker, "end", full)
    run_dir = tmp_path / "run"
    code, output = run_seqexp(["model=pop", *tiny_overrides(tmp_path / "data",
                                                            tmp_path / "mlflow.db"),
                               f"hydra.run.dir={run_dir}"])
    assert code == 2 and "Traceback" not in output, output[-3000:]
    (line,) = error_lines(output)
    run = only_run(tmp_path / "mlflow.db")
    assert line.startswith(f"seqexp: error: cannot write test_ranks.parquet in {run_dir} (No "
                           f"space left on device); ")
    assert line.endswith(f"; the MLflow run {run.info.run_id} could not be marked FAILED "
                         f"((sqlite3.OperationalError) database or disk is full): the next "
                         f"seqexp run in this store marks it FAILED")


# --------------------------------------------------------------------- the launch folder
@pytest.mark.parametrize("where", ["launch folder", "hydra.run.dir", "sweep"])
def test_outputs_that_cannot_be_made_are_one_line_before_anything_is_written(
        where, tmp_path, monkeypatch):
    """`outputs` is a file in the launch folder (or hydra.run.dir lies below a file): mkdir
    fails with ENOTDIR for root too. Nothing is written: no store, no data, no folder."""
    launch = tmp_path / "launch"
    launch.mkdir()
    (launch / "outputs").write_text("not a folder")
    monkeypatch.chdir(launch)
    argv = ["model=pop", *tiny_overrides(tmp_path / "data")]
    if where == "hydra.run.dir":
        argv.append(f"hydra.run.dir={launch / 'outputs' / 'a' / 'b'}")
    elif where == "sweep":
        argv = ["-m", *argv, "seed=1,2"]
    code, output = run_seqexp(argv)
    assert code == 2 and "Traceback" not in output, output[-3000:]
    folder = {"launch folder": launch / "outputs", "hydra.run.dir": launch / "outputs" / "a" / "b",
              "sweep": launch / "outputs" / "multirun"}[where]
    key = "hydra.sweep.dir" if where == "sweep" else "hydra.run.dir"
    also = "" if where == "hydra.run.dir" else " (or start seqexp in a writable folder)"
    assert error_lines(output) == [
        f"seqexp: error: cannot write the run's outputs in {folder} ({launch / 'outputs'} is a "
        f"file, not a folder); set {key}=/a/writable/folder{also}"]
    assert sorted(p.name for p in launch.iterdir()) == ["outputs"]
    assert not (tmp_path / "data").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a folder of mode 555")
def test_a_read_only_launch_folder_is_one_line(tmp_path, monkeypatch):
    launch = tmp_path / "launch"
    launch.mkdir()
    launch.chmod(0o555)
    monkeypatch.chdir(launch)
    try:
        code, output = run_seqexp(["model=pop", *tiny_overrides(tmp_path / "data")])
    finally:
        launch.chmod(0o755)
    assert code == 2 and "Traceback" not in output, output[-3000:]
    assert error_lines(output) == [
        f"seqexp: error: cannot write the run's outputs in {launch / 'outputs'} (Permission "
        f"denied); set hydra.run.dir=/a/writable/folder (or start seqexp in a writable folder)"]
    assert list(launch.iterdir()) == []


# --------------------------------------------------------------------- a damaged store
@pytest.mark.parametrize("table", ["runs", "datasets"])
def test_a_store_missing_a_table_is_refused_before_the_run(table, tmp_path, empty_store):
    """`runs` (of MLflow's first schema, which MLflow would make again in that form, unusable)
    is refused before MLflow opens the store; `datasets` (a later table) once it is open:
    either way before a run exists, not with a traceback in the middle of one."""
    import sqlite3

    db = tmp_path / "mlflow.db"
    shutil.copy(empty_store, db)
    with sqlite3.connect(db) as connection:
        connection.execute(f"DROP TABLE {table}")
    code, output = run_seqexp(["model=pop", *tiny_overrides(tmp_path / "data", db),
                               f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2 and "Traceback" not in output, output[-3000:]
    assert error_lines(output) == [
        f"seqexp: error: mlflow.tracking_uri=sqlite:///{db}: the MLflow store is damaged (its "
        f"table {table} is missing); move it aside (mv {db} {db}.broken) and run again, which "
        f"creates a new store"]


def test_a_store_damaged_in_the_middle_of_a_run_is_one_line_and_a_failed_run(
        tmp_path, empty_store, monkeypatch):
    """The metrics table goes (for real, with sqlite3) once the run has started: the next
    metrics fail, and the run ends FAILED with that line."""
    import sqlite3

    db = tmp_path / "mlflow.db"
    shutil.copy(empty_store, db)
    real = experiment.split_datasets

    def dropping_metrics(*args, **kwargs):
        with sqlite3.connect(db) as connection:
            connection.execute("DROP TABLE metrics")
        return real(*args, **kwargs)
    monkeypatch.setattr(experiment, "split_datasets", dropping_metrics)
    code, output = run_seqexp(["model=pop", *tiny_overrides(tmp_path / "data", db),
                               f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2 and "Traceback" not in output, output[-3000:]
    expected = (f"seqexp: error: mlflow.tracking_uri=sqlite:///{db}: the MLflow store is "
                f"damaged ((sqlite3.OperationalError) no such table: metrics); move it aside "
                f"(mv {db} {db}.broken) and run again, which creates a new store")
    assert error_lines(output) == [expected]
    run = only_run(db)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == expected.removeprefix("seqexp: error: ")


# --------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (CI runs as root), unmounted after the test."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Write until the device is full; the filler file, to free the space again."""
    filler = folder / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_disk_is_said_as_such_and_the_run_closed_later_carries_it(
        tmp_path, small_disk, empty_store, monkeypatch):
    """The store's disk fills up once the run has started (a real tmpfs, filled for real): the
    line says no space is left, where and how much is free, and gives no advice to move a
    healthy store aside; the run the store could not mark is closed later with that reason,
    and the store works again once space is freed."""
    db = small_disk / "mlflow.db"
    shutil.copy(empty_store, db)
    real = experiment.split_datasets
    filled = []

    def filling_the_disk(*args, **kwargs):
        filled.append(_fill(small_disk))
        return real(*args, **kwargs)
    monkeypatch.setattr(experiment, "split_datasets", filling_the_disk)
    code, output = run_seqexp(["model=pop", *tiny_overrides(tmp_path / "data", db),
                               f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2 and "Traceback" not in output, output[-3000:]
    (line,) = error_lines(output)
    assert line.startswith(f"seqexp: error: mlflow.tracking_uri=sqlite:///{db}: no space left "
                           f"for the MLflow store ((sqlite3.OperationalError) database or disk "
                           f"is full; ")
    assert f"MiB free on the device of {small_disk}); free some space there, then continue " \
           f"with resume=" in line
    assert "damaged" not in line and "mv " not in line
    filled[0].unlink()
    run = only_run(db)
    assert run.info.status == "RUNNING"  # the full disk kept the store from marking it
    client = MlflowClient(f"sqlite:///{db}")
    client.set_tag(run.info.run_id, "pid", "999999999")  # as seen by a later process
    experiment.close_abandoned_runs(Tracker(f"sqlite:///{db}", None))
    closed = client.get_run(run.info.run_id)
    assert closed.info.status == "FAILED"
    reason = closed.data.tags["failure_reason"]
    assert "no space left for the MLflow store" in reason and "SIGKILL" not in reason


def test_a_store_failure_on_a_healthy_file_does_not_call_it_damaged(tmp_path, empty_store):
    db = tmp_path / "mlflow.db"
    shutil.copy(empty_store, db)
    line = str(store_failure_error(f"sqlite:///{db}", "(sqlite3.OperationalError) disk I/O "
                                   "error", "abc"))
    assert "its file passes SQLite's integrity check" in line and "mv " not in line
    db.write_bytes(db.read_bytes()[:4096] + b"\xff" * 8192)  # pages no SQLite wrote
    line = str(store_failure_error(f"sqlite:///{db}", "(sqlite3.DatabaseError) x", "abc"))
    assert "the MLflow store is damaged" in line and f"mv {db} {db}.broken" in line
