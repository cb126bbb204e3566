"""The dense counts (count_ranks) in one compiled pass (CPU kernel dense_counts) against
hand-computed counts and comparisons on random scores full of ties, with exclusions, NaN and
infinities, chunks of every width; and against the sums of signs (the path CUDA takes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import switch_cpu_kernel
from seqexp.core.errors import SeqexpError
from seqexp.engine import ranks
from seqexp.engine.ranks import count_ranks

INF = float("inf")
# 3 points x 7 items; targets 2, 6 and 0 (one in each chunk of 3, the last of width 1)
SCORES = torch.tensor([
    [0.5, 0.9, 0.5, 0.1, 0.5, 0.7, 0.5],  # target 0.5: 0.9 and 0.7 above, three level
    [1.0, -INF, 2.0, -INF, 0.0, 3.0, -INF],  # target -inf: 4 above, 2 level (ties at -inf)
    [INF, 1.0, INF, -0.0, 0.0, INF, 2.0],  # target +inf: 0 above, 2 level
])
TARGETS = torch.tensor([2, 6, 0])
# (point, item): items 4 (level) and 1 (above) of point 0, item 0 (above) of point 1, item 3
# (below) of point 2
EXCLUDED = (torch.tensor([0, 0, 1, 2]), torch.tensor([1, 4, 0, 3]))


def _block(scores: torch.Tensor):
    return lambda lo, hi: scores[:, lo:hi].clone()  # a fresh product, as a model returns


@pytest.mark.parametrize("kernel", [True, False], ids=["dense_counts", "sign_sums"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [7, 3, 1])
def test_counts_by_hand_with_ties_at_infinity_and_exclusions(monkeypatch, kernel, dtype, chunk):
    switch_cpu_kernel(monkeypatch, "dense_counts", kernel)
    scores = SCORES.to(dtype)
    assert [t.tolist() for t in count_ranks(_block(scores), TARGETS, 7, chunk)] == [
        [2, 4, 0], [3, 2, 2]]
    assert [t.tolist() for t in count_ranks(_block(scores), TARGETS, 7, chunk, EXCLUDED)] == [
        [1, 3, 0], [2, 2, 2]]


@pytest.mark.parametrize("kernel", [True, False], ids=["dense_counts", "sign_sums"])
@pytest.mark.parametrize("column", [0, 3, 6])
@pytest.mark.parametrize("chunk", [7, 2])
def test_a_nan_score_anywhere_is_an_error(monkeypatch, kernel, column, chunk):
    switch_cpu_kernel(monkeypatch, "dense_counts", kernel)
    scores = SCORES.clone()
    scores[1, column] = float("nan")  # column 6 is point 1's target; the last column
    with pytest.raises(SeqexpError, match="NaN"):
        count_ranks(_block(scores), TARGETS, 7, chunk)


def _by_comparison(scores: np.ndarray, targets: np.ndarray, excluded_mask: np.ndarray):
    """Hand counts: items ranked (not excluded, not the target) above and level."""
    target = scores[np.arange(len(targets)), targets][:, None]
    ranked = ~excluded_mask
    ranked[np.arange(len(targets)), targets] = False
    return (((scores > target) & ranked).sum(1).tolist(),
            ((scores == target) & ranked).sum(1).tolist())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_items=st.integers(1, 40), points=st.integers(1, 12),
       levels=st.integers(1, 6), chunk=st.integers(1, 41), kept=st.sampled_from([0, 5, 1 << 23]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_compiled_counts_equal_comparisons_and_the_sums_of_signs(
        seed, n_items, points, levels, chunk, kept, dtype):
    """Scores drawn from a few levels (-inf, -0.0, 0.0, 0.25, 7, +inf: ties everywhere),
    targets in any chunk, about a third of each point's other items excluded, first-pass
    chunks kept or scored again; compiled counts = hand counts = the sums of signs."""
    rng = np.random.default_rng(seed)
    values = np.array([0.25, -0.0, 0.0, INF, 7.0, -INF])[:levels]
    scores = torch.from_numpy(rng.choice(values, (points, n_items))).to(dtype)
    targets = torch.from_numpy(rng.integers(0, n_items, points))
    mask = rng.random((points, n_items)) < 0.3
    mask[np.arange(points), targets.numpy()] = False
    point, item = np.nonzero(mask)  # row-major: sorted by point
    excluded = (torch.from_numpy(point), torch.from_numpy(item))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ranks, "KEPT_SCORES", kept)
        for exclusion, hidden in ((None, np.zeros_like(mask)), (excluded, mask)):
            expected = _by_comparison(scores.numpy(), targets.numpy(), hidden)
            switch_cpu_kernel(patch, "dense_counts", True)
            got = count_ranks(_block(scores), targets, n_items, chunk, exclusion)
            assert [t.tolist() for t in got] == list(expected)
            switch_cpu_kernel(patch, "dense_counts", False)
            signs = count_ranks(_block(scores), targets, n_items, chunk, exclusion)
            assert [t.tolist() for t in signs] == list(expected)


def test_the_kernel_counts_strided_views_and_adds_to_the_counts_it_is_given():
    scores = torch.arange(24, dtype=torch.float32).reshape(4, 6) % 5  # ties: 0..4 repeating
    view = scores[:, 1:5]  # not contiguous
    greater = torch.tensor([10, 0, 0, 0], dtype=torch.int32)
    equal = torch.full((4,), -1, dtype=torch.int32)
    targets = torch.tensor([2.0, 0.0, 4.0, 1.0])
    # rows of the view: [1 2 3 4], [2 3 4 0], [3 4 0 1], [4 0 1 2]
    zeros = np.zeros(4, dtype=np.float32)
    arrays = targets.numpy(), greater.numpy(), equal.numpy()
    assert not ranks._tile_counts(view.numpy(), zeros, *arrays)
    assert greater.tolist() == [12, 3, 0, 2] and equal.tolist() == [0, 0, 0, 0]
    view[3, 3] = float("nan")
    assert ranks._tile_counts(view.numpy(), zeros, *arrays)


def test_the_kernel_adds_each_columns_bias_rounded_as_torch_rounds_the_sum():
    product = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    bias = torch.tensor([1.0, 0.0, -1.0])
    targets = torch.tensor([2.0, 0.0, 1.0])
    greater = torch.zeros(3, dtype=torch.int32)
    equal = torch.zeros(3, dtype=torch.int32)
    bias[1] = 1e-8  # 1 + 1e-8 is 1 in float32: level with a target of 1, not above it
    assert not ranks._tile_counts(product.numpy(), bias.numpy(), targets.numpy(),
                                  greater.numpy(), equal.numpy())
    # scores: [2, 2, 2], [1, 1e-8, -1], [2, 1, 0]
    assert greater.tolist() == [0, 2, 1] and equal.tolist() == [3, 0, 1]
    scores = product + bias
    assert greater.tolist() == (scores > targets[:, None]).sum(1).tolist()
    assert equal.tolist() == (scores == targets[:, None]).sum(1).tolist()


def test_the_tile_buffer_lends_one_storage_in_each_shape_asked_for():
    buffer = ranks.TileBuffer()
    like = torch.zeros(1)
    first = buffer.take(3, 4, like)
    assert buffer.take(3, 4, like) is first  # the same view, tile after tile
    narrower = buffer.take(2, 3, like)  # a partial last tile, a smaller last block
    assert narrower.shape == (2, 3) and narrower.is_contiguous()
    assert narrower.data_ptr() == first.data_ptr()
    assert buffer.take(4, 8, like).shape == (4, 8)  # grown
    assert buffer.take(2, 2, like.double()).dtype == torch.float64


def test_half_precision_scores_take_the_sums_of_signs():
    scores = torch.linspace(0.0, 1.0, 600).repeat(3, 1).to(torch.bfloat16)  # bf16: ties
    targets = torch.tensor([599, 0, 300])
    greater, equal = count_ranks(_block(scores), targets, 600, 7)
    target = scores[torch.arange(3), targets][:, None]
    assert greater.tolist() == (scores > target).sum(1).tolist()
    assert equal.tolist() == ((scores == target).sum(1) - 1).tolist()


@pytest.mark.parametrize(("kernel", "dtype", "compiled"), [
    (True, torch.float32, True), (True, torch.float64, True), (True, torch.bfloat16, False),
    (False, torch.float32, False)])
def test_the_kernel_counts_each_chunk_once_where_it_acts(monkeypatch, kernel, dtype, compiled):
    switch_cpu_kernel(monkeypatch, "dense_counts", kernel)
    widths = []
    original = ranks._tile_counts

    def recorded(scores, *arrays):
        widths.append(scores.shape[1])
        return original(scores, *arrays)
    monkeypatch.setattr(ranks, "_tile_counts", recorded)
    greater, equal = count_ranks(_block(SCORES.to(dtype)), TARGETS, 7, 3)
    assert (greater.tolist(), equal.tolist()) == ([2, 4, 0], [3, 2, 2])
    assert widths == ([3, 3, 1] if compiled else [])


@pytest.mark.parametrize("kernel", [True, False], ids=["dense_counts", "sign_sums"])
def test_blocks_counted_chunk_by_chunk_score_each_chunk_for_every_block_in_turn(
        monkeypatch, kernel):
    """count_block_ranks: the first passes score the chunks holding targets (kept), then each
    later chunk is scored for block 0, then block 1 (its item rows read once for both); the
    counts are count_ranks's block by block, exclusions included."""
    switch_cpu_kernel(monkeypatch, "dense_counts", kernel)
    calls = []

    def scorer(block: int, scores: torch.Tensor):
        def score(lo: int, hi: int) -> torch.Tensor:
            calls.append((block, lo))
            return scores[:, lo:hi].clone()
        return score
    second = SCORES.flip(1)
    targets = [torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])]  # all in chunk 0 (0..2)
    excluded = [EXCLUDED, None]
    got = ranks.count_block_ranks([ranks.scores_alone(scorer(0, SCORES)),
                                   ranks.scores_alone(scorer(1, second))], targets, 7, 3,
                                  excluded)
    assert calls == [(0, 0), (1, 0), (0, 3), (1, 3), (0, 6), (1, 6)]
    for (greater, equal), scores, points, pairs in zip(got, (SCORES, second), targets,
                                                       excluded, strict=True):
        alone = count_ranks(_block(scores), points, 7, 3, pairs)
        assert [greater.tolist(), equal.tolist()] == [t.tolist() for t in alone]
    # by hand: point 0 (target 0.5) has 0.9 and 0.7 above, 0.9 excluded; point 1 (target
    # -inf) has 1, 2, 0 and 3 above, 1 excluded; point 2's target is +inf
    assert got[0][0].tolist() == [1, 3, 0]


@settings(max_examples=200, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1), n_items=st.integers(1, 30), n_rows=st.integers(1, 6),
       points=st.integers(0, 25), levels=st.integers(1, 8),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_counts_from_shared_sorted_rows_equal_the_dense_counts(seed, n_items, n_rows, points,
                                                               levels, dtype):
    """count_row_ranks (each row sorted once, two searches a point) against count_ranks over
    every point's own copy of its row: scores from a few levels (ties, ±inf, -0.0 beside 0.0),
    rows no point names, rows named by many points in any order, excluded items above, level
    and below."""
    rng = np.random.default_rng(seed)
    values = np.array([0.5, -0.0, 0.0, -INF, 2.0, INF, -1.0, 0.25])[:levels]
    rows = torch.from_numpy(rng.choice(values, (n_rows, n_items))).to(dtype)
    row_of_point = torch.from_numpy(rng.integers(0, n_rows, points))
    targets = torch.from_numpy(rng.integers(0, n_items, points))
    pairs = [(p, i) for p in range(points) for i in range(n_items)
             if i != targets[p] and rng.random() < 0.3]
    excluded = (torch.tensor([p for p, _ in pairs], dtype=torch.int64),
                torch.tensor([i for _, i in pairs], dtype=torch.int64))
    dense = rows[row_of_point]
    for exclusion in (None, excluded):
        expected = count_ranks(_block(dense), targets, n_items, 7, exclusion)
        got = ranks.count_row_ranks(rows, row_of_point, targets, exclusion)
        assert got[0].tolist() == expected[0].tolist()
        assert got[1].tolist() == expected[1].tolist()


def test_counts_from_shared_rows_by_hand():
    # row 0 of SCORES for points 0 and 2 (targets 0.5 and 0.9), row 2 for point 1 (target inf)
    row_of_point, targets = torch.tensor([0, 2, 0]), torch.tensor([2, 0, 1])
    greater, equal = ranks.count_row_ranks(SCORES, row_of_point, targets)
    assert greater.tolist() == [2, 0, 0]
    assert equal.tolist() == [3, 2, 0]
    # point 0 without item 1 (above) and item 4 (level); point 1 without item 5 (level)
    excluded = (torch.tensor([0, 0, 1]), torch.tensor([1, 4, 5]))
    greater, equal = ranks.count_row_ranks(SCORES, row_of_point, targets, excluded)
    assert greater.tolist() == [1, 0, 0]
    assert equal.tolist() == [2, 1, 0]


def test_a_nan_in_a_shared_row_is_an_error():
    rows = SCORES.clone()
    rows[1, 3] = torch.nan
    with pytest.raises(SeqexpError, match="NaN"):
        ranks.count_row_ranks(rows, torch.tensor([0]), torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rows_are_sorted_with_their_dtype_on_numpys_or_torchs_sort(dtype):
    scores = torch.tensor([[3.0, -INF, 0.5, 0.0, -1.0], [1.0, 1.0, INF, -2.0, 0.0]], dtype=dtype)
    ordered = ranks.sort_rows(scores)
    assert ordered.dtype == dtype
    assert ordered.tolist() == [[-INF, -1.0, 0.0, 0.5, 3.0], [-2.0, 0.0, 1.0, 1.0, INF]]
