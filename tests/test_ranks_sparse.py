"""Ranks from a shared score vector + sparse entries per point (count_sparse_ranks) against
hand-computed counts and against the dense path (count_ranks) on random scores full of ties;
the evaluator's two paths on pop, itemknn and expdecay_knn; the item-kNN fit stopped between
its blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import make_evaluator, sequences, train_settings
from seqexp.core.errors import SeqexpError
from seqexp.core.stopping import TrainingStopped
from seqexp.data.batching import prediction_batches
from seqexp.engine import evaluator as evaluator_module
from seqexp.engine import ranks as ranks_module
from seqexp.engine.ranks import (
    RowTable,
    count_ranks,
    count_sparse_ranks,
    count_table_ranks,
    prepare_table,
)
from seqexp.engine.trainer import Trainer
from seqexp.models import cpu_kernels
from seqexp.models import knn as knn_module
from seqexp.models.knn import ExpDecayKNN, ItemKNN, cosine_neighbours
from seqexp.models.popularity import Popularity
from seqexp.run import presets

SHARED = torch.tensor([3.0, 1.0, 1.0, 2.0, 0.0])
IDS = torch.tensor([[3, -1], [4, -1], [-1, -1], [1, 0]])
ENTRIES = torch.tensor([[1.0, 9.0], [5.0, 9.0], [9.0, 9.0], [3.0, 2.0]])  # 9 at padding
TARGETS = torch.tensor([1, 4, 2, 0])


def _sparse(targets, ids, scores, excluded=None, shared=SHARED):
    return count_sparse_ranks(shared, torch.sort(shared).values, targets, ids, scores,
                              excluded)


def test_hand_computed_counts_of_shared_plus_sparse_scores(cpu_kernels_switch):
    # point 0: scores [3, 1, 1, 1, 0], target 1 -> above: item 0; level: items 2, 3
    # point 1: scores [3, 1, 1, 2, 5], target 4 -> the best item
    # point 2: scores [3, 1, 1, 2, 0] (padding only), target 2 -> above 0, 3; level 1
    # point 3: scores [2, 3, 1, 2, 0], target 0 at 2 -> above 1; level 3
    greater, equal = _sparse(TARGETS, IDS, ENTRIES)
    assert greater.tolist() == [1, 0, 2, 1]
    assert equal.tolist() == [2, 0, 1, 1]
    # excluded: item 3 of point 0 (at its entry's 1: one level less), item 1 of point 2
    # (shared score 1, level), item 1 of point 3 (its entry's 3: one above less)
    excluded = (torch.tensor([0, 2, 3]), torch.tensor([3, 1, 1]))
    greater, equal = _sparse(TARGETS, IDS, ENTRIES, excluded)
    assert greater.tolist() == [1, 0, 2, 0]
    assert equal.tolist() == [1, 0, 0, 1]


def test_a_nan_entry_or_shared_score_is_refused(cpu_kernels_switch):
    with pytest.raises(SeqexpError, match="NaN"):
        _sparse(TARGETS, IDS, torch.where(IDS == 4, torch.nan, ENTRIES))
    shared = SHARED.clone()
    shared[2] = torch.nan

    class Model(Popularity):
        def shared_scores(self):
            return shared
    with pytest.raises(SeqexpError, match="NaN"):
        make_evaluator().rank_counts(Model(5, 1), sequences([[0, 1, 2]], 5), "test")


def test_a_nan_in_an_itemknn_table_is_refused():
    data = _history_data()
    model = presets.model("itemknn", data.n_items, data.n_users, neighbours=5)
    model.fit(data)
    model.similarity[3, 0] = torch.nan
    with pytest.raises(SeqexpError, match="NaN"):
        make_evaluator().rank_counts(model, data, "test")


def _dense(shared, ids, scores):
    dense = shared.expand(len(ids), len(shared)).clone()
    rows, cols = (ids >= 0).nonzero(as_tuple=True)
    dense[rows, ids[rows, cols]] = scores[rows, cols]
    return dense


dtype_np = {torch.float32: np.float32, torch.float64: np.float64}


@settings(max_examples=300, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), n_items=st.integers(1, 40), points=st.integers(0, 12),
       width=st.integers(0, 12), levels=st.integers(1, 8), chunk=st.integers(1, 50),
       rows=st.integers(0, 5), dtype=st.sampled_from([torch.float32, torch.float64]),
       kernels=st.booleans())
def test_sparse_counts_equal_the_dense_counts_with_ties_and_exclusions(
        seed, n_items, points, width, levels, chunk, rows, dtype, kernels):
    """Scores drawn from a few levels (many ties between shared and entry scores, negative
    zero and ±inf among them), entries on the target or not, padding anywhere, excluded items
    with and without an entry; the entries given per point and as rows of a table (among `rows`
    others) that the points name; float32 (packed row sorts) and float64 scores; the counts
    in compiled code (CPU kernel sparse_entries) or in whole-tensor operations."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_kernels, "_enabled", set(cpu_kernels.KERNELS) if kernels else set())
        _check_sparse_counts(seed, n_items, points, width, levels, chunk, rows, dtype)


def _check_sparse_counts(seed, n_items, points, width, levels, chunk, rows, dtype):
    rng = np.random.default_rng(seed)
    values = np.array([-1.5, -0.0, 0.0, 0.25, 1.0, 7.0, np.inf, -np.inf],
                      dtype=dtype_np[dtype])[:levels]
    shared = torch.from_numpy(rng.choice(values, n_items))
    targets = torch.from_numpy(rng.integers(0, n_items, points))
    width = min(width, n_items)
    ids = np.full((points, width), -1)
    for row in range(points):  # distinct items per row; the target among them half the time
        chosen = rng.permutation(n_items)[:width]
        if width and rng.random() < 0.5 and targets[row].item() not in chosen:
            chosen[rng.integers(width)] = targets[row].item()
        ids[row] = np.where(rng.random(width) < 0.8, chosen, -1)
    ids = torch.from_numpy(ids)
    scores = torch.from_numpy(rng.choice(values, (points, width)))
    # the same entries as rows of a table: each point's row, then the table's other rows
    order = torch.from_numpy(rng.permutation(points + rows))
    table_ids = torch.cat([ids, torch.full((rows, width), -1)])[order]
    table_scores = torch.cat([scores, torch.from_numpy(rng.choice(values, (rows, width)))])
    table = prepare_table(shared, table_ids, table_scores[order])
    point_rows = torch.argsort(order)[:points]
    pairs = [(p, i) for p in range(points) for i in range(n_items)
             if i != targets[p] and rng.random() < 0.3]
    excluded = (torch.tensor([p for p, _ in pairs], dtype=torch.int64),
                torch.tensor([i for _, i in pairs], dtype=torch.int64))
    dense = _dense(shared, ids, scores)
    for exclusion in (None, excluded):
        expected = count_ranks(lambda lo, hi: dense[:, lo:hi], targets, n_items, chunk,
                               exclusion)
        got = _sparse(targets, ids, scores, exclusion, shared)
        assert got[0].tolist() == expected[0].tolist()
        assert got[1].tolist() == expected[1].tolist()
        got = count_table_ranks(shared, torch.sort(shared).values, table, point_rows, targets,
                                exclusion)
        assert got[0].tolist() == expected[0].tolist()
        assert got[1].tolist() == expected[1].tolist()


def _history_data(seed: int = 0, n_items: int = 30):
    """Users whose histories repeat items (duplicate anchors and neighbours for expdecay)."""
    rng = np.random.default_rng(seed)
    users = [list(rng.integers(0, n_items, rng.integers(4, 25))) for _ in range(25)]
    return sequences(users, n_items, n_val=[1] * 25, n_test=[2] * 25)


def _models(n_items: int, n_users: int):
    return [Popularity(n_items, n_users), presets.model("itemknn", n_items, n_users, neighbours=5),
            presets.model("itemknn", n_items, n_users, neighbours=5, popularity_tiebreak=False),
            presets.model("expdecay_knn", n_items, n_users, neighbours=5, window=None),
            presets.model("expdecay_knn", n_items, n_users, neighbours=8, window=3, anchor_block=7)]


@pytest.mark.parametrize("batch_users", [256, 6])  # one batch; batches naming rows again
@pytest.mark.parametrize("exclude_seen", [False, True])
@pytest.mark.parametrize("index", range(5))
def test_the_evaluators_sparse_path_gives_the_dense_paths_counts(index, exclude_seen, batch_users,
                                                                  monkeypatch, cpu_kernels_switch):
    data = _history_data()
    model = _models(data.n_items, data.n_users)[index]
    model.fit(data)
    evaluator = make_evaluator(exclude_seen=exclude_seen, batch_users=batch_users)
    monkeypatch.setattr(ranks_module, "TABLE_CHUNK_ROWS", 7)  # the table in several chunks
    counts = {}
    tables = []
    prepared = evaluator_module.row_table
    monkeypatch.setattr(evaluator_module, "row_table",
                        lambda *args: tables.append(prepared(*args)) or tables[-1])
    for path in ("table", "entries", "dense"):  # the model's own path first
        if path == "entries":
            monkeypatch.setattr(evaluator_module, "row_table", lambda *args: None)
        if path == "dense":
            monkeypatch.setattr(evaluator_module, "sorted_shared_scores", lambda model: None)
        for phase in ("val", "test"):
            counts[path, phase] = evaluator.rank_counts(model, data, phase)
    has_table = isinstance(model, ItemKNN) and not isinstance(model, ExpDecayKNN)
    assert tables and all((table is not None) == has_table for table in tables)
    for phase in ("val", "test"):
        dense = counts["dense", phase]
        assert len(dense.greater) > 0
        for path in ("table", "entries"):
            for field in ("greater", "equal", "users", "positions", "targets"):
                assert (getattr(counts[path, phase], field).tolist()
                        == getattr(dense, field).tolist()), (path, field)
    # each item at most once a row
    batch_state = model.prediction_states(next(iter(_batches(data))))
    ids, scores = model.sparse_scores(batch_state)
    for row in ids.tolist():
        named = [item for item in row if item >= 0]
        assert len(named) == len(set(named))


def test_an_item_knn_evaluation_prepares_the_rows_its_points_name_once(monkeypatch):
    data = _history_data(2)
    model = presets.model("itemknn", data.n_items, data.n_users, neighbours=5)
    model.fit(data)
    tables = []
    prepared = evaluator_module.row_table
    monkeypatch.setattr(evaluator_module, "row_table",
                        lambda *args: tables.append(prepared(*args)) or tables[-1])
    make_evaluator(batch_users=4).rank_counts(model, data, "val")
    first = np.maximum(data.train_end, data.offsets[:-1] + 1)
    named = {int(data.items[position - 1]) for user in range(data.n_users)
             for position in range(first[user], data.val_end[user])}
    assert len(named) < data.n_items  # some rows are never named
    (table,) = tables
    assert table.size == len(named)
    assert set(np.flatnonzero(table.slots.numpy() >= 0).tolist()) == named
    assert sorted(table.slots[sorted(named)].tolist()) == list(range(len(named)))


def test_a_table_whose_rows_change_width_is_refused():
    def entries(width):
        return lambda points: (torch.full((len(points), width), -1),
                               torch.zeros(len(points), width))
    table = RowTable(torch.zeros(6), 6)
    table.prepared(torch.tensor([0, 1]), entries(3))
    table.prepared(torch.tensor([2]), entries(3))  # the same width: prepared
    assert table.size == 3
    with pytest.raises(ValueError, match="one width"):
        table.prepared(torch.tensor([4]), entries(2))


def _batches(data):
    return prediction_batches(data, "test", 64)


def test_the_sparse_entries_are_the_dense_scores_where_they_differ(cpu_kernels_switch):
    data = _history_data(1)
    for model in _models(data.n_items, data.n_users)[1:]:
        model.fit(data)
        state = model.prediction_states(next(iter(_batches(data))))
        ids, scores = model.sparse_scores(state)
        dense = model.score_items(state, 0, data.n_items)
        assert torch.equal(_dense(model.shared_scores(), ids, scores), dense)
        assert (ids >= 0).sum() > 0


@pytest.mark.parametrize("distinct_anchors", [3, 400])
def test_expdecay_entries_of_wide_rows_are_the_dense_scores(cpu_kernels_switch,
                                                             distinct_anchors):
    """Rows naming ~300 items (past an int8 slot) and ~36,000 (past an int16 slot, where the
    compiled kernel keeps int32 slots), every item mentioned a second time after them: each
    item once, at its dense score."""
    n_items, k, points = 200_000, 100, 3
    generator = torch.Generator().manual_seed(distinct_anchors)
    window = 2 * distinct_anchors
    model = ExpDecayKNN(n_items, 4, neighbours=k, decay=0.01, decay_unit="position",
                        time_unit_s=3600.0, window=window, popularity_tiebreak=True,
                        anchor_block=20_000_000, fit_block=None)
    model.neighbours.copy_(torch.randint(0, n_items, (n_items, k), generator=generator))
    model.similarity.copy_(torch.rand(n_items, k, generator=generator))
    model.prior.copy_(torch.rand(n_items, generator=generator) * 1e-6)
    anchors = torch.randint(0, n_items, (points, distinct_anchors), generator=generator)
    anchors = torch.cat([anchors, anchors], 1)  # each neighbour list a second time
    weights = torch.exp(-0.01 * torch.arange(window, dtype=torch.float32)).expand(points, -1)
    ids, scores = model.sparse_scores((anchors, weights.contiguous()))
    for row in ids:
        named = row[row >= 0]
        assert len(torch.unique(named)) == len(named) > 0.9 * min(distinct_anchors * k, 36_000)
    dense = model.score_items((anchors, weights), 0, n_items)
    assert torch.equal(_dense(model.shared_scores(), ids, scores), dense)


def _dense_fit(data, k):
    """The fit written out densely: every item's similarity row of the catalogue's width
    (counts from a dense product, exact integers; the fit's float32 formula), self at 0, the
    top k by (similarity descending, item id ascending), zero similarities dropped; and the
    top-k values of torch.topk over the same rows (the fit before sparse rows, whose order
    among equal similarities was unspecified)."""
    mask = data.train_mask()
    binary = np.zeros((data.n_users, data.n_items), dtype=np.float32)
    binary[data.event_users()[mask], data.items[mask]] = 1.0
    counts = torch.from_numpy(binary.T @ binary)
    norms = torch.from_numpy(np.sqrt(binary.sum(0)))
    sims = counts / (norms[:, None] * norms[None, :]).clamp_min(1e-12)
    sims.fill_diagonal_(0.0)
    k = min(k, data.n_items - 1)
    order = np.lexsort((np.broadcast_to(np.arange(data.n_items), sims.shape), -sims.numpy()))
    ids = torch.from_numpy(order[:, :k])
    values = sims.gather(1, ids)
    return (torch.where(values > 0, ids, 0), torch.where(values > 0, values, 0.0),
            sims.topk(k, dim=1).values)


@settings(max_examples=60, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), n_items=st.integers(2, 30), k=st.integers(1, 8),
       block=st.one_of(st.none(), st.integers(1, 7)), max_block=st.integers(1, 400),
       wide_counts=st.booleans())
def test_the_sparse_fit_keeps_the_dense_fits_neighbours_with_ties_broken_by_item_id(
        seed, n_items, k, block, max_block, wide_counts):
    """Few users, few items: equal similarities everywhere, rows with fewer than k
    neighbours, items nobody trained on; blocks of items or of co-occurrence counts; uint16
    or (as beyond 65,535 users) int32 counters."""
    rng = np.random.default_rng(seed)
    users = [list(rng.integers(0, n_items, rng.integers(2, 9))) for _ in range(6)]
    data = sequences(users, n_items)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(knn_module, "UINT16_USERS", -1 if wide_counts else knn_module.UINT16_USERS)
        ids, sims = cosine_neighbours(data, k, torch.device("cpu"), block, max_block=max_block)
    dense_ids, dense_sims, topk_values = _dense_fit(data, k)
    assert torch.equal(ids, dense_ids) and torch.equal(sims, dense_sims)
    # the same similarities as torch.topk's (only the choice among equal ones is now fixed)
    assert torch.equal(sims, torch.where(topk_values > 0, topk_values, 0.0))


def test_the_sparse_fit_ranks_as_the_dense_fit():
    """Rows with fewer than k neighbours and rows whose k-th similarity ties the next."""
    rng = np.random.default_rng(3)
    users = [list(rng.integers(0, 60, rng.integers(3, 12))) for _ in range(30)]
    data = sequences(users, 60, n_val=[1] * 30, n_test=[2] * 30)
    model, dense = (presets.model("itemknn", data.n_items, data.n_users, neighbours=4)
                    for _ in range(2))
    model.fit(data)
    dense_ids, dense_sims, _ = _dense_fit(data, 4)
    dense.neighbours.copy_(dense_ids)
    dense.similarity.copy_(dense_sims)
    dense.prior.copy_(model.prior)
    fifth = _dense_fit(data, 5)[1][:, 4]
    assert ((dense_sims[:, 3] == fifth) & (fifth > 0)).any() and (dense_sims == 0).any()
    for exclude_seen in (False, True):
        evaluator = make_evaluator(exclude_seen=exclude_seen)
        got, expected = (evaluator.evaluate(m, data, "test") for m in (model, dense))
        assert got == expected


def test_the_fit_blocks_give_the_neighbours_of_one_block_and_stop_between_blocks(caplog):
    data = _history_data(2, n_items=40)
    whole = cosine_neighbours(data, 5, torch.device("cpu"))
    blocked = cosine_neighbours(data, 5, torch.device("cpu"), block_items=3)
    assert torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])
    asked = []

    def stop_on_fourth_ask():
        asked.append(1)
        return "SIGTERM" if len(asked) == 4 else None

    model = presets.model("itemknn", data.n_items, data.n_users, neighbours=5, fit_block=3)
    trainer = Trainer(make_evaluator(), train_settings(), stop_requested=stop_on_fourth_ask, seed=0)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after epoch 0"):
        trainer.fit(model, data)
    assert len(asked) == 4  # asked before each block: blocks 1-3 ran, the fourth did not
    assert not model.similarity.any()  # nothing of an unfinished fit is kept
