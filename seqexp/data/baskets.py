"""Baskets: a user's events split where the time gap to the previous event exceeds a threshold.

A basket opens at a user's first event and at every event more than `gap_s` seconds after the
previous one (a gap of exactly `gap_s` stays in the basket). One function, `basket_starts`,
serves flat per-user data (numpy) and padded batches (torch), so that training, prediction
states and the next-basket metrics all cut the same baskets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from seqexp.data.sequences import SequenceData


def basket_starts(timestamps: np.ndarray | torch.Tensor, gap_s: float,
                  sequence_starts: np.ndarray | torch.Tensor | None = None
                  ) -> np.ndarray | torch.Tensor:
    """Boolean array, true where an event opens a basket, along the last axis.

    Each row of `timestamps` is one sequence (its first event opens a basket); for a flat array
    of several users' events, `sequence_starts` marks where each user begins. Padding after a
    row's end (timestamp 0) never opens a basket, since its gap is negative.
    """
    if isinstance(timestamps, torch.Tensor):
        starts = torch.zeros_like(timestamps, dtype=torch.bool)
    else:
        starts = np.zeros(timestamps.shape, dtype=bool)
    starts[..., 1:] = (timestamps[..., 1:] - timestamps[..., :-1]) > gap_s
    if starts.shape[-1]:
        starts[..., 0] = True
    if sequence_starts is not None:
        starts |= sequence_starts
    return starts


@dataclass
class Baskets:
    """Each user's events offsets[u]:end[u] cut into baskets.

    Basket b holds events `events[offsets[b]:offsets[b+1]]` (positions into the SequenceData
    arrays, in time order); user u owns baskets `user_offsets[u]:user_offsets[u+1]`.
    """

    events: np.ndarray  # int64 [E]
    offsets: np.ndarray  # int64 [NB + 1]
    user_offsets: np.ndarray  # int64 [U + 1]

    @property
    def n_baskets(self) -> int:
        return len(self.offsets) - 1

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def split_baskets(data: SequenceData, gap_s: float, end: np.ndarray | None = None) -> Baskets:
    """Baskets of every user's events up to `end[u]` (default: all events; pass
    `data.train_end` for the training part only)."""
    starts = data.offsets[:-1]
    end = data.offsets[1:] if end is None else end
    lengths = end - starts
    events = concat_ranges(starts, lengths)
    user_first = np.zeros(len(events), dtype=bool)
    user_first[(np.cumsum(lengths) - lengths)[lengths > 0]] = True
    opens = basket_starts(data.timestamps[events], gap_s, user_first)
    basket_offsets = np.append(np.flatnonzero(opens), len(events)).astype(np.int64)
    per_user = np.bincount(data.event_users()[events[opens]], minlength=data.n_users)
    user_offsets = np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64)
    return Baskets(events=events, offsets=basket_offsets, user_offsets=user_offsets)


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The integers starts[i] .. starts[i] + lengths[i] - 1, concatenated over i."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    firsts = np.cumsum(lengths) - lengths  # where each range begins in the output
    return np.repeat(np.asarray(starts, dtype=np.int64) - firsts, lengths) + np.arange(total)


def sample_outside(groups: np.ndarray, group_items: np.ndarray, group_offsets: np.ndarray,
                   n_items: int, rng: np.random.Generator) -> np.ndarray:
    """For each entry of `groups`, an item drawn uniformly from the items NOT in that group.

    Group g holds `group_items[group_offsets[g]:group_offsets[g+1]]` (repeats allowed). Drawing
    uniformly and redrawing every hit converges to exactly this distribution; here the draw is
    one step: r uniform on 0..n_items-m-1 (m = distinct items of the group) is mapped to the
    r-th item outside the group, r + #{i : s_i - i <= r} for the group's sorted distinct items
    s_0 < s_1 < ... (s_i - i counts the non-members below s_i). Entries whose group holds every
    item get -1.
    """
    n_groups = len(group_offsets) - 1
    member_group = np.repeat(np.arange(n_groups, dtype=np.int64), np.diff(group_offsets))
    keys = np.unique(member_group * n_items + group_items.astype(np.int64))
    key_group, key_item = keys // n_items, keys % n_items
    distinct = np.bincount(key_group, minlength=n_groups)
    first = np.concatenate([[0], np.cumsum(distinct)[:-1]])
    below = key_item - (np.arange(len(keys)) - first[key_group])  # non-members below s_i
    # Sorted by (group, below): `below` never decreases inside a group and is < n_items + 1.
    adjusted = key_group * (n_items + 1) + below
    groups = np.asarray(groups, dtype=np.int64)
    free = n_items - distinct[groups]
    r = np.floor(rng.random(len(groups)) * np.maximum(free, 1)).astype(np.int64)
    members_below = np.searchsorted(adjusted, groups * (n_items + 1) + r, side="right") - first[
        groups]
    return np.where(free > 0, r + members_below, -1)
