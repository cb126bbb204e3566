"""The processed dataset every model and the evaluator read: per-user, time-ordered sequences."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

PHASES = ("train", "val", "test")


@dataclass
class SequenceData:
    """Events of all users, grouped by user and ordered by (timestamp, row order).

    User u owns events `offsets[u]:offsets[u+1]`, of which `offsets[u]:train_end[u]` are
    training events, `train_end[u]:val_end[u]` validation and `val_end[u]:offsets[u+1]` test
    events. Both splits keep this prefix structure, so a prediction point's context is simply
    every earlier event of its user. Items are 0..n_items-1, the training vocabulary.
    """

    items: np.ndarray  # int32 [E]
    timestamps: np.ndarray  # int64 [E]
    offsets: np.ndarray  # int64 [U+1]
    train_end: np.ndarray  # int64 [U]
    val_end: np.ndarray  # int64 [U]
    n_items: int
    stats: dict[str, int] = field(default_factory=dict)
    # Raw id (as a string) of each user index / item code: what a checkpoint or a ranks file
    # maps back to MovieLens ids or Last.fm names. None for data built without them.
    user_ids: np.ndarray | None = None  # str [U]
    item_ids: np.ndarray | None = None  # str [n_items]

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_events(self) -> int:
        return len(self.items)

    def phase_bounds(self, phase: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-user [start, end) positions of the events that are targets in `phase`."""
        if phase == "train":
            return self.offsets[:-1], self.train_end
        if phase == "val":
            return self.train_end, self.val_end
        if phase == "test":
            return self.val_end, self.offsets[1:]
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")

    def event_users(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_users, dtype=np.int64), np.diff(self.offsets))

    def train_mask(self) -> np.ndarray:
        """Boolean mask of training events (what vocabulary, popularity and similarities see)."""
        positions = np.arange(self.n_events, dtype=np.int64)
        return positions < np.repeat(self.train_end, np.diff(self.offsets))

    def item_popularity(self) -> np.ndarray:
        """Training-event count of every item."""
        return np.bincount(self.items[self.train_mask()], minlength=self.n_items)


def validation_sample(data: SequenceData, max_scores: int | None, seed: int) -> SequenceData:
    """`data` with the validation targets of a fixed sample of users only: users in an order
    drawn with `seed`, as many as keep (validation targets x n_items), the scores a validation
    pass computes, within `max_scores` (one user at least). The others' validation events are
    left out of the validation phase (their train_end moved to val_end): meant for validation
    only, training and test read `data` itself. `data` when all of it fits or max_scores is
    None."""
    first, stop = data.phase_bounds("val")
    targets = np.clip(stop - np.maximum(first, data.offsets[:-1] + 1), 0, None)
    if max_scores is None or int(targets.sum()) * data.n_items <= max_scores:
        return data
    order = np.random.default_rng(seed).permutation(data.n_users)
    scores = np.cumsum(targets[order]) * data.n_items
    kept = max(int(np.searchsorted(scores, max_scores, side="right")),
               int(np.argmax(scores > 0)) + 1)
    left_out = np.ones(data.n_users, dtype=bool)
    left_out[order[:kept]] = False
    train_end = np.where(left_out, data.val_end, data.train_end)
    return replace(data, train_end=train_end, stats={
        **data.stats, "val_events": int((data.val_end - train_end).sum())})


def inconsistencies(data: SequenceData) -> list[str]:
    """What is wrong with a SequenceData's arrays (empty when nothing): shapes, item ids in
    range, offsets starting at 0 and monotone, every user's train/val/test bounds nested inside
    its events, the id arrays' lengths, and the counts in `stats` equal to those of the arrays.
    For data read back from disk, which may be damaged or edited although it parses."""
    problems: list[str] = []
    offsets, items = data.offsets, data.items
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0:
        return [f"offsets must be one-dimensional and start at 0 (shape {offsets.shape})"]
    if np.any(np.diff(offsets) < 0):
        problems.append("offsets decrease")
    if offsets[-1] != len(items) or len(data.timestamps) != len(items):
        problems.append(f"offsets end at {offsets[-1]}, but there are {len(items)} items and "
                        f"{len(data.timestamps)} timestamps")
    n_users = len(offsets) - 1
    for name in ("train_end", "val_end"):
        if getattr(data, name).shape != (n_users,):
            problems.append(f"{name} has shape {getattr(data, name).shape}, not ({n_users},)")
    if problems:
        return problems
    if len(items) and (items.min() < 0 or items.max() >= data.n_items):
        problems.append(f"item ids span [{items.min()}, {items.max()}], outside "
                        f"[0, n_items={data.n_items})")
    if np.any(offsets[:-1] > data.train_end) or np.any(data.train_end > data.val_end) or \
            np.any(data.val_end > offsets[1:]):
        problems.append("a user's train/val/test bounds lie outside its events")
    for name, expected in (("user_ids", n_users), ("item_ids", data.n_items)):
        ids = getattr(data, name)
        if ids is not None and len(ids) != expected:
            problems.append(f"{name} has {len(ids)} entries, not {expected}")
    counts = {"n_users": n_users, "n_items": data.n_items,
              "train_events": int((data.train_end - offsets[:-1]).sum()),
              "val_events": int((data.val_end - data.train_end).sum()),
              "test_events": int((offsets[1:] - data.val_end).sum())}
    problems += [f"stats say {key}={data.stats[key]}, the arrays hold {value}"
                 for key, value in counts.items()
                 if key in data.stats and data.stats[key] != value]
    return problems
