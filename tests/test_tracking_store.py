"""Several processes writing to one SQLite MLflow store at once (parallel sweep jobs)."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from seqexp.core.errors import SeqexpError
from seqexp.run.tracking import Tracker, is_locked_error, with_lock_retry

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
    except Exception as exc:  # noqa: BLE001 - reported to the test
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
