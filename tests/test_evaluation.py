"""The evaluator against hand-computed ranks, ties, chunking and constant scores."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from helpers import make_evaluator, sequences, switch_cpu_kernel
from seqexp.core.errors import SeqexpError
from seqexp.engine.metrics import RankCounts
from seqexp.engine.ranks import count_ranks
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


@pytest.mark.parametrize("chunk", [5, 100])
def test_a_catalogue_in_one_chunk_is_scored_once_and_gives_the_hand_computed_counts(chunk):
    calls = []

    def block(lo, hi):
        calls.append((lo, hi))
        return SCORES[:, lo:hi].clone()  # a fresh tensor per call, as a model's product is

    greater, equal = count_ranks(block, TARGETS, 5, chunk)
    assert greater.tolist() == [1, 0, 0, 4]
    assert equal.tolist() == [2, 4, 0, 0]
    assert calls == [(0, 5)]


@pytest.mark.parametrize(("room", "second_pass"), [
    (12, [(2, 4)]),  # both first-pass chunks kept (8 + 4 scores): only (2, 4) is scored again
    (11, [(2, 4), (4, 5)]),  # room for the first alone: (4, 5) is scored again
    (0, [(0, 2), (2, 4), (4, 5)]),  # nothing kept: every chunk scored again
])
def test_the_two_pass_count_scores_the_chunks_that_hold_targets_first_and_keeps_them(
        monkeypatch, room, second_pass):
    import seqexp.engine.ranks as ranks

    monkeypatch.setattr(ranks, "KEPT_SCORES", room)
    calls = []

    def block(lo, hi):
        calls.append((lo, hi))
        return SCORES[:, lo:hi].clone()

    # every target in items 0..1 or 4: the first pass scores chunks (0, 2) and (4, 5) only
    targets = torch.tensor([0, 1, 4, 4])
    greater, equal = count_ranks(block, targets, 5, 2)
    assert calls == [(0, 2), (4, 5), *second_pass]
    assert greater.tolist() == [1, 0, 0, 4]
    assert equal.tolist() == [2, 4, 0, 0]


def test_whole_rows_rank_like_the_counts_by_comparison():

    class Hashed(Oracle):  # scores 0..4 from (target, item): many ties, targets anywhere
        def score_items(self, state, lo, hi):
            return ((state[:, None] * 7 + torch.arange(lo, hi) * 3) % 5).float()

    data = _data()
    model = Hashed(6, 4, data.items)
    whole = make_evaluator([1, 3], batch_users=2).rank_counts(model, data, "test")
    scores = model.score_items(torch.from_numpy(whole.targets), 0, 6)
    greater, equal = _counts_by_comparison(scores, torch.from_numpy(whole.targets))
    assert whole.greater.tolist() == greater and whole.equal.tolist() == equal


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
    import seqexp.engine.ranks as evaluation

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
    ev = make_evaluator([1, 3], batch_users=2, max_block_elements=max_block)
    counts = ev.rank_counts(model, data, "test")
    assert len(counts) == 5  # 2 + 1 + 1 + 1 test events
    assert counts.rank_pessimistic().tolist() == [1] * 5
    val = ev.rank_counts(model, data, "val")
    assert len(val) == 2


def test_constant_scores_get_pessimistic_metrics_of_zero():
    data = _data()
    model = Popularity(6, 4)  # unfitted: every count is 0, all items tie
    m = make_evaluator([1, 5]).evaluate(model, data, "test")
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

    make_evaluator([1]).rank_counts(Spy(6, 4, data.items), data, "test")
    assert sorted(seen) == sorted([
        (0, [0, 1, 2], 3), (0, [0, 1, 2, 3], 4), (1, [4, 3], 2), (2, [1], 2), (3, [0, 0, 1], 1),
    ])


def test_ndcg_by_hand_for_all_three_tie_policies():
    counts = RankCounts(np.array([1, 0, 0, 4]), np.array([2, 4, 0, 0]))  # ranks 4, 5, 1, 5
    m = counts.metrics([3, 5])
    assert m["ndcg_at_3"] == pytest.approx(1 / 4)  # only the rank-1 event: 1/log2(2) = 1
    assert m["ndcg_at_5"] == pytest.approx((1 / np.log2(5) + 2 / np.log2(6) + 1) / 4)
    # optimistic ranks 2, 1, 1, 5
    assert m["ndcg_at_3_optimistic"] == pytest.approx((1 / np.log2(3) + 1 + 1) / 4)
    # expected: event 0 uniform on {2,3,4}, event 1 on {1..5}
    e0 = (1 / np.log2(3) + 1 / np.log2(4)) / 3
    e1 = (1 + 1 / np.log2(3) + 1 / np.log2(4)) / 5
    assert m["ndcg_at_3_expected"] == pytest.approx((e0 + e1 + 1) / 4)


def _seen_by_brute_force(scores: torch.Tensor, targets: torch.Tensor, context: list[list[int]]):
    """Greater/equal counts with each point's context items (other than its target) removed."""
    greater, equal = [], []
    for row, target, seen in zip(scores, targets.tolist(), context, strict=True):
        keep = torch.ones(len(row), dtype=torch.bool)
        keep[[i for i in seen if i != target]] = False
        keep[target] = False
        greater.append(int((row[keep] > row[target]).sum()))
        equal.append(int((row[keep] == row[target]).sum()))
    return greater, equal


class Fixed(Recommender):
    """Scores from a fixed table keyed by (user, position of the target)."""

    def __init__(self, n_items, n_users, table):
        super().__init__(n_items, n_users)
        self.table = table

    def prediction_states(self, batch):
        users = batch.users[batch.target_rows]
        return torch.stack([self.table[(int(u), int(c))]
                            for u, c in zip(users, batch.target_cols, strict=True)])

    def score_items(self, state, lo, hi):
        return state[:, lo:hi]


@pytest.mark.parametrize("max_block", [10_000, 7, 3])
def test_exclude_seen_removes_earlier_items_but_keeps_a_seen_target(max_block):
    users = [[0, 1, 2, 1, 3], [4, 3, 2, 3], [1, 2], [0, 0, 1, 1, 5]]
    data = sequences(users, n_items=6, n_val=[1, 0, 0, 1], n_test=[2, 2, 1, 2])
    generator = torch.Generator().manual_seed(1)
    table = {(u, c): torch.randint(0, 3, (6,), generator=generator).float()
             for u, seq in enumerate(users) for c in range(1, len(seq))}
    model = Fixed(6, 4, table)
    counts = make_evaluator([5], batch_users=2, max_block_elements=max_block,
                       exclude_seen=True).rank_counts(model, data, "test")
    order = np.lexsort((counts.positions, counts.users))
    points = list(zip(counts.users[order].tolist(), counts.positions[order].tolist(),
                      strict=True))
    assert points == [(0, 3), (0, 4), (1, 2), (1, 3), (2, 1), (3, 3), (3, 4)]
    scores = torch.stack([table[p] for p in points])
    targets = torch.tensor([users[u][c] for u, c in points])
    context = [users[u][:c] for u, c in points]
    expected = _seen_by_brute_force(scores, targets, context)
    assert (counts.greater[order].tolist(), counts.equal[order].tolist()) == expected
    # user 0's target at position 3 (item 1) was seen at position 1 and stays rankable:
    # only items 0 and 2 leave the catalogue
    assert counts.targets[order].tolist() == [1, 3, 2, 3, 2, 1, 5]
    plain = make_evaluator([5], batch_users=2, max_block_elements=max_block
                      ).rank_counts(model, data, "test")
    assert (plain.greater[order] >= counts.greater[order]).all()
    assert (plain.greater[order] + plain.equal[order]
            > counts.greater[order] + counts.equal[order]).any()


def test_metrics_by_history_quartile_by_hand():
    # users' training events: 1, 2, 3, 4 -> quartile edges 1.75, 2.5, 3.25
    history = np.array([1, 2, 3, 4])
    counts = RankCounts(greater=np.array([0, 1, 0, 5, 0]), equal=np.array([0, 0, 0, 0, 1]),
                        users=np.array([0, 1, 1, 2, 3]))
    m = counts.by_history(history, [2])
    assert m["hist_q1_n_events"] == 1 and m["hist_q1_mrr_at_2"] == 1.0
    assert m["hist_q2_n_events"] == 2 and m["hist_q2_mrr_at_2"] == pytest.approx(0.75)
    assert m["hist_q2_recall_at_2"] == 1.0
    assert m["hist_q3_recall_at_2"] == 0.0
    assert m["hist_q4_mrr_at_2"] == pytest.approx(0.5)
    assert m["hist_q4_ndcg_at_2"] == pytest.approx(1 / np.log2(3))
    assert m["hist_q2_max_train_events"] == 2.5 and m["hist_q4_max_train_events"] == 4
    assert not any(k.endswith(("_optimistic", "_expected")) for k in m)


def test_ranks_parquet_round_trip_sorted_compact_and_complete(tmp_path):
    import pyarrow.parquet as pq

    from seqexp.core.ranks_file import read_ranks
    from seqexp.run.artifacts import write_ranks

    data = _data()
    counts = make_evaluator([1]).rank_counts(Oracle(6, 4, data.items), data, "test")
    path = write_ranks(counts, data, tmp_path / "test_ranks.parquet", {"exclude_seen": False})
    columns, meta = read_ranks(path)
    assert columns["user"].tolist() == [0, 0, 1, 2, 3]
    assert columns["position"].tolist() == [3, 4, 2, 1, 3]
    assert columns["item"].tolist() == [3, 4, 2, 2, 1]
    assert columns["rank_pessimistic"].tolist() == [1] * 5
    assert columns["user_train_events"].tolist() == [2, 2, 2, 1, 2]
    assert meta["n_items"] == 6 and meta["exclude_seen"] is False
    schema = pq.read_schema(path)
    assert {str(schema.field(n).type) for n in schema.names} == {"uint8"}
    assert not list(tmp_path.glob(".test_ranks*"))  # no temporary file left


def test_a_run_logs_its_ranks_ndcg_and_history_quartiles(tmp_path, store_uri):
    from mlflow.tracking import MlflowClient

    from helpers import compose_config, tiny_overrides
    from seqexp.core.ranks_file import read_id_maps, read_ranks
    from seqexp.run.experiment import run_experiment

    cfg = compose_config(["model=itemknn", *tiny_overrides(tmp_path / "data"),
                          f"mlflow.tracking_uri={store_uri}"])
    assert cfg.eval.save_ranks is True and cfg.eval.exclude_seen is False
    result = run_experiment(cfg, launch_dir=tmp_path, output_dir=tmp_path / "run")
    metrics = result.metrics
    columns, meta = read_ranks(tmp_path / "run" / "test_ranks.parquet")
    ranks = columns["rank_pessimistic"]
    assert len(ranks) == metrics["test_n_events"]
    # the file reproduces the logged metrics
    assert metrics["test_mrr_at_20"] == pytest.approx(np.where(ranks <= 20, 1 / ranks, 0).mean())
    assert metrics["test_ndcg_at_10"] == pytest.approx(
        np.where(ranks <= 10, 1 / np.log2(1 + ranks), 0).mean())
    quartile_events = sum(metrics[f"test_hist_q{j}_n_events"] for j in range(1, 5)
                          if f"test_hist_q{j}_n_events" in metrics)
    assert quartile_events == len(ranks)
    assert meta["exclude_seen"] is False and meta["dataset"] == "synthetic"
    artifacts = {a.path for a in MlflowClient(store_uri).list_artifacts(result.run_id)}
    assert {"test_ranks.parquet", "test_ranks_ids.parquet"} <= artifacts
    # the raw ids behind the file's codes (synthetic users and items are their own ids)
    maps = read_id_maps(tmp_path / "run" / "test_ranks_ids.parquet")
    assert len(maps["user"]) == meta["n_users"] and len(maps["item"]) == meta["n_items"]
    assert maps["user"][columns["user"]].dtype.kind == "U"


def test_a_user_on_a_quartile_edge_goes_to_the_lower_quartile():
    # training events 1, 2, 2, 4: edges 1.75, 2, 2.5; both users with 2 are in q2, q3 is empty
    counts = RankCounts(greater=np.array([0, 1, 2, 3]), equal=np.zeros(4, int),
                        users=np.array([0, 1, 2, 3]))
    m = counts.by_history(np.array([1, 2, 2, 4]), [5])
    assert m["hist_q2_n_events"] == 2
    assert m["hist_q2_mrr_at_5"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert "hist_q3_n_events" not in m and m["hist_q4_mrr_at_5"] == pytest.approx(1 / 4)


def test_cpu_score_blocks_hold_64_whole_rows_at_large_catalogues_and_ranks_stay_exact(
        monkeypatch):
    switch_cpu_kernel(monkeypatch, "eval_blocks", True)
    cpu, evaluator = torch.device("cpu"), make_evaluator()
    assert evaluator.block_elements(cpu, 10_677) == 3_000_000  # ML-10M: as before
    assert evaluator.block_elements(cpu, 445_369) == 64 * 445_369  # not 6 points per block
    assert make_evaluator(max_block_elements=1000).block_elements(cpu, 445_369) == 1000
    # the dense counts: whole rows up to 46,875 items, tiles beyond (unless a block is set)
    assert evaluator.block_shape(cpu, 10_677, 10_000) == (280, 10_714)
    assert evaluator.block_shape(cpu, 46_875, 10_000) == (64, 46_875)
    assert evaluator.block_shape(cpu, 46_876, 10_000) == (256, 1024)
    assert make_evaluator(max_block_elements=1000).block_shape(cpu, 445_369, 10_000) == (1, 1000)
    switch_cpu_kernel(monkeypatch, "eval_blocks", False)
    assert evaluator.block_shape(cpu, 445_369, 10_000) == (112, 446_428)  # 50,000,000
    # 60,000 items: whole-row blocks of 64 points; ranks equal a hand count of the scores
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 50, (70, 60_000), generator=generator).float()  # many ties
    targets = torch.randint(0, 60_000, (70,), generator=generator)
    calls = []

    def block(lo: int, hi: int) -> torch.Tensor:
        calls.append((lo, hi))
        return scores[:, lo:hi]
    greater, equal = count_ranks(block, targets, 60_000, 60_000)
    target_scores = scores[torch.arange(70), targets][:, None]
    assert torch.equal(greater.long(), (scores > target_scores).sum(1))
    assert torch.equal(equal.long(), (scores == target_scores).sum(1) - 1)
    assert calls == [(0, 60_000)]  # one product per block: scored once


class Hashed23(Recommender):
    """Scores 0..3 hashed from (user, position, item): ties everywhere, any catalogue split.
    Records each score_items call: its items, the thread and the grad mode it ran in."""

    def __init__(self, n_items: int, n_users: int) -> None:
        super().__init__(n_items, n_users)
        self.calls: list[tuple[int, int, int, bool]] = []

    def prediction_states(self, batch):
        return batch.users[batch.target_rows] * 1000 + batch.target_cols

    def score_items(self, state, lo, hi):
        self.calls.append((lo, hi, threading.get_ident(), torch.is_grad_enabled()))
        return ((state[:, None] * 7 + torch.arange(lo, hi) * 13 + state[:, None] // 1000
                 * torch.arange(lo, hi)) % 4).float()


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_cpu_tiles_rank_like_comparisons_with_ties_exclusions_and_a_partial_last_tile(
        monkeypatch, exclude_seen):
    import seqexp.engine.evaluator as evaluation
    from seqexp.models import cpu_kernels

    # 23 items in tiles of 4 (the last of 3), blocks of 3 points, on 3 worker threads
    switch_cpu_kernel(monkeypatch, "eval_blocks", True)
    monkeypatch.setattr(cpu_kernels, "EVAL_BLOCK_ELEMENTS", 64 * 10)
    monkeypatch.setattr(evaluation, "TILE_POINTS", 3)
    monkeypatch.setattr(evaluation, "TILE_ITEMS", 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    settings = []  # torch.set_num_threads's calls (recorded, not made)
    monkeypatch.setattr(torch, "set_num_threads", settings.append)
    generator = np.random.default_rng(0)
    users = [generator.integers(0, 23, size=n).tolist() for n in (30, 25, 12, 40)]
    data = sequences(users, n_items=23, n_test=[20, 15, 8, 30])
    model = Hashed23(23, 4)
    tiled = make_evaluator([5], batch_users=2, exclude_seen=exclude_seen)
    assert tiled.block_shape(torch.device("cpu"), 23, 100) == (3, 4)
    counts = tiled.rank_counts(model, data, "test")
    assert set((counts.targets // 4).tolist()) == set(range(6))  # a target in every tile
    assert {(lo, hi) for lo, hi, _, _ in model.calls} == {
        (0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 23)}
    main = threading.get_ident()
    assert all(thread != main and not grad for _, _, thread, grad in model.calls)
    assert set(settings) == {1, 3} and settings[-1] == 3  # 1 in the workers, then restored
    state = torch.from_numpy(counts.users * 1000 + counts.positions)
    scores = model.score_items(state, 0, 23)
    context = [users[u][:c] if exclude_seen else []
               for u, c in zip(counts.users.tolist(), counts.positions.tolist(), strict=True)]
    expected = _seen_by_brute_force(scores, torch.from_numpy(counts.targets), context)
    assert (counts.greater.tolist(), counts.equal.tolist()) == expected
    assert len(set(expected[1])) > 3 and min(expected[1]) >= 0  # many ties, of many sizes
    whole = make_evaluator([5], batch_users=2, exclude_seen=exclude_seen,
                      max_block_elements=10_000).rank_counts(model, data, "test")
    assert np.array_equal(whole.greater, counts.greater)
    assert np.array_equal(whole.equal, counts.equal)


class Factored23(Recommender):
    """Scores = queries . item rows + item bias, small exact values with ties everywhere,
    declared through score_factors (the evaluator's product-and-bias path)."""

    def __init__(self, n_items: int, n_users: int) -> None:
        super().__init__(n_items, n_users)
        generator = torch.Generator().manual_seed(3)
        self.items = torch.randint(-1, 2, (n_items, 3), generator=generator).float()
        self.bias = torch.randint(0, 3, (n_items,), generator=generator).float() / 2

    def prediction_states(self, batch):
        return self.queries(batch.users[batch.target_rows] * 1000 + batch.target_cols)

    @staticmethod
    def queries(key: torch.Tensor) -> torch.Tensor:
        return torch.stack([key * 7 % 3, key // 1000 % 2, key % 2], dim=1).float()

    def score_items(self, state, lo, hi):
        return torch.nn.functional.linear(state, self.items[lo:hi], self.bias[lo:hi])

    def score_factors(self, state):
        return state, self.items, self.bias


@pytest.mark.parametrize("exclude_seen", [False, True])
@pytest.mark.parametrize("kernel", [True, False], ids=["dense_counts", "sign_sums"])
def test_a_product_and_bias_rank_like_score_items_in_tiles_and_whole_rows(
        monkeypatch, exclude_seen, kernel):
    import seqexp.engine.evaluator as evaluation
    from seqexp.models import cpu_kernels

    switch_cpu_kernel(monkeypatch, "dense_counts", kernel)
    switch_cpu_kernel(monkeypatch, "eval_blocks", True)
    monkeypatch.setattr(cpu_kernels, "EVAL_BLOCK_ELEMENTS", 64 * 10)
    monkeypatch.setattr(evaluation, "TILE_POINTS", 3)
    monkeypatch.setattr(evaluation, "TILE_ITEMS", 4)
    generator = np.random.default_rng(1)
    users = [generator.integers(0, 23, size=n).tolist() for n in (30, 25, 12, 40)]
    data = sequences(users, n_items=23, n_test=[20, 15, 8, 30])
    model = Factored23(23, 4)
    counts = make_evaluator([5], batch_users=2, exclude_seen=exclude_seen).rank_counts(
        model, data, "test")
    assert set((counts.targets // 4).tolist()) == set(range(6))  # a target in every tile
    scores = model.score_items(
        model.queries(torch.from_numpy(counts.users * 1000 + counts.positions)), 0, 23)
    context = [users[u][:c] if exclude_seen else []
               for u, c in zip(counts.users.tolist(), counts.positions.tolist(), strict=True)]
    expected = _seen_by_brute_force(scores, torch.from_numpy(counts.targets), context)
    assert (counts.greater.tolist(), counts.equal.tolist()) == expected
    assert len(set(expected[1])) > 3  # many ties, of many sizes
    without_bias = _seen_by_brute_force(scores - model.bias, torch.from_numpy(counts.targets),
                                        context)
    assert without_bias != expected  # the bias changes ranks: it must be added
    whole = make_evaluator([5], batch_users=2, exclude_seen=exclude_seen,
                           max_block_elements=10_000).rank_counts(model, data, "test")
    assert np.array_equal(whole.greater, counts.greater)
    assert np.array_equal(whole.equal, counts.equal)


class UserThenPoint23(Factored23):
    """Factored23 with four query columns, the first two the user's alone (as seqmf's user
    factors beside its transitions), said through score_key_columns; small exact values, so
    that every order of summation gives the same scores. Records each product's width."""

    def __init__(self, n_items: int, n_users: int) -> None:
        super().__init__(n_items, n_users)
        generator = torch.Generator().manual_seed(4)
        self.items = torch.randint(-1, 2, (n_items, 4), generator=generator).float()

    def prediction_states(self, batch):
        return self.queries_at(batch.users[batch.target_rows], batch.target_cols)

    def score_key_columns(self, batch):
        return batch.users[batch.target_rows], 2

    @staticmethod
    def queries_at(users: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        point = users * 1000 + positions
        return torch.stack([users % 3, users // 2 % 2, point * 7 % 3, point % 2], dim=1).float()


def _product_widths(monkeypatch) -> list[int]:
    """The query width of every product the evaluator's linear_parts makes, recorded."""
    import seqexp.engine.evaluator as evaluation

    widths: list[int] = []
    made = evaluation.linear_parts

    def recorded(queries, *args, **kwargs):
        widths.append(queries.shape[1])
        return made(queries, *args, **kwargs)
    monkeypatch.setattr(evaluation, "linear_parts", recorded)
    return widths


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_points_of_one_user_are_scored_in_blocks_of_that_user_its_columns_made_once(
        monkeypatch, exclude_seen):
    import seqexp.engine.evaluator as evaluation
    from seqexp.models import cpu_kernels

    switch_cpu_kernel(monkeypatch, "eval_blocks", True)
    switch_cpu_kernel(monkeypatch, "key_rows", True)
    monkeypatch.setattr(cpu_kernels, "EVAL_BLOCK_ELEMENTS", 64 * 10)
    monkeypatch.setattr(evaluation, "TILE_POINTS", 3)
    monkeypatch.setattr(evaluation, "TILE_ITEMS", 4)
    monkeypatch.setattr(evaluation, "KEY_ROW_POINTS", 4)
    generator = np.random.default_rng(5)
    users = [generator.integers(0, 23, size=n).tolist() for n in (30, 25, 12, 40, 28)]
    data = sequences(users, n_items=23, n_test=[20, 15, 8, 30, 17])
    model = UserThenPoint23(23, 5)
    widths = _product_widths(monkeypatch)
    counts = make_evaluator([5], batch_users=2, exclude_seen=exclude_seen).rank_counts(
        model, data, "test")
    assert set(widths) == {2}  # the user's two columns left out of every product
    assert set((counts.targets // 4).tolist()) == set(range(6))  # a target in every tile
    scores = model.score_items(model.queries_at(torch.from_numpy(counts.users),
                                                 torch.from_numpy(counts.positions)), 0, 23)
    context = [users[u][:c] if exclude_seen else []
               for u, c in zip(counts.users.tolist(), counts.positions.tolist(), strict=True)]
    expected = _seen_by_brute_force(scores, torch.from_numpy(counts.targets), context)
    assert (counts.greater.tolist(), counts.equal.tolist()) == expected
    assert len(set(expected[1])) > 3  # many ties, of many sizes
    widths.clear()
    whole = make_evaluator([5], batch_users=2, exclude_seen=exclude_seen,
                           max_block_elements=10_000).rank_counts(model, data, "test")
    assert set(widths) == {4}  # whole rows: one product of every column
    assert np.array_equal(whole.greater, counts.greater)
    assert np.array_equal(whole.equal, counts.equal)


@pytest.mark.parametrize(("kernel", "least_points"), [(False, 4), (True, 9)])
def test_users_are_not_given_blocks_of_their_own_without_the_kernel_or_points_enough(
        monkeypatch, kernel, least_points):
    """The key_rows kernel off, or a batch with fewer points per user than KEY_ROW_POINTS
    (here 8 and 7.5): products of every column, blocks by target tile."""
    import seqexp.engine.evaluator as evaluation
    from seqexp.models import cpu_kernels

    switch_cpu_kernel(monkeypatch, "eval_blocks", True)
    switch_cpu_kernel(monkeypatch, "key_rows", kernel)
    monkeypatch.setattr(cpu_kernels, "EVAL_BLOCK_ELEMENTS", 64 * 10)
    monkeypatch.setattr(evaluation, "KEY_ROW_POINTS", least_points)
    data = sequences([list(range(12)), list(range(3, 20)), list(range(5, 14))], n_items=23,
                     n_test=[8, 8, 7])
    widths = _product_widths(monkeypatch)
    make_evaluator([5], batch_users=2).rank_counts(UserThenPoint23(23, 3), data, "test")
    assert widths and set(widths) == {4}


def test_a_block_plan_sorts_points_by_target_tile_and_with_keys_by_key_first():
    from seqexp.engine.evaluator import block_plan

    keys = torch.tensor([1, 0, 1, 1, 0, 1, 1])
    targets = torch.tensor([9, 2, 1, 5, 7, 0, 6])  # tiles of 4 items: 2 0 0 1 1 0 1
    order, bounds = block_plan(targets, 12, (2, 4))
    assert order.tolist() == [1, 2, 5, 3, 4, 6, 0] and bounds == [0, 2, 4, 6, 7]
    order, bounds = block_plan(targets, 12, (2, 4), keys)
    # key 0: points 1, 4; key 1: 2, 5 (tile 0), 3, 6 (tile 1), 0 (tile 2); no block holds two
    assert order.tolist() == [1, 4, 2, 5, 3, 6, 0] and bounds == [0, 2, 4, 6, 7]
    order, bounds = block_plan(targets, 12, (3, 4), keys)
    assert order.tolist() == [1, 4, 2, 5, 3, 6, 0] and bounds == [0, 2, 5, 7]
    assert block_plan(targets, 12, (8, 12))[0] is None  # one block, whole rows: as they are


def test_taking_points_in_another_order_gathers_rows_but_slices_a_shared_view():
    from seqexp.engine.evaluator import _take_state

    items = torch.arange(12).reshape(3, 4)
    context = torch.arange(10.0).reshape(5, 2)
    state = (context, 7, items[None].expand(5, 3, 4))
    rows = torch.tensor([4, 0, 2])
    taken, count, shared = _take_state(state, rows)
    assert torch.equal(taken, context[rows]) and count == 3
    assert shared.shape == (3, 3, 4) and torch.equal(shared[1], items)
    assert shared.stride(0) == 0  # still a view of the one table, not three copies


class ReplayThreads(Hashed23):
    """Hashed23 that records the intra-op threads its replay (prediction_states) runs on."""

    def __init__(self, n_items: int, n_users: int) -> None:
        super().__init__(n_items, n_users)
        self.replay_threads: list[int] = []

    def prediction_states(self, batch):
        self.replay_threads.append(torch.get_num_threads())
        return super().prediction_states(batch)


@pytest.mark.parametrize(("max_block", "replay_threads"), [(None, 1), (10_000, 2)])
def test_the_replay_runs_on_one_thread_where_the_cpu_counts_in_tiles(
        monkeypatch, max_block, replay_threads):
    from seqexp.models import cpu_kernels

    switch_cpu_kernel(monkeypatch, "eval_blocks", True)
    monkeypatch.setattr(cpu_kernels, "EVAL_BLOCK_ELEMENTS", 64 * 10)  # 23 items: tiles
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = ReplayThreads(23, 4)
        users = [[1, 5, 7, 22, 3, 5], [0, 4, 4, 9], [11, 12, 13], [2, 2, 8, 1, 0]]
        data = sequences(users, n_items=23, n_test=[3, 2, 1, 2])
        evaluator = make_evaluator([5], batch_users=2, max_block_elements=max_block)
        assert evaluator.cpu_tiles(torch.device("cpu"), 23) == (max_block is None)
        evaluator.rank_counts(model, data, "test")
        assert model.replay_threads == [replay_threads, replay_threads]  # two batches
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)


def test_tile_groups_give_the_workers_equal_shares_in_groups_of_at_most_the_group_size():
    from seqexp.engine.evaluator import tile_groups

    sizes = [[len(group) for group in tile_groups(list(range(n)), 8, workers)]
             for n, workers in ((20, 2), (9, 2), (3, 2), (3, 1), (1, 4), (100, 2), (16, 2),
                                (0, 2))]
    assert sizes == [[5, 5, 5, 5], [5, 4], [2, 1], [3], [1], [8, 8] + [7] * 12, [8, 8], []]
    assert sum(tile_groups(list(range(9)), 8, 2), []) == list(range(9))  # in order, each once


class PerUser23(Factored23):
    """Factored23 whose scores depend on the user alone (as mf's), and say so through
    score_row_keys; records the points of each call for scores (or their factors)."""

    def __init__(self, n_items: int, n_users: int) -> None:
        super().__init__(n_items, n_users)
        self.scored_rows: list[int] = []

    def prediction_states(self, batch):
        return self.queries(batch.users[batch.target_rows] * 1001)

    def score_items(self, state, lo, hi):
        self.scored_rows.append(len(state))
        return super().score_items(state, lo, hi)

    def score_factors(self, state):
        self.scored_rows.append(len(state))
        return super().score_factors(state)

    def score_row_keys(self, batch):
        return batch.users[batch.target_rows]


@pytest.mark.parametrize("exclude_seen", [False, True])
@pytest.mark.parametrize("max_block", [10_000, 23, 46])
def test_points_sharing_a_users_row_are_ranked_from_that_row_scored_once(
        exclude_seen, max_block):
    """A batch with many points per user: one row per user is scored (max_block: rows a
    step), and the counts are the brute force's, with and without exclusions."""
    generator = np.random.default_rng(2)
    users = [generator.integers(0, 23, size=n).tolist() for n in (40, 35, 30, 60, 25)]
    data = sequences(users, n_items=23, n_test=[20, 15, 16, 50, 10])
    model = PerUser23(23, 5)
    counts = make_evaluator([5], batch_users=3, exclude_seen=exclude_seen,
                            max_block_elements=max_block).rank_counts(model, data, "test")
    assert sum(model.scored_rows) == 5  # one row per user, not one per point
    assert max(model.scored_rows) == min(3, max_block // 23)
    scores = model.score_items(model.queries(torch.from_numpy(counts.users) * 1001), 0, 23)
    context = [users[u][:c] if exclude_seen else []
               for u, c in zip(counts.users.tolist(), counts.positions.tolist(), strict=True)]
    expected = _seen_by_brute_force(scores, torch.from_numpy(counts.targets), context)
    assert (counts.greater.tolist(), counts.equal.tolist()) == expected
    assert len(set(expected[1])) > 3  # many ties, of many sizes


def test_users_with_fewer_points_than_a_row_is_worth_are_scored_point_by_point():
    import seqexp.engine.evaluator as evaluation

    per_user = evaluation.SHARED_ROW_POINTS - 1
    data = sequences([list(range(per_user + 2))] * 3, n_items=23, n_test=[per_user] * 3)
    model = PerUser23(23, 3)
    make_evaluator([5], max_block_elements=10_000).rank_counts(model, data, "test")
    assert model.scored_rows == [3 * per_user]
    model.scored_rows.clear()
    data = sequences([list(range(per_user + 3))] * 3, n_items=23, n_test=[per_user + 1] * 3)
    make_evaluator([5], max_block_elements=10_000).rank_counts(model, data, "test")
    assert model.scored_rows == [3]
