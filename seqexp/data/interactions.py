"""The raw-interaction table every reader returns, before ordering, splitting and encoding."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Interactions:
    """Implicit interactions in a canonical row order.

    `user` and `item` are non-negative integer codes, `timestamp` is seconds since the epoch.
    `user_labels[code]` / `item_labels[code]` are the raw ids (MovieLens ids, Last.fm names)
    behind the codes; None where the codes are the raw ids themselves. Row order is the
    tie-break for equal timestamps, so readers put rows in the order the events happened
    wherever the file says more than its timestamps do.
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    source: str
    skipped_lines: int = 0
    notes: dict[str, int] = field(default_factory=dict)
    user_labels: np.ndarray | None = None
    item_labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.user)
        if len(self.item) != n or len(self.timestamp) != n:
            raise ValueError("user, item and timestamp must have the same length")

    def __len__(self) -> int:
        return len(self.user)


def raw_ids(codes: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """The raw ids behind codes, as strings (one type for every format)."""
    values = codes if labels is None else np.asarray(labels)[codes]
    return np.asarray(values).astype(str)


def dense_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Integer ids as small non-negative codes, so that bincount can count them: (codes,
    labels) with labels[code] the id, or (the ids, None) where they are such codes already.
    Ids are labels, never indices: negative or huge ones are re-encoded (order-preserving)."""
    values = np.asarray(values, dtype=np.int64)
    if len(values) and values.min() >= 0 and values.max() <= 4 * len(values) + 1_000_000:
        return values, None
    labels, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64), labels
