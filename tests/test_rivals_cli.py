"""hrnn and sasrec through the real CLI under split=last_session: the MLflow record names the
split, and seqexp.load gives the run's model back, recommending for a user."""

from __future__ import annotations

import mlflow
import pytest

import seqexp
from helpers import run_seqexp, tiny_overrides
from seqexp.core.metric_names import flat_metrics


@pytest.mark.parametrize("model", ["hrnn", "sasrec"])
def test_a_rival_runs_under_last_session_and_loads_back(tmp_path, model):
    code, output = run_seqexp([f"model={model}", "split=last_session", "model.hidden_size=8",
                               *tiny_overrides(tmp_path / "data", tmp_path / "mlflow.db"),
                               f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 0, output[-2000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("seqexp").experiment_id)
    assert run.data.params["split.name"] == "last_session"
    assert run.data.params["split.session_gap_s"] == "1800"
    assert run.data.params["model.name"] == model
    assert flat_metrics(run.data.metrics)["test_mrr_at_20"] > 0
    loaded = seqexp.load(tmp_path / "run")
    assert len(loaded.recommend(user="0", k=5)) == 5
