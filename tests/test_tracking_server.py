"""The team tracking server: `mlflow server` on PostgreSQL (scripts/tracking_server.sh).

.ci/run starts a PostgreSQL cluster and the server on loopback, runs two `seqexp` jobs against
it, and sets SEQEXP_TEST_TRACKING_SERVER (the server's URL), SEQEXP_TEST_TRACKING_EXPERIMENT
and SEQEXP_TEST_POSTGRES_URI; without them these tests are skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

SERVER = os.environ.get("SEQEXP_TEST_TRACKING_SERVER")
EXPERIMENT = os.environ.get("SEQEXP_TEST_TRACKING_EXPERIMENT", "ci-server")
POSTGRES = os.environ.get("SEQEXP_TEST_POSTGRES_URI")

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
        assert 0.0 <= metrics["test_mrr_at_20"] <= metrics["test_recall_at_20"] <= 1.0
        assert run.data.params["model.name"] == run.data.tags["model"]
        history = client.get_metric_history(run.info.run_id, "val_mrr_at_20")
        assert [h.step for h in sorted(history, key=lambda h: h.step)] == list(
            range(1, int(run.data.params["train.epochs"]) + 1))
        # artifacts went through the server (--serve-artifacts) and come back the same way
        local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
        saved = json.loads(Path(local).read_text())
        assert saved["test_mrr_at_20"] == pytest.approx(metrics["test_mrr_at_20"])


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
                "'test_mrr_at_20'"), {"run": runs[0].info.run_id}).scalar_one()
    finally:
        engine.dispose()
    assert sorted(stored) == sorted((r.info.run_id, "FINISHED") for r in runs)
    assert metric == pytest.approx(runs[0].data.metrics["test_mrr_at_20"])
