"""Several processes writing to one SQLite MLflow store at once (parallel sweep jobs)."""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from seqexp.core.errors import SeqexpError
from seqexp.run.tracking import Tracker, half_made_schema, is_locked_error, with_lock_retry

N_PROCESSES = 4
N_STEPS = 20
MLFLOW_BUSY_TIMEOUT_S = 20  # PRAGMA busy_timeout in mlflow.store.db.utils (MLflow 3)


def _write_a_run(uri: str, index: int, start: float) -> str:
    """One job's tracking: open the store, create the run, params, per-step metrics, end."""
    time.sleep(max(0.0, start - time.time()))  # all processes reach the fresh store together
    try:
        tracker = Tracker(uri, "parallel")
        tracker.start(f"job{index}", {"job": str(index)})
        tracker.log_params({f"p{k}": k for k in range(50)})
        for step in range(N_STEPS):
            tracker.log_metrics({"loss": index + step / 100}, step=step)
        tracker.end("FINISHED")
        return "ok"
    except Exception as exc:  # reported to the test
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.slow  # several processes racing to create one store
def test_parallel_jobs_on_a_fresh_sqlite_store_all_succeed(tmp_path):
    # Without seqexp's set-up lock, MLflow's schema creation races here: in a trial, three of
    # four processes failed ("duplicate column name: step" / "database is locked").
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    context = multiprocessing.get_context("spawn")
    start = time.time() + 4.0  # after the workers have imported mlflow
    with context.Pool(N_PROCESSES) as pool:
        results = pool.starmap(_write_a_run, [(uri, i, start) for i in range(N_PROCESSES)])
    assert results == ["ok"] * N_PROCESSES
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("parallel").experiment_id])
    assert sorted(r.data.tags["job"] for r in runs) == [str(i) for i in range(N_PROCESSES)]
    for run in runs:
        assert run.info.status == "FINISHED" and len(run.data.params) == 50
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(N_STEPS))


@pytest.mark.slow
def test_a_write_waits_out_a_lock_held_longer_than_sqlites_busy_timeout(store_uri, tmp_path):
    tracker = Tracker(store_uri, "locked")
    tracker.start("run", {})
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None,
                             check_same_thread=False)
    # Another writer, for longer than the busy timeout MLflow sets on SQLite sessions (20 s).
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(MLFLOW_BUSY_TIMEOUT_S + 3, holder.execute, ["COMMIT"])
    release.start()
    try:
        with pytest.raises(Exception) as plain:  # what MLflow alone does
            tracker.client.log_metric(tracker.run_id, "m", 1.0)
        assert is_locked_error(plain.value)
        tracker.log_metrics({"m": 2.0})  # retried until the lock is gone
    finally:
        release.join()
        holder.close()
    assert MlflowClient(store_uri).get_run(tracker.run_id).data.metrics == {"m": 2.0}


def test_only_lock_errors_are_retried():
    calls = []

    def flaky(fail_with: Exception, times: int) -> str:
        calls.append(1)
        if len(calls) <= times:
            raise fail_with
        return "done"

    locked = RuntimeError("(sqlite3.OperationalError) database is locked")
    assert with_lock_retry(flaky, locked, 2) == "done" and len(calls) == 3
    calls.clear()
    with pytest.raises(ValueError):
        with_lock_retry(flaky, ValueError("no such table"), 1)
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(RuntimeError):
        with_lock_retry(flaky, locked, 100, deadline_s=0.0)
    assert len(calls) == 1


def test_a_server_that_forbids_creating_runs_gives_one_line(store_uri, monkeypatch):
    tracker = Tracker(store_uri, "shared")

    def forbidden(*args, **kwargs):
        raise RuntimeError("API request to endpoint /api/2.0/mlflow/runs/create failed with "
                           "error code 403 != 200. Response body: 'Permission denied'")

    monkeypatch.setattr(tracker.client, "create_run", forbidden)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    with pytest.raises(SeqexpError) as caught:
        tracker.start("run", {})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("mlflow.experiment=shared: user 'bob' may not create runs")
    assert "(HTTP 403)" in message


def test_a_half_made_store_is_one_line_saying_what_to_do(tmp_path):
    for name, make in (("tmp", "CREATE TABLE _alembic_tmp_tags (x); CREATE TABLE runs (x)"),
                       ("unversioned", "CREATE TABLE experiments (x); CREATE TABLE runs (x)")):
        db = tmp_path / name / "mlflow.db"
        db.parent.mkdir()
        with sqlite3.connect(db) as connection:
            connection.executescript(make)
        with pytest.raises(SeqexpError, match=r"half-created .* move it aside \(mv "):
            Tracker(f"sqlite:///{db}", "x")
        assert sorted(p.name for p in db.parent.iterdir()) == [".mlflow.db.lock", "mlflow.db"]


def test_a_new_store_is_made_beside_and_moved_into_place(tmp_path):
    db = tmp_path / "mlflow.db"
    leftover = tmp_path / ".mlflow.db.creating.99999"  # a creator killed mid-way
    leftover.write_bytes(b"SQLite format 3\x00 half")
    Tracker(f"sqlite:///{db}", "x")
    assert half_made_schema(db) is None and not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mlflow.db.lock", "mlflow.db"]


def test_a_reader_makes_no_store_where_there_is_none(tmp_path):
    db = tmp_path / "nonexistent" / "dir" / "mlflow.db"
    with pytest.raises(SeqexpError, match="there is no MLflow store at"):
        Tracker(f"sqlite:///{db}", None, create=False)
    assert not (tmp_path / "nonexistent").exists()


_CREATE_STORE = """
import sys
import mlflow.store.tracking.sqlalchemy_store  # imported before "ready": kills hit the creation
from seqexp.run.tracking import Tracker
print("ready", flush=True)
Tracker(sys.argv[1], "seqexp")
"""


def _schema_version(db) -> list:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT version_num FROM alembic_version").fetchall()


@pytest.mark.slow  # 20 store creations cut short, each a new interpreter
def test_sigkill_at_random_moments_of_store_creation_never_loses_the_store(tmp_path):
    """A store that exists after a kill is complete: at the schema version a whole creation
    reaches, nothing of a migration left. Then a normal run uses it."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"

    def start() -> tuple[subprocess.Popen, float]:
        child = subprocess.Popen([sys.executable, "-c", _CREATE_STORE, uri],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert child.stdout.readline().strip() == "ready"
        return child, time.monotonic()

    child, began = start()  # how long a whole creation takes on this machine
    assert child.wait(timeout=300) == 0
    whole, complete = time.monotonic() - began, _schema_version(db)
    db.unlink()
    rng = random.Random(0)
    survived = 0
    for _ in range(20):
        if db.exists():  # a kill after the store was made: start from none again
            db.unlink()
        child, _ = start()
        time.sleep(rng.uniform(0.0, whole))
        child.kill()
        child.wait()
        if db.exists():
            survived += 1
            assert half_made_schema(db) is None and _schema_version(db) == complete
    assert survived < 20  # some kills did land during the creation
    tracker = Tracker(uri, "seqexp")  # then a normal run
    tracker.start("after-the-kills", {})
    tracker.log_metrics({"m": 1.0})
    tracker.end("FINISHED")
    (run,) = MlflowClient(uri).search_runs([tracker.experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics == {"m": 1.0}
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
