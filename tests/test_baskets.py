"""Baskets: boundaries, negatives outside a basket, and the next-basket F1/NDCG of the
evaluator (for any model) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import compose_config, make_evaluator, timed_sequences, tiny_overrides
from seqexp.core.errors import SeqexpError
from seqexp.data.baskets import basket_starts, concat_ranges, sample_outside, split_baskets
from seqexp.models.base import Recommender
from seqexp.run.experiment import run_experiment

GAP = 1800


def test_basket_boundaries_gap_at_below_and_above_the_threshold():
    # gaps: 1799 (below), 1800 (exactly at: same basket), 1801 (above: new basket), 0, 5000
    times = np.array([0, 1799, 3599, 5400, 5400, 10400])
    assert basket_starts(times, GAP).tolist() == [True, False, False, True, False, True]
    padded = torch.tensor([[0, 1799, 3599, 5400, 5400, 10400], [7, 1808, 0, 0, 0, 0]])
    assert basket_starts(padded, GAP).tolist() == [
        [True, False, False, True, False, True],
        [True, True, False, False, False, False],  # 1801 s apart; padding never opens
    ]


def test_split_baskets_per_user_and_train_part_only():
    # user 0: baskets {0,1} {2} {3,4}; user 1 starts a basket although only 10 s later
    data = timed_sequences([[0, 1, 2, 3, 4], [5, 6, 7]],
                 [[0, 60, 5000, 9000, 9100], [9110, 20000, 20001]], n_items=8,
                 n_test=[1, 0])
    full = split_baskets(data, GAP)
    groups = [data.items[full.events[a:b]].tolist()
              for a, b in zip(full.offsets[:-1], full.offsets[1:], strict=True)]
    assert groups == [[0, 1], [2], [3, 4], [5], [6, 7]]
    assert full.user_offsets.tolist() == [0, 3, 5]
    train = split_baskets(data, GAP, data.train_end)  # user 0's last event is test
    assert [data.items[train.events[a:b]].tolist() for a, b in
            zip(train.offsets[:-1], train.offsets[1:], strict=True)] == [[0, 1], [2], [3], [5],
                                                                        [6, 7]]


def test_concat_ranges():
    assert concat_ranges(np.array([5, 0, 9]), np.array([3, 0, 2])).tolist() == [5, 6, 7, 9, 10]


def test_sampled_negatives_are_uniform_outside_the_group():
    # group 0 = {1, 2} (2 repeated), group 1 = {0, 4}, group 2 = every item
    items, offsets = np.array([2, 1, 2, 4, 0, 0, 1, 2, 3, 4]), np.array([0, 3, 5, 10])
    groups = np.repeat([0, 1, 2], 30_000)
    neg = sample_outside(groups, items, offsets, 5, np.random.default_rng(0))
    assert set(neg[groups == 2]) == {-1}
    for group, outside in ((0, [0, 3, 4]), (1, [1, 2, 3])):
        counts = np.bincount(neg[groups == group], minlength=5)
        assert set(np.flatnonzero(counts)) == set(outside)
        assert counts[outside] / 30_000 == pytest.approx([1 / 3] * 3, abs=0.015)


class TableModel(Recommender):
    """Scores looked up by (user, target column): a model whose top-k is set by hand."""

    def __init__(self, n_items: int, table: dict[tuple[int, int], list[float]]) -> None:
        super().__init__(n_items, 2)
        self.table = table
        self.asked: list[tuple[int, int]] = []

    def prediction_states(self, batch):
        points = list(zip(batch.users[batch.target_rows].tolist(), batch.target_cols.tolist(),
                          strict=True))
        self.asked += points
        return torch.tensor([self.table[p] for p in points], dtype=torch.float64)

    def score_items(self, state, lo, hi):
        return state[:, lo:hi]


def scores(n_items: int, **by_item: float) -> list[float]:
    row = [0.0] * n_items
    for item, value in by_item.items():
        row[int(item[1:])] = value
    return row


def test_next_basket_f1_and_ndcg_at_5_by_hand():
    n = 12
    # user 0: baskets {0,1} {2,3,4} {5,1}; test = last 4 events, so the first test basket is
    # {3,4} (its event 2 is training context), predicted at column 3; then {5,1} at column 5.
    # user 1: baskets {3} {4,4,6,4} (repeats count once), predicted at column 1.
    data = timed_sequences([[0, 1, 2, 3, 4, 5, 1], [3, 4, 4, 6, 4]],
                 [[0, 10, 5000, 5010, 5020, 9000, 9010], [0, 3600, 3601, 3602, 3603]], n,
                 n_test=[4, 4])
    model = TableModel(n, {
        (0, 3): scores(n, i3=2.0, i7=1.5, i4=1.2),  # ranks 1 and 3
        (0, 5): scores(n, i5=1.0, i6=1.0, i7=1.0, i8=1.0, i9=1.0, i1=0.5),  # 5: rank 5 (ties)
        (1, 1): scores(n, i6=2.0, i4=1.0, i0=1.0, i1=1.0, i2=1.0, i3=1.0, i5=1.0),  # 4: rank 7
    })
    metrics = make_evaluator().next_basket_metrics(model, data, "test", GAP, 5)
    assert sorted(model.asked) == [(0, 3), (0, 5), (1, 1)]
    log2 = math.log2
    f1_u0 = (2 * 2 / (5 + 2) + 2 * 1 / (5 + 2)) / 2
    ndcg_u0 = ((1 + 1 / log2(4)) / (1 + 1 / log2(3)) + (1 / log2(6)) / (1 + 1 / log2(3))) / 2
    f1_u1, ndcg_u1 = 2 * 1 / (5 + 2), 1 / (1 + 1 / log2(3))
    assert metrics["basket_f1_at_5"] == pytest.approx((f1_u0 + f1_u1) / 2)
    assert metrics["basket_ndcg_at_5"] == pytest.approx((ndcg_u0 + ndcg_u1) / 2)
    assert metrics["basket_count"] == 3


def test_next_basket_metrics_rank_constant_scores_last():
    data = timed_sequences([[0, 1, 2]], [[0, 10, 5000]], 8, n_test=[1])
    constant = TableModel(8, {(0, 2): [1.0] * 8})
    metrics = make_evaluator().next_basket_metrics(constant, data, "test", GAP, 5)
    assert metrics["basket_f1_at_5"] == 0 and metrics["basket_ndcg_at_5"] == 0
    # a catalogue no larger than k: every item is in the list, at rank 8 here
    metrics = make_evaluator().next_basket_metrics(constant, data, "test", GAP, 8)
    assert metrics["basket_ndcg_at_8"] == pytest.approx(1 / math.log2(9))


@pytest.mark.parametrize(("settings", "key"), [(["eval.basket_gap_s=1800", "eval.basket_k=0"],
                                                 "eval.basket_k"),
                                                (["eval.basket_gap_s=soon"], "eval.basket_gap_s")])
def test_eval_basket_settings_are_checked_before_the_run(tmp_path, settings, key):
    """The schema is their one check (the evaluator takes checked values)."""
    cfg = compose_config(["model=pop", *settings,
                          *tiny_overrides(tmp_path / "data", tmp_path / "mlflow.db")])
    with pytest.raises(SeqexpError, match=key):
        run_experiment(cfg, launch_dir=tmp_path, output_dir=tmp_path / "run")
    assert not (tmp_path / "mlflow.db").exists()
