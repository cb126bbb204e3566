"""Runs whose process was killed without closing them (SIGKILL) are marked FAILED by a later
seqexp on the same host; live runs and other hosts' runs are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import tiny_overrides
from seqexp.core import liveness
from seqexp.run.tags import PARENT_ROLE, ROLE_TAG
from seqexp.run.tracking import ABANDONED_TAG, Tracker, close_abandoned_runs, process_tags


def finished_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_runs_of_gone_processes_on_this_host_are_marked_failed(store_uri):
    me, dead = liveness.identity(), str(finished_pid())
    host = me["host"]
    runs = {}
    for experiment, name, tags, status in [
        ("a", "dead", {"host": host, "pid": dead, "pid_start": "77"}, None),
        ("a", "alive", process_tags(), None),
        ("a", "reused_pid", {"host": host, "pid": me["pid"], "pid_start": "1"}, None),
        ("a", "other_host", {"host": "elsewhere", "pid": dead, "pid_start": "77"}, None),
        ("a", "untagged", {}, None),
        ("a", "dead_but_finished", {"host": host, "pid": dead, "pid_start": "77"}, "FINISHED"),
        ("b", "dead_in_other_experiment", {"host": host, "pid": dead, "pid_start": ""}, None),
    ]:
        tracker = Tracker(store_uri, experiment)
        runs[name] = tracker.start(name, tags)
        if status:
            tracker.end(status)
    closed = close_abandoned_runs(Tracker(store_uri, "c"))
    assert sorted(closed) == sorted(runs[n] for n in ("dead", "reused_pid",
                                                      "dead_in_other_experiment"))
    client = MlflowClient(store_uri)
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"dead": "FAILED", "alive": "RUNNING", "reused_pid": "FAILED",
                      "other_host": "RUNNING", "untagged": "RUNNING",
                      "dead_but_finished": "FINISHED", "dead_in_other_experiment": "FAILED"}
    reason = client.get_run(runs["dead"]).data.tags[ABANDONED_TAG]
    assert reason.startswith(f"process {dead} on {host} ended without closing the run")
    assert ABANDONED_TAG not in client.get_run(runs["alive"]).data.tags
    assert close_abandoned_runs(Tracker(store_uri, "c")) == []  # once only



def test_resume_refuses_only_a_run_whose_process_still_runs_here():
    from types import SimpleNamespace

    from seqexp.run.resume import _still_running_here

    def run(tags, status="RUNNING"):
        return SimpleNamespace(info=SimpleNamespace(status=status),
                               data=SimpleNamespace(tags=tags))

    host, dead = liveness.host(), str(finished_pid())
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            started = liveness.start_time(other.pid) or ""
            alive = {"host": host, "pid": str(other.pid), "pid_start": started}
            assert _still_running_here(run(alive)) == other.pid
            # the same pid, but a process started at another time: the run's own has ended
            assert _still_running_here(run(alive | {"pid_start": "1"})) is None
            assert _still_running_here(run(alive | {"host": "elsewhere"})) is None
            assert _still_running_here(run(alive, status="KILLED")) is None
            assert _still_running_here(run(alive | {"pid": dead})) is None
            assert _still_running_here(run(process_tags())) is None  # this process resumes it
        finally:
            other.kill()


@pytest.mark.slow
def test_a_sigkilled_seqexp_run_is_failed_by_the_next_one(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(sys.path))
    common = [sys.executable, "-m", "seqexp.apps.cli", *tiny_overrides(tmp_path / "data")]
    args = [*common, "model=gru", "model.hidden_size=8", "train.epochs=200",
            "train.patience=200"]
    victim = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    for line in victim.stdout:
        if "MLflow run" in line:
            break
    time.sleep(1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    uri = f"sqlite:///{Path(tmp_path) / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("seqexp").experiment_id])
    assert run.info.status == "RUNNING" and run.data.tags["pid"] == str(victim.pid)
    after = subprocess.run([*common, "model=pop"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert after.returncode == 0, after.stderr[-2000:]
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "FAILED"
    assert killed.data.tags[ABANDONED_TAG].startswith(f"process {victim.pid} on ")


@pytest.mark.slow
def test_a_sigkilled_sweeps_parent_and_running_job_are_failed_by_the_next_run(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(sys.path))
    common = [sys.executable, "-m", "seqexp.apps.cli", *tiny_overrides(tmp_path / "data")]
    args = [sys.executable, "-m", "seqexp.apps.cli", "-m", *tiny_overrides(tmp_path / "data"),
            "model=gru", "seed=1,2", "model.hidden_size=8", "train.epochs=200",
            "train.patience=200", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    victim = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in victim.stdout:
        seen.append(line)
        if "epoch 1:" in line:  # the first job's run is training, under the parent
            break
    assert victim.poll() is None, "".join(seen[-20:])
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("seqexp").experiment_id
    left = client.search_runs([experiment])
    assert {r.info.status for r in left} == {"RUNNING"} and len(left) == 2
    parent = next(r for r in left if r.data.tags.get(ROLE_TAG) == PARENT_ROLE)
    assert parent.data.tags["pid"] == str(victim.pid)
    after = subprocess.run([*common, "model=pop"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert after.returncode == 0, after.stderr[-2000:]
    for run in left:
        closed = client.get_run(run.info.run_id)
        assert closed.info.status == "FAILED", closed.data.tags
        assert closed.data.tags[ABANDONED_TAG].startswith(f"process {victim.pid} on ")
