"""eval.val_max_scores: validation ranks a fixed, seeded sample of users when the whole would
exceed a score budget; test always ranks every event."""

from __future__ import annotations

import mlflow
import numpy as np
import torch

from helpers import make_evaluator, run_seqexp, sequences, tiny_overrides
from seqexp.core.metric_names import flat_metrics
from seqexp.data.sequences import validation_sample
from seqexp.models.popularity import Popularity

# 6 users; validation targets per user: 2, 3, 0, 1, 4, 2 (12 in all) over 10 items
USERS = [[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7], [2, 3, 4], [3, 4, 5, 6],
         [4, 5, 6, 7, 8, 9, 0, 1], [5, 6, 7, 8, 9]]
N_VAL = [2, 3, 0, 1, 4, 2]


def _data():
    return sequences(USERS, n_items=10, n_val=N_VAL)


def _val_targets(data) -> np.ndarray:
    first, stop = data.phase_bounds("val")
    return np.clip(stop - np.maximum(first, data.offsets[:-1] + 1), 0, None)


def test_a_budget_that_holds_every_user_leaves_the_data_as_it_is():
    data = _data()
    assert validation_sample(data, None, 0) is data
    assert validation_sample(data, 12 * 10, 0) is data  # 12 targets x 10 items


def test_the_sample_is_whole_users_in_a_seeded_order_within_the_budget():
    data = _data()
    sample = validation_sample(data, 60, seed=3)  # room for 6 targets
    order = np.random.default_rng(3).permutation(6)
    cumulative = np.cumsum(np.array(N_VAL)[order])
    expected = set(order[: int(np.searchsorted(cumulative, 6, side="right"))].tolist())
    kept = _val_targets(sample)
    assert {u for u in range(6) if kept[u] > 0} == expected - {2}  # user 2 has none
    for user in range(6):  # a kept user keeps all its validation targets, the others none
        assert kept[user] == (N_VAL[user] if user in expected else 0)
    assert sample.stats["val_events"] == kept.sum() <= 6
    # only the validation phase changes: test and the events themselves are the same
    assert np.array_equal(sample.val_end, data.val_end)
    assert np.array_equal(sample.items, data.items)
    assert np.array_equal(validation_sample(data, 60, seed=3).train_end, sample.train_end)
    assert not np.array_equal(validation_sample(data, 60, seed=4).train_end, sample.train_end)


def test_a_budget_below_one_user_keeps_one_user():
    sample = validation_sample(_data(), 1, seed=0)
    assert np.count_nonzero(_val_targets(sample)) == 1


def test_the_evaluator_samples_validation_only():
    data = _data()
    model = Popularity(10, 6)
    model.fit(data)
    evaluator = make_evaluator(val_max_scores=60, seed=3)
    val = evaluator.rank_counts(model, data, "val")
    whole = make_evaluator().rank_counts(model, data, "val")
    assert len(whole) == 12 and 0 < len(val) <= 6
    assert set(val.users.tolist()) < set(whole.users.tolist())
    assert len(evaluator.rank_counts(model, data, "test")) == len(
        make_evaluator().rank_counts(model, data, "test")) == 6


def test_the_budget_is_recorded_and_only_validation_ranks_fewer_events(tmp_path):
    torch.manual_seed(0)
    assert run_seqexp([*tiny_overrides(tmp_path / "data", tmp_path / "mlflow.db"), "model=pop",
                       "mlflow.log_checkpoint=false", "eval.save_ranks=false",
                       "eval.val_max_scores=500"])[0] == 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    params, metrics = run.data.params, flat_metrics(run.data.metrics)
    assert params["eval.val_max_scores"] == "500"
    # 50 items: at most 10 validation targets ranked, fewer than the run's validation events;
    # every test event is ranked (a user's first event is never a target: none is in test)
    assert metrics["val_n_events"] <= 10 < int(params["data.val_events"])
    assert metrics["test_n_events"] == int(params["data.test_events"])
