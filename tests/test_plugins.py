"""A model from a researcher's own package: registered through the entry point group
`seqexp.models`, its YAML found through Hydra's search path (hydra_plugins/seqexp_models), it
trains through the real CLI (as a sweep's job), is reported, loaded back with
seqexp.load, served through the MLflow Model (pyfunc) and by seqexp-recommend; the safe loader
trusts it only while the package is installed.

The model, `last_item`: training popularity scaled into [0, 1), plus `bonus` for the last item
before the prediction point. Its files are the whole contribution: LAST_ITEM_MODULE,
LAST_ITEM_YAML and this test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import conformance
import seqexp
from helpers import tiny_overrides
from plugin_package import install_package
from seqexp.apps.recommend import main as recommend_main
from seqexp.core.errors import SeqexpError
from seqexp.core.metric_names import flat_metrics
from seqexp.run.registry import registry

LAST_ITEM_MODULE = '''\
"""Popularity, plus a bonus for the item of the latest event."""

from __future__ import annotations

from collections.abc import Callable

import torch

from seqexp.core.schema import Key, number
from seqexp.data.batching import PredictionBatch
from seqexp.data.sequences import SequenceData
from seqexp.models.base import Recommender


class LastItem(Recommender):
    config_keys = {"bonus": Key(number(0.0, low_open=True), "added to the last item's score")}

    def __init__(self, n_items: int, n_users: int, *, bonus: float) -> None:
        super().__init__(n_items, n_users)
        self.bonus = bonus
        self.register_buffer("popularity", torch.zeros(n_items))

    def fit(self, train: SequenceData,
            stop_requested: Callable[[], str | None] | None = None) -> None:
        counts = torch.from_numpy(train.item_popularity()).float()
        self.popularity.copy_(counts / (counts.max() + 1))  # in [0, 1)

    def prediction_states(self, batch: PredictionBatch) -> torch.Tensor:
        return batch.items[batch.target_rows, batch.target_cols - 1]

    def score_items(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        scores = self.popularity[lo:hi].expand(len(state), hi - lo)
        items = torch.arange(lo, hi, device=state.device)
        return scores + self.bonus * (state[:, None] == items)
'''

LAST_ITEM_YAML = '''\
# @package _global_
# Popularity, plus a bonus for the last item before the prediction point.
model:
  name: last_item
  _target_: last_item_models.last_item.LastItem
  _partial_: true
  bonus: 1.0
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> Path:
    return install_package(
        tmp_path / "site", "last_item_models",
        {"last_item.py": LAST_ITEM_MODULE, "conf/model/last_item.yaml": LAST_ITEM_YAML},
        {"last_item": "last_item_models.last_item:LastItem"}, monkeypatch)


def _cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_plugin_model_trains_sweeps_reports_loads_and_serves(plugin, tmp_path, monkeypatch,
                                                               capsys):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    _cli("seqexp.apps.cli", ["-m", "model=last_item",
                             *tiny_overrides(tmp_path / "data", db, log_model=True)], tmp_path)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("seqexp").experiment_id],
                              "tags.model = 'last_item'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["model.bonus"] == "1.0"
    assert run.data.params["model._target_"] == "last_item_models.last_item.LastItem"
    # a repeat-free synthetic log: the last item is never the target, popularity decides
    assert 0 < flat_metrics(run.data.metrics)["test_mrr_at_20"] < 1
    report = _cli("seqexp.apps.report", ["--experiment", "seqexp", "--tracking-uri", uri,
                                         "--baseline", "last_item", "--out", str(tmp_path / "rep")],
                  tmp_path)
    assert "last_item" in (tmp_path / "rep" / "seqexp.md").read_text(), report.stdout

    loaded = seqexp.load(run.info.run_id, uri)
    user = loaded.user_ids[0]
    items = loaded.item_ids[3:6]
    # the bonus (1) outweighs any popularity (< 1): the last item of the request comes first
    top = loaded.recommend(items=items, k=3)
    assert top["item"].iloc[0] == items[-1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    answer = served.predict(pd.DataFrame.from_records([{"user": user, "k": 3}]))
    expected = loaded.recommend(user=user, k=3)
    assert list(answer["item"]) == list(expected["item"])
    capsys.readouterr()
    recommend_main([run.info.run_id, "--user", user, "--k", "3", "--tracking-uri", uri])
    assert expected["item"].iloc[0] in capsys.readouterr().out

    # without the package, its checkpoint names a model this seqexp does not have
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not p.startswith(str(plugin.parent))])
    registry.cache_clear()
    with pytest.raises(SeqexpError, match="model.name='last_item' is not a model of this seqexp"):
        seqexp.load(run.info.run_id, uri)
    registry.cache_clear()


def test_a_plugin_model_passes_the_conformance_suite(plugin, tmp_path):
    conformance.check_all("last_item", tmp_path / "data", tmp_path / "run")


def test_a_plugin_file_must_be_named_as_its_model(tmp_path, monkeypatch):
    install_package(tmp_path / "site", "misnamed_models",
                    {"last_item.py": LAST_ITEM_MODULE,
                     "conf/model/lastitem.yaml": LAST_ITEM_YAML.replace(
                         "last_item_models", "misnamed_models")},
                    {"last_item": "misnamed_models.last_item:LastItem"}, monkeypatch)
    with pytest.raises(SeqexpError, match=r"lastitem.yaml: model.name='last_item' must be "
                                          r"'lastitem', the file's name"):
        registry()
    registry.cache_clear()


def test_a_plugin_file_must_name_a_registered_class(tmp_path, monkeypatch):
    install_package(tmp_path / "site", "unregistered_models",
                    {"last_item.py": LAST_ITEM_MODULE,
                     "conf/model/last_item.yaml": LAST_ITEM_YAML.replace(
                         "last_item_models", "somewhere_else")},
                    {"last_item": "unregistered_models.last_item:LastItem"}, monkeypatch)
    with pytest.raises(SeqexpError, match="is not a registered model class"):
        registry()
    registry.cache_clear()
