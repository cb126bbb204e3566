"""The team tracking server: `mlflow server` on PostgreSQL behind MLflow's basic auth
(scripts/tracking_server.sh).

.ci/run starts a PostgreSQL cluster and the server on loopback, creates two users, runs one
`seqexp` job as each, and sets SEQEXP_TEST_TRACKING_SERVER (the server's URL),
SEQEXP_TEST_TRACKING_EXPERIMENT, SEQEXP_TEST_POSTGRES_URI, SEQEXP_TEST_DATA_DIR (the jobs'
paths.data_dir), MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (one user's login) and
SEQEXP_TEST_READER_USERNAME / SEQEXP_TEST_READER_PASSWORD (a user who may only read the
experiment: the server runs with SEQEXP_DEFAULT_PERMISSION=READ);
without the server's URL these tests are skipped."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mlflow.tracking import MlflowClient

from seqexp.core.errors import SeqexpError
from seqexp.run.tracking import Tracker

SERVER = os.environ.get("SEQEXP_TEST_TRACKING_SERVER")
EXPERIMENT = os.environ.get("SEQEXP_TEST_TRACKING_EXPERIMENT", "ci-server")
POSTGRES = os.environ.get("SEQEXP_TEST_POSTGRES_URI")
DATA_DIR = os.environ.get("SEQEXP_TEST_DATA_DIR")
USER = os.environ.get("MLFLOW_TRACKING_USERNAME")
PASSWORD = os.environ.get("MLFLOW_TRACKING_PASSWORD")
READER = os.environ.get("SEQEXP_TEST_READER_USERNAME")
READER_PASSWORD = os.environ.get("SEQEXP_TEST_READER_PASSWORD")
LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
needs_login = pytest.mark.skipif(
    not (USER and PASSWORD), reason="no login (MLFLOW_TRACKING_USERNAME, _PASSWORD)")

pytestmark = pytest.mark.skipif(
    not SERVER, reason="no tracking server (SEQEXP_TEST_TRACKING_SERVER; .ci/run starts one)")


def server_runs():
    client = MlflowClient(SERVER)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r} on {SERVER}"
    return client, client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])


def test_both_seqexp_runs_read_back_from_the_server_with_metrics_and_artifacts(tmp_path):
    client, runs = server_runs()
    assert len(runs) == 2
    assert sorted(r.data.tags["seed"] for r in runs) == ["1", "2"]
    for run in runs:
        assert run.info.status == "FINISHED"
        metrics = run.data.metrics
        assert 0.0 <= metrics["epoch/test/mrr_at_20"] <= metrics["epoch/test/recall_at_20"] <= 1.0
        assert run.data.params["model.name"] == run.data.tags["model"]
        history = client.get_metric_history(run.info.run_id, "epoch/val_mrr_at_20")
        assert [h.step for h in sorted(history, key=lambda h: h.step)] == list(
            range(1, int(run.data.params["train.epochs"]) + 1))
        # artifacts went through the server (--serve-artifacts) and come back the same way
        local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
        saved = json.loads(Path(local).read_text())
        assert saved["test_mrr_at_20"] == pytest.approx(metrics["epoch/test/mrr_at_20"])


@pytest.mark.skipif(not POSTGRES, reason="SEQEXP_TEST_POSTGRES_URI not set")
def test_the_server_keeps_the_runs_in_postgresql():
    import sqlalchemy

    _, runs = server_runs()
    engine = sqlalchemy.create_engine(POSTGRES)
    try:
        with engine.connect() as connection:
            assert connection.dialect.name == "postgresql"
            stored = connection.execute(sqlalchemy.text(
                "SELECT r.run_uuid, r.status FROM runs r JOIN experiments e "
                "ON r.experiment_id = e.experiment_id WHERE e.name = :name"),
                {"name": EXPERIMENT}).all()
            metric = connection.execute(sqlalchemy.text(
                "SELECT value FROM latest_metrics WHERE run_uuid = :run AND key = "
                "'epoch/test/mrr_at_20'"), {"run": runs[0].info.run_id}).scalar_one()
    finally:
        engine.dispose()
    assert sorted(stored) == sorted((r.info.run_id, "FINISHED") for r in runs)
    assert metric == pytest.approx(runs[0].data.metrics["epoch/test/mrr_at_20"])


def http_status(path: str, login: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(f"{SERVER}{path}")
    if login is not None:
        token = base64.b64encode(":".join(login).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@needs_login
def test_the_server_answers_only_a_valid_login():
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(path) == 401
    assert http_status(path, (USER, f"not-{PASSWORD}")) == 401
    assert http_status(path, (USER, PASSWORD)) == 200


@needs_login
def test_a_wrong_password_names_the_user_and_the_variables(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", f"not-{PASSWORD}")
    with pytest.raises(SeqexpError) as refused:
        Tracker(SERVER, EXPERIMENT)
    assert str(refused.value) == (
        f"mlflow.tracking_uri={SERVER}: the server refused the login of user '{USER}' "
        "(HTTP 401); check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")


@needs_login
@pytest.mark.skipif(not DATA_DIR, reason="SEQEXP_TEST_DATA_DIR not set")
def test_seqexp_without_a_login_ends_with_one_line_and_no_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LOGIN_VARIABLES}
    result = subprocess.run(
        [sys.executable, "-m", "seqexp.apps.cli", "model=pop", "dataset.n_users=40",
         "dataset.n_items=50", "dataset.min_events=10", "dataset.max_events=20",
         "train.progress=false", f"paths.data_dir={DATA_DIR}", f"mlflow.tracking_uri={SERVER}",
         f"mlflow.experiment={EXPERIMENT}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"seqexp: error: mlflow.tracking_uri={SERVER}: the server requires a login (HTTP 401); "
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your user name and "
        "password on it")
    assert len(server_runs()[1]) == 2


@pytest.mark.skipif(not (READER and READER_PASSWORD), reason="no read-only login "
                    "(SEQEXP_TEST_READER_USERNAME, _PASSWORD)")
def test_a_read_only_member_makes_a_report_logs_nothing_and_exits_0(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_USERNAME=READER,
               MLFLOW_TRACKING_PASSWORD=READER_PASSWORD)
    result = subprocess.run(
        [sys.executable, "-m", "seqexp.apps.report", "--tracking-uri", SERVER, "--experiment",
         EXPERIMENT, "--out", str(tmp_path), "--resamples", "200"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stdout.splitlines()[-1]
    assert f"logged nothing: mlflow.experiment={EXPERIMENT}: user '{READER}' may not create runs" \
        in last and "(HTTP 403)" in last
    assert {p.name for p in tmp_path.iterdir()} >= {f"{EXPERIMENT}.{s}" for s in
                                                   ("md", "csv", "tex", "png")}
    _, runs = server_runs()
    assert len(runs) == 2  # no report run
    assert [r for r in runs if r.data.tags.get("seqexp.role") == "report"] == []


@pytest.mark.skipif(not POSTGRES or not Path("/proc").is_dir(), reason="needs the database "
                    "URI (SEQEXP_TEST_POSTGRES_URI) and Linux's /proc")
@pytest.mark.skipif(urlsplit(SERVER or "").hostname not in ("127.0.0.1", "localhost"),
                    reason="the server runs on another machine")
def test_no_process_shows_the_database_password_on_its_command_line():
    password = urlsplit(POSTGRES).password
    assert password
    command_lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command_lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode())
        except (OSError, UnicodeDecodeError):
            continue  # ended meanwhile, or not ours to read
    assert any("mlflow server" in line for line in command_lines)  # the server is seen
    assert [line for line in command_lines if password in line] == []
