"""Ordering, splits, train-only vocabulary and filters of build_sequences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fixtures_raw as fx
from helpers import preprocess, split_preset
from seqexp.core.errors import SeqexpError
from seqexp.core.schema import SPLIT
from seqexp.data.interactions import Interactions
from seqexp.data.movielens import read_movielens
from seqexp.data.preprocess import (
    TEST,
    TRAIN,
    VAL,
    global_time_split,
    last_session_split,
    order_events,
    user_tail_split,
)
from seqexp.data.sequences import SequenceData


def raw(user, item, timestamp, source: str = "made-up.dat") -> Interactions:
    return Interactions(
        user=np.asarray(user, dtype=np.int64),
        item=np.asarray(item, dtype=np.int64),
        timestamp=np.asarray(timestamp, dtype=np.int64),
        source=source,
    )


def tail(test_frac: float | None = None, val_frac: float | None = None) -> dict:
    """split=user_tail (conf/split/user_tail.yaml) with the fractions given."""
    given = {"test_frac": test_frac, "val_frac": val_frac}
    return split_preset("user_tail", **{k: v for k, v in given.items() if v is not None})


def global_time(test_quantile: float | None = None, val_quantile: float | None = None) -> dict:
    """split=global_time (conf/split/global_time.yaml) with the quantiles given."""
    given = {"test_quantile": test_quantile, "val_quantile": val_quantile}
    return split_preset("global_time", **{k: v for k, v in given.items() if v is not None})


def check_invariants(data: SequenceData) -> None:
    """The SequenceData contract: per-user prefix structure and a train-fitted vocabulary."""
    offsets, train_end, val_end = data.offsets, data.train_end, data.val_end
    assert offsets.dtype == train_end.dtype == val_end.dtype == np.int64
    assert data.items.dtype == np.int32 and data.timestamps.dtype == np.int64
    assert offsets[0] == 0 and offsets[-1] == data.n_events == len(data.timestamps)
    assert len(train_end) == len(val_end) == data.n_users
    starts, ends = offsets[:-1], offsets[1:]
    assert np.all(starts < train_end), "every user keeps a training event"
    assert np.all(train_end <= val_end) and np.all(val_end <= ends)
    if data.n_events:
        assert data.items.min() >= 0 and data.items.max() < data.n_items
    users = data.event_users()
    same_user = users[1:] == users[:-1]
    assert np.all(np.diff(data.timestamps)[same_user] >= 0), "time-ordered within each user"
    train = data.train_mask()
    assert np.array_equal(np.unique(data.items[train]), np.arange(data.n_items)), (
        "the vocabulary is exactly the items of training events"
    )
    assert data.stats["train_events"] == int((train_end - starts).sum())
    assert data.stats["val_events"] == int((val_end - train_end).sum())
    assert data.stats["test_events"] == int((ends - val_end).sum())
    assert data.stats["n_users"] == data.n_users and data.stats["n_items"] == data.n_items


def phases(data: SequenceData) -> np.ndarray:
    """Phase of every event, from the prefix bounds."""
    out = np.full(data.n_events, TEST, dtype=np.int8)
    for u in range(data.n_users):
        out[data.offsets[u]:data.train_end[u]] = TRAIN
        out[data.train_end[u]:data.val_end[u]] = VAL
    return out


# ------------------------------------------------------------------------------ ordering
def test_order_events_sorts_by_user_time_then_row() -> None:
    user = np.array([1, 0, 1, 0, 1, 0])
    ts = np.array([5, 5, 3, 5, 5, 4])
    assert order_events(user, ts).tolist() == [5, 1, 3, 2, 0, 4]


def test_order_events_is_stable_on_long_ties() -> None:
    # Unstable sorts (quicksort) scramble runs of equal keys longer than a few elements.
    user = np.repeat([3, 1, 2], 200)
    ts = np.zeros(600, dtype=np.int64)
    order = order_events(user, ts)
    assert order.tolist() == list(range(200, 400)) + list(range(400, 600)) + list(range(200))


@pytest.mark.parametrize(
    "user_range,time_range",
    [
        ((0, 30), (0, 50)),  # small ranges
        ((0, 30), (-2_000, 2_000)),  # times before the epoch
        ((1, 72_000), (789_000_000, 1_231_000_000)),  # ML-10M-like
        ((0, 2**40), (-(2**40), 2**40)),  # a packed (user, time) key would overflow int64
        ((-5, 2**62), (0, 3)),  # the user range alone nearly fills int64
    ],
)
def test_order_events_matches_a_python_sort(user_range, time_range) -> None:
    rng = np.random.default_rng(5)
    n = 500
    users = rng.integers(*user_range, size=20, endpoint=True)
    times = rng.integers(*time_range, size=60, endpoint=True)
    user = users[rng.integers(0, 20, n)]  # few distinct values: long runs of ties
    ts = times[rng.integers(0, 60, n)]
    expected = sorted(range(n), key=lambda i: (int(user[i]), int(ts[i]), i))
    assert order_events(user, ts).tolist() == expected


def test_build_sequences_orders_by_time_then_row(tmp_path: Path) -> None:
    data = preprocess(read_movielens(fx.write_movielens(tmp_path), "ratings_dat"), tail())
    check_invariants(data)
    expected = [m - 101 for user in sorted(fx.ML_ORDERED) for m in fx.ML_ORDERED[user]]
    assert data.items.tolist() == expected


# ------------------------------------------------------------------------------ user_tail
@pytest.mark.parametrize(
    "length,test_frac,val_frac,expected",
    [
        # The spec: test = floor(test_frac * L), val = floor(val_frac * (L - test)).
        (10, 0.2, 0.1, (8, 0, 2)),  # val: floor(0.1 * 8) = 0
        (20, 0.2, 0.1, (15, 1, 4)),
        (50, 0.2, 0.1, (36, 4, 10)),
        (3, 0.2, 0.1, (3, 0, 0)),  # short users keep everything in train
        (5, 0.2, 0.1, (4, 0, 1)),
        (10, 0.2, 0.5, (4, 4, 2)),
        (100, 0.29, 0.1, (64, 7, 29)),  # 0.29 * 100 is 28.999999999999996 in floating point
        (1, 0.5, 0.5, (1, 0, 0)),
        (2, 0.5, 0.5, (1, 0, 1)),
        (7, 0.5, 0.0, (4, 0, 3)),
    ],
)
def test_user_tail_split_counts(length, test_frac, val_frac, expected) -> None:
    phase = user_tail_split(np.array([length]), test_frac, val_frac)
    n_train, n_val, n_test = expected
    assert phase.tolist() == [TRAIN] * n_train + [VAL] * n_val + [TEST] * n_test


def test_user_tail_through_build_sequences() -> None:
    lengths = [10, 3, 20]
    user = np.repeat([0, 1, 2], lengths)
    item = np.concatenate([np.arange(n) % 3 for n in lengths])  # items 0, 1, 2 all trained
    ts = np.concatenate([np.arange(n) * 10 for n in lengths])
    data = preprocess(raw(user, item, ts), tail(0.2, 0.1))
    check_invariants(data)
    # 10 -> 8/0/2, 3 -> 3/0/0, 20 -> 15/1/4
    assert data.offsets.tolist() == [0, 10, 13, 33]
    assert data.train_end.tolist() == [8, 13, 28]
    assert data.val_end.tolist() == [8, 13, 29]
    assert (data.stats["train_events"], data.stats["val_events"],
            data.stats["test_events"]) == (26, 1, 6)
    assert data.items.tolist() == item.tolist()


def test_user_tail_follows_time_not_row_order() -> None:
    # Rows listed newest-first: the test event is each user's latest, not its last row.
    data = preprocess(
        raw([0] * 5 + [1] * 5, [4, 3, 2, 1, 0, 0, 1, 2, 3, 4], [50, 40, 30, 20, 10] * 2),
        tail(0.2, 0.0),
    )
    assert data.timestamps.tolist() == [10, 20, 30, 40, 50] * 2
    assert data.train_end.tolist() == [4, 9]
    assert data.items.tolist() == [0, 1, 2, 3, 4, 4, 3, 2, 1, 0]


@pytest.mark.parametrize("key", ["test_frac", "val_frac"])
@pytest.mark.parametrize("value", [0, 1, -0.1, 1.5, "abc", None, float("nan"), True])
def test_user_tail_invalid_fractions_are_refused_by_the_schema(key: str, value) -> None:
    """The split reads checked values: the schema's rule is the one check."""
    if key == "val_frac" and value == 0:  # validation may be empty: 0 is allowed
        return
    with pytest.raises(SeqexpError, match=rf"split\.{key}="):
        SPLIT["user_tail"][key].rule.complain(f"split.{key}", value, {})


def test_val_frac_zero_is_allowed() -> None:
    data = preprocess(raw([0] * 10, np.arange(10) % 2, np.arange(10)), tail(0.2, 0.0))
    assert data.train_end.tolist() == data.val_end.tolist() == [8]


# ------------------------------------------------------------------------------ global_time
def test_global_time_split_cuts() -> None:
    ts = np.arange(10, 101, 10)  # 10..100
    # test cut = 0.8-quantile (lower) = 80 -> test 90, 100; val cut over 10..80 = 70 -> val 80
    phase = global_time_split(ts, 0.8, 0.9)
    assert phase.tolist() == [TRAIN] * 7 + [VAL] + [TEST] * 2


def test_global_time_ties_at_the_cut_stay_together() -> None:
    ts = np.array([10, 20, 30, 40, 50, 60, 70, 80, 80, 90])
    phase = global_time_split(ts, 0.8, 0.9)  # cut 80: both 80s precede every test event
    assert phase.tolist() == [TRAIN] * 9 + [TEST]


def test_global_time_through_build_sequences() -> None:
    user = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    ts = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    item = [0, 1, 2, 0, 0, 2, 1, 1, 1, 2]
    data = preprocess(raw(user, item, ts), global_time(0.8, 0.9))
    check_invariants(data)
    # user 0: 10 30 50 70 | 90 ; user 1: 20 40 60 | 80 | 100
    assert data.offsets.tolist() == [0, 5, 10]
    assert data.train_end.tolist() == [4, 8]
    assert data.val_end.tolist() == [4, 9]
    assert data.timestamps.tolist() == [10, 30, 50, 70, 90, 20, 40, 60, 80, 100]
    phase = phases(data)
    test_ts = data.timestamps[phase == TEST]
    assert data.timestamps[phase != TEST].max() < test_ts.min()
    assert np.all(data.timestamps[phase == VAL] > 70)  # the validation cut
    assert np.all(data.timestamps[phase == TRAIN] <= 70)


def test_global_time_no_leakage_on_random_data() -> None:
    rng = np.random.default_rng(3)
    n = 400
    user = rng.integers(0, 12, n)
    ts = rng.integers(0, 60, n)  # many ties
    item = rng.integers(0, 8, n)
    data = preprocess(raw(user, item, ts), global_time(0.7, 0.8))
    check_invariants(data)
    phase = phases(data)
    assert data.timestamps[phase != TEST].max() < data.timestamps[phase == TEST].min()
    assert data.timestamps[phase == TRAIN].max() < data.timestamps[phase == VAL].min()
    test_cut = np.quantile(ts, 0.7, method="lower")
    assert data.timestamps[phase == TEST].min() > test_cut


def test_global_time_user_without_training_events_is_dropped() -> None:
    # sorted times 1..8, 11, 12: test cut 8 -> test 11 (user 0) and 12 (user 1, its only event)
    user = [0] * 9 + [1]
    ts = [1, 2, 3, 4, 5, 6, 7, 8, 11, 12]
    item = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    data = preprocess(raw(user, item, ts), global_time(0.8, 0.9))
    check_invariants(data)
    assert data.n_users == 1
    assert data.stats["cold_user_events_dropped"] == 1
    assert data.offsets.tolist() == [0, 9]
    assert data.train_end.tolist() == [7]
    assert data.val_end.tolist() == [8]  # val cut over 1..8 is 7 -> val = 8


@pytest.mark.parametrize("key", ["test_quantile", "val_quantile"])
@pytest.mark.parametrize("value", [0, 1, -0.1, "abc", None])
def test_global_time_invalid_quantiles_are_refused_by_the_schema(key: str, value) -> None:
    with pytest.raises(SeqexpError, match=rf"split\.{key}="):
        SPLIT["global_time"][key].rule.complain(f"split.{key}", value, {})


# ------------------------------------------------------------------------------ vocabulary
def test_item_only_in_test_is_dropped_and_counted() -> None:
    user = [0] * 5 + [1] * 5
    item = [0, 1, 0, 1, 7, 1, 0, 1, 0, 1]  # item 7 only in user 0's test event
    data = preprocess(raw(user, item, list(range(5)) * 2), tail(0.2, 0.0))
    check_invariants(data)
    assert data.stats["test_oov_dropped"] == 1
    assert data.stats["val_oov_dropped"] == 0
    assert data.n_items == 2
    assert data.offsets.tolist() == [0, 4, 9]
    assert data.train_end.tolist() == [4, 8]
    assert data.items.tolist() == [0, 1, 0, 1, 1, 0, 1, 0, 1]


def test_item_only_in_validation_is_dropped_and_counted() -> None:
    # 10 events, test 0.2, val 0.5 -> 4 train / 4 val / 2 test
    item = [0, 1, 0, 1, 5, 6, 0, 5, 1, 0]
    data = preprocess(raw([0] * 10, item, range(10)), tail(0.2, 0.5))
    check_invariants(data)
    assert data.stats["val_oov_dropped"] == 3
    assert data.stats["test_oov_dropped"] == 0
    assert data.items.tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert data.train_end.tolist() == [4]
    assert data.val_end.tolist() == [5]


@pytest.mark.parametrize(
    "min_support,stats,offsets,train_end,items",
    [
        # train support: item 0 -> 3, item 1 -> 2, item 2 -> 1 (its 3 test events do not count)
        (1, (0, 0), [0, 6, 12], [3, 9], [0, 0, 1, 2, 2, 2, 0, 1, 2, 0, 1, 0]),
        (2, (1, 3), [0, 3, 8], [3, 5], [0, 0, 1, 0, 1, 0, 1, 0]),
        (3, (3, 4), [0, 2, 5], [2, 3], [0, 0, 0, 0, 0]),
    ],
)
def test_min_item_support_counts_training_events_only(
    min_support, stats, offsets, train_end, items
) -> None:
    user = [0] * 6 + [1] * 6
    item = [0, 0, 1, 2, 2, 2, 0, 1, 2, 0, 1, 0]
    data = preprocess(raw(user, item, list(range(6)) * 2), tail(0.5, 0.0),
                           min_item_support=min_support)
    check_invariants(data)
    assert (data.stats["train_events_filtered"], data.stats["test_oov_dropped"]) == stats
    assert data.offsets.tolist() == offsets
    assert data.train_end.tolist() == train_end
    assert data.items.tolist() == items


def test_user_left_without_training_events_is_dropped() -> None:
    # user 2 trains only on item 9 (support 1 < 2): its known test event goes with it.
    user = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    item = [0, 1, 0, 1, 1, 0, 1, 0, 9, 0]
    data = preprocess(raw(user, item, [1, 2, 3, 4] * 2 + [1, 2]), tail(0.5, 0.0),
                           min_item_support=2)
    check_invariants(data)
    assert data.stats["train_events_filtered"] == 1
    assert data.stats["cold_user_events_dropped"] == 1
    assert data.n_users == 2
    assert data.offsets.tolist() == [0, 4, 8]


# ------------------------------------------------------------------------------ repeats
def test_drop_repeats_removes_immediate_repeats_only() -> None:
    # user 0 in time order: 5 5 6 5 5 7 7; user 1: 7 7 8 (its first 7 follows user 0's 7s).
    rows = [  # (user, item, ts), listed out of time order
        (0, 5, 4), (1, 7, 1), (0, 5, 1), (0, 7, 6), (0, 6, 3), (1, 8, 3),
        (0, 5, 2), (0, 5, 5), (1, 7, 2), (0, 7, 7),
    ]
    user, item, ts = (list(col) for col in zip(*rows, strict=True))
    data = preprocess(raw(user, item, ts), tail(0.25, 0.0), drop_repeats=True)
    check_invariants(data)
    assert data.stats["repeats_dropped"] == 4
    # user 0: 5 6 5 | 7 ; user 1: 7 8 (floor(0.5) = 0 test). Vocabulary 5 6 7 8 -> 0 1 2 3.
    assert data.items.tolist() == [0, 1, 0, 2, 2, 3]
    assert data.timestamps.tolist() == [1, 3, 4, 6, 1, 3]
    assert data.offsets.tolist() == [0, 4, 6]
    assert data.train_end.tolist() == [3, 6]

    kept = preprocess(raw(user, item, ts), tail(0.25, 0.0), drop_repeats=False)
    assert "repeats_dropped" not in kept.stats
    assert kept.n_events == 10
    assert kept.items[:7].tolist() == [0, 0, 1, 0, 0, 2, 2]


# ------------------------------------------------------------------------------ errors
def test_nothing_left_after_filtering_is_an_error(tmp_path: Path) -> None:
    path = fx.write_movielens(tmp_path)
    with pytest.raises(SeqexpError, match=r"dataset\.min_item_support=100") as info:
        preprocess(read_movielens(path, "ratings_dat"), tail(), min_item_support=100)
    assert str(path) in str(info.value)


def test_no_test_events_is_an_error() -> None:
    # every user has 3 events: floor(0.2 * 3) = 0 test events
    with pytest.raises(SeqexpError, match=r"split\.test_frac") as info:
        preprocess(raw([0, 0, 0, 1, 1, 1], [0, 1, 2] * 2, [1, 2, 3] * 2, "x.dat"), tail())
    assert "x.dat" in str(info.value)


def test_no_interactions_is_an_error() -> None:
    with pytest.raises(SeqexpError, match="empty.dat"):
        preprocess(raw([], [], [], "empty.dat"), tail())


# ------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("split", [tail(0.2, 0.1), tail(0.3, 0.3), global_time(0.75, 0.8)])
@pytest.mark.parametrize("min_support,drop_repeats", [(1, False), (3, True)])
def test_invariants_on_random_data(split, min_support, drop_repeats) -> None:
    rng = np.random.default_rng(11)
    n = 600
    user = rng.integers(0, 25, n) * 7 + 3  # sparse raw user ids
    item = rng.zipf(1.6, n) % 40
    ts = rng.integers(1_000, 1_200, n)
    data = preprocess(raw(user, item, ts), split, min_item_support=min_support,
                           drop_repeats=drop_repeats)
    check_invariants(data)
    if drop_repeats:
        # Reference: sort by (user, time, row) in Python and count immediate repeats.
        rows = sorted(zip(user.tolist(), ts.tolist(), range(n), item.tolist(), strict=True))
        repeats = sum(a[0] == b[0] and a[3] == b[3] for a, b in zip(rows, rows[1:], strict=False))
        assert data.stats["repeats_dropped"] == repeats > 0
    if min_support > 1:
        train = data.train_mask()
        assert np.bincount(data.items[train], minlength=data.n_items).min() >= min_support


def test_raw_ids_follow_users_and_items_through_filtering_and_the_ranks_id_file(tmp_path):
    from seqexp.core.ranks_file import read_id_maps
    from seqexp.data.interactions import Interactions
    from seqexp.run.artifacts import write_id_maps

    # codes 0..3 label users "u-a".."u-d" (u-c has no event) and items "x".."z"; item "z" is
    # seen in training once only and falls under min_item_support
    raw = Interactions(
        user=np.array([3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 1]),
        item=np.array([0, 1, 0, 1, 2, 1, 0, 1, 0, 1, 0]),
        timestamp=np.arange(11), source="t",
        user_labels=np.array(["u-a", "u-b", "u-c", "u-d"]),
        item_labels=np.array(["x", "y", "z"]),
    )
    data = preprocess(raw, {"name": "user_tail", "test_frac": 0.2, "val_frac": 0.0},
                           min_item_support=2)
    assert data.user_ids.tolist() == ["u-a", "u-b", "u-d"]
    assert data.item_ids.tolist() == ["x", "y"]
    # user index 2 is u-d's sequence: x y x y (z dropped)
    assert data.items[data.offsets[2]:data.offsets[3]].tolist() == [0, 1, 0, 1]
    maps = read_id_maps(write_id_maps(data, tmp_path / "ids.parquet"))
    assert maps["user"].tolist() == ["u-a", "u-b", "u-d"] and maps["item"].tolist() == ["x", "y"]


def test_codes_that_are_raw_ids_keep_them(tmp_path):
    from seqexp.data.interactions import Interactions

    raw = Interactions(user=np.array([7, 7, 7, 7, 7]), item=np.array([31, 5, 31, 5, 31]),
                       timestamp=np.arange(5), source="t")
    data = preprocess(raw, {"name": "user_tail", "test_frac": 0.2, "val_frac": 0.0})
    assert data.user_ids.tolist() == ["7"] and data.item_ids.tolist() == ["5", "31"]


# ------------------------------------------------------------------------------ last_session
def last_session(gap_s: float = 100) -> dict:
    return {"name": "last_session", "session_gap_s": gap_s}


# Gap 100 s. user 0: 0 10 20 | 200 210 | 400 | 600 605 (4 sessions); user 1: 0 50 | 300 310
# (2 sessions); user 2: 0 90 180 270 (gaps of 90: 1 session); user 3: 0 100 | 201 (a gap of
# exactly 100 does not split, 101 does: 2 sessions).
SESSION_TS = [[0, 10, 20, 200, 210, 400, 600, 605], [0, 50, 300, 310], [0, 90, 180, 270],
              [0, 100, 201]]


def test_last_session_split_by_hand() -> None:
    lengths = np.array([len(t) for t in SESSION_TS])
    phase = last_session_split(lengths, np.concatenate(SESSION_TS), 100)
    T, V, X = TRAIN, VAL, TEST
    assert phase.tolist() == ([T, T, T, T, T, V, X, X] + [T, T, X, X] + [T, T, T, T]
                              + [T, T, X])


def test_last_session_through_build_sequences() -> None:
    user = np.repeat(np.arange(4), [len(t) for t in SESSION_TS])
    ts = np.concatenate(SESSION_TS)
    # item 9 occurs only in user 0's test session: unseen in training, dropped and counted
    item = [1, 2, 3, 1, 2, 3, 1, 9] + [2, 3, 1, 2] + [1, 2, 3, 1] + [3, 2, 1]
    data = preprocess(raw(user, item, ts), last_session(100))
    check_invariants(data)
    assert data.offsets.tolist() == [0, 7, 11, 15, 18]
    assert (data.train_end - data.offsets[:-1]).tolist() == [5, 2, 4, 2]
    assert (data.val_end - data.train_end).tolist() == [1, 0, 0, 0]
    assert (data.offsets[1:] - data.val_end).tolist() == [1, 2, 0, 1]
    assert data.stats["test_oov_dropped"] == 1 and data.stats["test_events"] == 4
    # a gap long enough to join every session: one session each, no test event
    with pytest.raises(SeqexpError, match="last_session split leaves no test events; lower "
                       "split.session_gap_s"):
        preprocess(raw(user, item, ts), last_session(1000))
