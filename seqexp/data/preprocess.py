"""Raw interactions -> ordered, split, train-vocabulary-encoded sequences (all vectorised)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from seqexp.core.errors import SeqexpError
from seqexp.data.interactions import Interactions, raw_ids
from seqexp.data.sequences import SequenceData

log = logging.getLogger(__name__)

TRAIN, VAL, TEST = 0, 1, 2
# Bumped whenever the output of build_sequences changes, so stale caches are not reused.
PREPROCESS_VERSION = 2  # 2: raw user and item ids kept


def order_events(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Permutation sorting events by (user, timestamp, row order); lexsort is stable."""
    key = _sort_key(user, timestamp)
    if key is None:
        return np.lexsort((timestamp, user))
    # One stable sort of (user - min) * span + (timestamp - min) is the same permutation as
    # the two-key lexsort, in about half the time.
    return np.argsort(key, kind="stable")


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _sort_key(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray | None:
    """Both integer columns packed into one int64 key ordered like (user, timestamp), or None
    when they are not integers or their ranges do not fit in one int64."""
    if (len(user) == 0 or not np.issubdtype(user.dtype, np.integer)
            or not np.issubdtype(timestamp.dtype, np.integer)):
        return None
    u_min, u_max = int(user.min()), int(user.max())
    t_min, t_max = int(timestamp.min()), int(timestamp.max())
    span = t_max - t_min + 1
    bounds = (u_min, u_max, t_min, t_max, -t_min, (u_max - u_min) * span - t_min,
              (u_max - u_min) * span + span - 1)
    if not all(_INT64_MIN <= b <= _INT64_MAX for b in bounds):
        return None
    key = user.astype(np.int64)
    key -= u_min
    key *= span
    key -= t_min
    key += timestamp
    return key


def user_tail_split(lengths: np.ndarray, test_frac: float, val_frac: float) -> np.ndarray:
    """Phase per event for events grouped by user, `lengths` being each user's event count:
    the last floor(test_frac * L) events of a user are test, the last floor(val_frac * rest) of
    the rest validation. Each user's phases are three consecutive runs."""
    n_test = np.floor(lengths * test_frac + 1e-9).astype(np.int64)
    rest = lengths - n_test
    n_val = np.floor(rest * val_frac + 1e-9).astype(np.int64)
    counts = np.stack([rest - n_val, n_val, n_test], axis=1)
    codes = np.array([TRAIN, VAL, TEST], dtype=np.int8)
    return np.repeat(np.tile(codes, len(counts)), counts.ravel())


def global_time_split(
    timestamp: np.ndarray, test_quantile: float, val_quantile: float
) -> np.ndarray:
    """Phase per event from two global time cuts: test is strictly after the test cut, so no
    training or validation event is later than any test event."""
    test_cut = np.quantile(timestamp, test_quantile, method="lower")
    phase = np.full(len(timestamp), TRAIN, dtype=np.int8)
    phase[timestamp > test_cut] = TEST
    rest = timestamp[timestamp <= test_cut]
    val_cut = np.quantile(rest, val_quantile, method="lower")
    phase[(timestamp > val_cut) & (timestamp <= test_cut)] = VAL
    return phase


@dataclass
class _Events:
    """The events being prepared, in (user, timestamp) order: parallel arrays."""

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    phase: np.ndarray | None = None

    def subset(self, keep: np.ndarray) -> _Events:
        return _Events(self.user[keep], self.item[keep], self.ts[keep],
                       None if self.phase is None else self.phase[keep])


def last_session_split(lengths: np.ndarray, timestamp: np.ndarray, gap_s: float) -> np.ndarray:
    """Phase per event for events grouped by user and time-ordered, `lengths` being each user's
    event count: a gap above `gap_s` seconds between two events of a user starts a session; a
    user's last session is test, the one before it validation. A user with two sessions has no
    validation events, one with a single session only training events."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    opens = np.empty(len(timestamp), dtype=bool)
    opens[1:] = (timestamp[1:] - timestamp[:-1]) > gap_s
    opens[starts] = True
    session = np.cumsum(opens) - 1  # global session index of each event
    n_sessions = np.add.reduceat(opens, starts, dtype=np.int64)
    event_user = np.repeat(np.arange(len(lengths)), lengths)
    from_end = (np.cumsum(n_sessions) - 1)[event_user] - session  # 0: the user's last session
    several = n_sessions[event_user]
    phase = np.full(len(timestamp), TRAIN, dtype=np.int8)
    phase[(from_end == 0) & (several >= 2)] = TEST
    phase[(from_end == 1) & (several >= 3)] = VAL
    return phase


def _split_phases(split: Mapping, user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """The phase of every event, ordered by (user, time), under the split `split` names."""
    # the values are checked by the schema (split.*) with the rest of the config
    name = split["name"]
    if name == "user_tail":
        return user_tail_split(_run_starts(user)[1], float(split["test_frac"]),
                               float(split["val_frac"]))
    if name == "last_session":
        return last_session_split(_run_starts(user)[1], ts, float(split["session_gap_s"]))
    return global_time_split(ts, float(split["test_quantile"]), float(split["val_quantile"]))


def build_sequences(
    raw: Interactions,
    split: Mapping,
    *,
    min_item_support: int,
    drop_repeats: bool,
    name: str = "dataset",
) -> SequenceData:
    """Order, split, filter on training counts, encode and group by user. `split`: the config's
    split.* block; `min_item_support`, `drop_repeats`: the dataset.* keys (conf/ holds their
    defaults); `name` only names the data in the log."""
    split_name = split.get("name")
    if len(raw) == 0:
        raise SeqexpError(f"{raw.source}: no interactions to work with")
    stats: dict[str, int] = {"raw_events": len(raw), "raw_malformed_lines": raw.skipped_lines}
    events = _ordered(raw, drop_repeats, stats)
    events.phase = _split_phases(split, events.user, events.ts)
    events, vocabulary = _filtered(events, min_item_support, stats)
    if len(events.user) == 0 or not (events.phase == TRAIN).any():
        raise SeqexpError(
            f"{raw.source}: no training events left after filtering (dataset.min_item_support="
            f"{min_item_support}, split={split_name}); lower the filter or check the file"
        )
    data = _grouped(events, vocabulary, raw, stats)
    if stats["test_events"] == 0:
        knob = {"user_tail": "raise split.test_frac",
                "last_session": "lower split.session_gap_s"}.get(
                    split_name, "lower split.test_quantile")
        raise SeqexpError(f"{raw.source}: the {split_name} split leaves no test events; "
                          f"{knob} or use a larger file")
    log.info("%s: %d users, %d items, %d/%d/%d train/val/test events (%d test events of unseen "
             "items dropped)", name, data.n_users, data.n_items, stats["train_events"],
             stats["val_events"], stats["test_events"], stats["test_oov_dropped"])
    return data


def _ordered(raw: Interactions, drop_repeats: bool, stats: dict[str, int]) -> _Events:
    """The events in (user, timestamp) order, immediate repeats dropped if asked."""
    order = order_events(raw.user, raw.timestamp)
    events = _Events(raw.user[order], raw.item[order], raw.timestamp[order])
    del order
    if drop_repeats:
        user, item = events.user, events.item
        repeat = np.zeros(len(user), dtype=bool)
        repeat[1:] = (user[1:] == user[:-1]) & (item[1:] == item[:-1])
        events = events.subset(~repeat)
        stats["repeats_dropped"] = int(repeat.sum())
    return events


def _filtered(events: _Events, min_item_support: int, stats: dict[str, int]
              ) -> tuple[_Events, np.ndarray]:
    """(the events of known items and warm users, the vocabulary): the vocabulary is what
    training events keep after the support filter; users without a training event cannot be
    warm-started or embedded, so their events are dropped and counted."""
    item, phase = events.item, events.phase
    is_train = phase == TRAIN
    support = np.bincount(item[is_train], minlength=int(item.max()) + 1)
    known = support[item] >= max(1, int(min_item_support))
    stats["train_events_filtered"] = int((is_train & ~known).sum())
    stats["val_oov_dropped"] = int(((phase == VAL) & ~known).sum())
    stats["test_oov_dropped"] = int(((phase == TEST) & ~known).sum())
    if not known.all():
        events = events.subset(known)
    del is_train, known
    user = events.user
    has_train = np.zeros(int(user.max()) + 1 if len(user) else 0, dtype=bool)
    has_train[user[events.phase == TRAIN]] = True
    cold = ~has_train[user]
    stats["cold_user_events_dropped"] = int(cold.sum())
    if cold.any():
        events = events.subset(~cold)
    # The training items left are exactly those whose support passed the filter (dropping cold
    # users removed no training event), so the support count gives the vocabulary.
    return events, np.flatnonzero(support >= max(1, int(min_item_support)))


def _grouped(events: _Events, vocabulary: np.ndarray, raw: Interactions,
             stats: dict[str, int]) -> SequenceData:
    """The events encoded (items by vocabulary position) and grouped by user."""
    user, item, ts, phase = events.user, events.item, events.ts, events.phase
    item_code = np.full(int(item.max()) + 1, -1, dtype=np.int32)
    item_code[vocabulary] = np.arange(len(vocabulary))
    starts, lengths = _run_starts(user)
    n_phase = [np.add.reduceat(phase == p, starts, dtype=np.int64) for p in (TRAIN, VAL)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = SequenceData(
        items=item_code[item],
        timestamps=ts.astype(np.int64, copy=False),  # ts is build_sequences' own copy
        offsets=offsets,
        train_end=offsets[:-1] + n_phase[0],
        val_end=offsets[:-1] + n_phase[0] + n_phase[1],
        n_items=len(vocabulary),
        user_ids=raw_ids(user[starts], raw.user_labels),
        item_ids=raw_ids(vocabulary, raw.item_labels),
    )
    stats.update(
        n_users=data.n_users,
        n_items=data.n_items,
        train_events=int(n_phase[0].sum()),
        val_events=int(n_phase[1].sum()),
        test_events=int((phase == TEST).sum()),
    )
    data.stats = stats
    return data


def _run_starts(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal values in a sorted array."""
    change = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    starts = np.concatenate([[0], change]).astype(np.int64)
    lengths = np.diff(np.concatenate([starts, [len(sorted_keys)]]))
    return starts, lengths
