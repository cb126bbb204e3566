"""Checkpoints you can use: the best checkpoint rebuilds the model without the original data,
and its recommendations are the in-memory model's; loading never runs pickled code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import seqexp
from conformance import trained
from seqexp.apps.recommend import main
from seqexp.core.checkpoint import read_checkpoint
from seqexp.core.errors import SeqexpError
from seqexp.data.batching import prediction_batches


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread for this module (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recommend-data")


@pytest.fixture(scope="module")
def trained_once(data_dir, tmp_path_factory):
    """trained(), once per model for the module: (cfg, data, model, its outputs folder)."""
    done = {}

    def get(model_name: str):
        if model_name not in done:
            folder = tmp_path_factory.mktemp(f"run-{model_name}")
            done[model_name] = (*trained(model_name, data_dir, folder), folder)
        return done[model_name]

    return get


@pytest.mark.parametrize("model_name", ["gru", "linear_ugru", "mf", "seqmf", "expdecay_knn"])
def test_a_users_recommendations_are_the_evaluators_scores_after_its_training_events(
        model_name, trained_once):
    """The prediction point after a user's training events is the one of the user's first
    validation event: the same scores, from the evaluator's own batches."""
    cfg, data, model, tmp_path = trained_once(model_name)
    loaded = seqexp.load(tmp_path / "checkpoints" / "best.pt")
    batch = next(prediction_batches(data, "val", batch_users=8))
    first = np.flatnonzero(np.r_[True, np.diff(batch.target_rows.numpy()) != 0])[0]
    user = int(batch.users[batch.target_rows[first]])
    with torch.no_grad():
        scores = model.score_items(model.prediction_states(batch), 0, data.n_items)[first]
    top = torch.topk(scores, 5)
    table = loaded.recommend(user=loaded.user_ids[user], k=5)
    assert list(table["item"]) == [loaded.item_ids[i] for i in top.indices.tolist()]
    np.testing.assert_allclose(table["score"], top.values.numpy(), rtol=1e-5, atol=1e-6)


class _RunsCode:
    """Unpickling this object would call open(marker, "w"): it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_loading_refuses_a_checkpoint_with_pickled_code(data_dir, tmp_path):
    trained("pop", data_dir, tmp_path)
    path = tmp_path / "checkpoints" / "best.pt"
    payload = torch.load(path, weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**payload, "extra": _RunsCode(marker)}, path)
    with pytest.raises(SeqexpError, match="refused"):
        seqexp.load(path)
    with pytest.raises(SeqexpError, match="refused"):
        read_checkpoint(path)
    assert not marker.exists()


def test_seqexp_recommend_prints_a_ranked_table_and_errors_in_one_line(trained_once, capsys):
    tmp_path = trained_once("itemknn")[-1]
    loaded = seqexp.load(tmp_path)
    user = loaded.user_ids[1]
    main([str(tmp_path), "--user", user, "--k", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "item", "score"] and len(lines) == 5
    expected = loaded.recommend(user=user, k=4)
    assert [line.split()[1] for line in lines[1:]] == list(expected["item"])
    main([str(tmp_path), "--items", ",".join(loaded.item_ids[:2]), "--k", "3"])
    assert len(capsys.readouterr().out.splitlines()) == 4
    for argv, expected_text in [([str(tmp_path)], "pass --user"),
                                ([str(tmp_path), "--user", "no-such-user"], "is not a user"),
                                ([str(tmp_path), "--items", "x,y"], "item 'x' is not"),
                                ([str(tmp_path / "missing"), "--user", user],
                                 "neither a checkpoint")]:
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("seqexp-recommend: error: ") and expected_text in err
        assert err.count("\n") == 1


def test_a_user_model_needs_a_user_for_an_item_sequence(trained_once):
    loaded = seqexp.load(trained_once("mf")[-1])
    with pytest.raises(SeqexpError, match="scores with a user vector"):
        loaded.recommend(items=loaded.item_ids[:2])
