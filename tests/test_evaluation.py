"""The evaluator against hand-computed ranks, ties, chunking and constant scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import sequences
from seqexp.errors import SeqexpError
from seqexp.evaluation import Evaluator, RankCounts, count_ranks
from seqexp.models.base import Recommender
from seqexp.models.popularity import Popularity


def _block(scores: torch.Tensor):
    return lambda lo, hi: scores[:, lo:hi]


SCORES = torch.tensor([
    [0.5, 0.9, 0.5, 0.1, 0.5],  # target 0: one above, two level -> g=1, e=2
    [0.2, 0.2, 0.2, 0.2, 0.2],  # target 3: constant scores -> g=0, e=4
    [0.1, 0.2, 0.3, 0.4, 0.5],  # target 4: the best item -> g=0, e=0
    [0.9, 0.8, 0.7, 0.6, 0.5],  # target 4: the worst item -> g=4, e=0
])
TARGETS = torch.tensor([0, 3, 4, 4])


@pytest.mark.parametrize("chunk", [5, 100, 2, 1])
def test_count_ranks_hand_computed_with_and_without_item_chunks(chunk):
    greater, equal = count_ranks(_block(SCORES), TARGETS, 5, chunk)
    assert greater.tolist() == [1, 0, 0, 4]
    assert equal.tolist() == [2, 4, 0, 0]


def test_metrics_pessimistic_optimistic_expected_by_hand():
    counts = RankCounts(np.array([1, 0, 0, 4]), np.array([2, 4, 0, 0]))
    assert counts.rank_pessimistic().tolist() == [4, 5, 1, 5]
    assert counts.rank_optimistic().tolist() == [2, 1, 1, 5]
    m = counts.metrics([3])
    assert m["recall_at_3"] == pytest.approx(1 / 4)  # only the rank-1 event
    assert m["mrr_at_3"] == pytest.approx(1 / 4)
    assert m["recall_at_3_optimistic"] == pytest.approx(3 / 4)
    assert m["mrr_at_3_optimistic"] == pytest.approx((1 / 2 + 1 + 1) / 4)
    # expected under random ties: event 0 rank uniform on {2,3,4}; event 1 on {1..5}
    e0_recall, e0_mrr = 2 / 3, (1 / 2 + 1 / 3) / 3
    e1_recall, e1_mrr = 3 / 5, (1 + 1 / 2 + 1 / 3) / 5
    assert m["recall_at_3_expected"] == pytest.approx((e0_recall + e1_recall + 1) / 4)
    assert m["mrr_at_3_expected"] == pytest.approx((e0_mrr + e1_mrr + 1) / 4)
    assert m["n_events"] == 4


def test_mrr_is_zero_beyond_the_cutoff():
    counts = RankCounts(np.array([20, 19]), np.array([0, 0]))  # ranks 21 and 20
    m = counts.metrics([20])
    assert m["mrr_at_20"] == pytest.approx((1 / 20) / 2)
    assert m["recall_at_20"] == pytest.approx(0.5)


def test_nan_scores_are_an_error_not_a_first_rank():
    scores = SCORES.clone()
    scores[0, 3] = float("nan")
    with pytest.raises(SeqexpError, match="NaN"):
        count_ranks(_block(scores), TARGETS, 5, 5)


def _counts_by_comparison(scores: torch.Tensor, targets: torch.Tensor):
    target_scores = scores.gather(1, targets[:, None])
    return ((scores > target_scores).sum(1).tolist(),
            ((scores == target_scores).sum(1) - 1).tolist())


def test_infinite_scores_and_ties_at_infinity_count_like_comparisons():
    inf = float("inf")
    scores = torch.tensor([
        [inf, 1.0, inf, -inf, 0.0],  # target 0 at +inf, tied with item 2 -> g=0, e=1
        [-inf, 1.0, -inf, -inf, 0.0],  # target 0 at -inf, tied with 2 and 3 -> g=2, e=2
        [inf, -inf, 3.0, 3.0, -inf],  # target 2: one above at +inf, one level -> g=1, e=1
        [1e-45, 0.0, -1e-45, 2e-45, 0.0],  # subnormal gaps: target 1 -> g=2, e=1
    ])
    targets = torch.tensor([0, 0, 2, 1])
    for chunk in (5, 2):
        greater, equal = count_ranks(_block(scores), targets, 5, chunk)
        assert (greater.tolist(), equal.tolist()) == ([0, 2, 1, 2], [1, 2, 1, 1])
    assert (greater.tolist(), equal.tolist()) == _counts_by_comparison(scores, targets)


def test_sign_sums_over_column_blocks_equal_comparisons_on_many_ties(monkeypatch):
    import seqexp.evaluation as evaluation

    monkeypatch.setattr(evaluation, "SIGN_COLUMNS", 3)  # sums over 3-column pieces
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 17), generator=generator).float()  # ties everywhere
    targets = torch.randint(0, 17, (50,), generator=generator)
    greater, equal = count_ranks(_block(scores), targets, 17, 17)
    assert (greater.tolist(), equal.tolist()) == _counts_by_comparison(scores, targets)


@pytest.mark.parametrize("chunk", [600, 7])
def test_half_precision_scores_are_counted_exactly_past_their_integer_range(chunk):
    scores = torch.linspace(0.0, 1.0, 600).repeat(3, 1).to(torch.bfloat16)  # bf16: 256 ties
    targets = torch.tensor([599, 0, 3])  # 0 and 3 share a 7-item chunk
    greater, equal = count_ranks(_block(scores), targets, 600, chunk)
    assert (greater.tolist(), equal.tolist()) == _counts_by_comparison(scores, targets)


@pytest.mark.parametrize("chunk", [4, 2])
def test_float64_scores_keep_differences_float32_would_round_away(chunk):
    scores = torch.tensor([[1.0, 1 + 1e-12, 1 + 2e-12, 0.5],
                           [1 + 1e-12, 1.0, 1.0, 1 + 1e-12]], dtype=torch.float64)
    targets = torch.tensor([0, 3])
    greater, equal = count_ranks(_block(scores), targets, 4, chunk)
    assert (greater.tolist(), equal.tolist()) == ([2, 0], [0, 1])
    assert (greater.tolist(), equal.tolist()) == _counts_by_comparison(scores, targets)


def test_the_evaluator_leaves_the_scores_a_model_returns_untouched():
    stored = SCORES.clone()
    count_ranks(lambda lo, hi: stored[:, lo:hi], TARGETS, 5, 2)
    assert torch.equal(stored, SCORES)


class Oracle(Recommender):
    """Scores the true next item 1 and everything else 0, using only the contract."""

    def __init__(self, n_items: int, n_users: int, truth: np.ndarray) -> None:
        super().__init__(n_items, n_users)
        self.truth = truth  # items by position: the oracle peeks at the data

    def prediction_states(self, batch):
        return batch.targets

    def score_items(self, state, lo, hi):
        return (state[:, None] == torch.arange(lo, hi)).float()


def _data():
    return sequences([[0, 1, 2, 3, 4], [4, 3, 2], [1, 2], [0, 0, 1, 1]], n_items=6,
                     n_val=[1, 0, 0, 1], n_test=[2, 1, 1, 1])


@pytest.mark.parametrize("max_block", [10_000, 7, 2, 1])
def test_evaluator_counts_every_target_once_and_chunks_consistently(max_block):
    data = _data()
    model = Oracle(6, 4, data.items)
    ev = Evaluator([1, 3], batch_users=2, max_block_elements=max_block)
    counts = ev.rank_counts(model, data, "test")
    assert len(counts) == 5  # 2 + 1 + 1 + 1 test events
    assert counts.rank_pessimistic().tolist() == [1] * 5
    val = ev.rank_counts(model, data, "val")
    assert len(val) == 2


def test_constant_scores_get_pessimistic_metrics_of_zero():
    data = _data()
    model = Popularity(6, 4)  # unfitted: every count is 0, all items tie
    m = Evaluator([1, 5]).evaluate(model, data, "test")
    assert m["mrr_at_5"] == 0.0 and m["recall_at_5"] == 0.0
    assert m["recall_at_5_optimistic"] == 1.0
    # rank uniform on 1..6: P(rank <= 5) = 5/6
    assert m["recall_at_5_expected"] == pytest.approx(5 / 6)


def test_context_never_includes_the_target_or_later_events():
    data = _data()
    seen = []

    class Spy(Oracle):
        def prediction_states(self, batch):
            for r, c in zip(batch.target_rows.tolist(), batch.target_cols.tolist(), strict=True):
                user = int(batch.users[r])
                seen.append((user, batch.items[r, :c].tolist(), int(batch.items[r, c])))
            return batch.targets

    Evaluator([1]).rank_counts(Spy(6, 4, data.items), data, "test")
    assert sorted(seen) == sorted([
        (0, [0, 1, 2], 3), (0, [0, 1, 2, 3], 4), (1, [4, 3], 2), (2, [1], 2), (3, [0, 0, 1], 1),
    ])


def test_invalid_cutoffs_are_rejected():
    with pytest.raises(SeqexpError, match="eval.cutoffs"):
        Evaluator([0, 20])
