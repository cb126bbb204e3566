"""Batches for training and evaluation, built with array indexing (no loop over users or events).

- `window_batches`: truncated-BPTT windows for recurrent models. `lanes` parallel lanes each work
  through one user's training sequence, one window of `window` (input, next-item) pairs per step;
  a lane that finishes its user takes the next user of the epoch's permutation and is flagged for
  a state reset, so a hidden state is carried across a user's windows and never across users.
  With a session gap, each pair also says whether its target starts a new session.
- `prediction_batches`: users grouped by sequence length, each user's events up to the end of an
  evaluation phase padded into a matrix, plus the positions of that phase's targets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from seqexp.data.sequences import SequenceData

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to `device`; to a GPU through pinned memory without blocking, so the
    host keeps queueing work instead of waiting for the GPU to drain at every batch."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class LaneStates:
    """The state each training lane carries from one window into its next: one buffer per
    epoch's batch iterator, referenced by each batch it yields, so the carry travels with the
    batches (two epochs' iterators never share one) instead of living on the model. A model
    reads a batch's entering states with `entering` and writes the leaving ones with `leave`."""

    def __init__(self, states: torch.Tensor) -> None:
        self.states = states  # [lanes, ...]

    def entering(self, lanes: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The states lanes `lanes` carry in, zero where `keep` [B, 1] is false (a user start)."""
        return self.states[lanes] * keep

    def leave(self, lanes: torch.Tensor, states: torch.Tensor) -> None:
        """Store the states at the end of the window of lanes `lanes` (detached)."""
        self.states[lanes] = states.detach()


@dataclass
class WindowBatch:
    lanes: np.ndarray  # [B] lane of each row (rows are the lanes still active)
    users: torch.Tensor  # [B]
    inputs: torch.Tensor  # [B, T] item at each step (0 where masked)
    targets: torch.Tensor  # [B, T] next item
    mask: torch.Tensor  # [B, T] bool, true where the pair exists
    reset: torch.Tensor  # [B] bool, true where the row's user starts in this window
    n_events: int  # number of (input, target) pairs = true entries of mask
    # [n_events] positions of the pairs in the flattened [B * T] window, row-major; computed
    # here on the CPU so that a model on a GPU gathers its outputs without a device sync
    pairs: torch.Tensor
    # the states carried between the windows of each lane (None: every window starts from 0)
    carry: LaneStates | None = None
    # [B, T] bool, true where the target comes more than the session gap after the input (it
    # starts a new session); None when the batches were made without a session gap
    session_break: torch.Tensor | None = None


def session_breaks(before: ArrayT, after: ArrayT, gap_s: float) -> ArrayT:
    """True where the event at time `after` starts a new session after the one at `before`:
    the gap between them exceeds `gap_s` seconds (events in the same second never split)."""
    return (after - before) > gap_s


def window_batches(
    data: SequenceData, lanes: int, window: int, rng: np.random.Generator,
    session_gap_s: float | None = None, carry: LaneStates | None = None,
) -> Iterator[WindowBatch]:
    """One epoch of training windows in a random user order, each batch referencing `carry`;
    with `session_gap_s`, each batch carries `session_break` (see WindowBatch)."""
    starts = data.offsets[:-1]
    stops = data.train_end - 1  # the last training event is a target only
    users = rng.permutation(np.flatnonzero(stops > starts))
    if len(users) == 0:
        return
    n_lanes = min(lanes, len(users))
    lane_user = users[:n_lanes].copy()
    lane_pos = starts[lane_user].copy()
    lane_stop = stops[lane_user].copy()
    reset = np.ones(n_lanes, dtype=bool)
    active = np.ones(n_lanes, dtype=bool)
    queued = n_lanes
    steps = np.arange(window)
    while True:
        rows = np.flatnonzero(active)
        if len(rows) == 0:
            return
        pos = lane_pos[rows, None] + steps
        mask = pos < lane_stop[rows, None]
        safe = np.where(mask, pos, 0)
        breaks = None
        if session_gap_s is not None:
            breaks = torch.from_numpy(mask & session_breaks(
                data.timestamps[safe], data.timestamps[safe + 1], session_gap_s))
        yield WindowBatch(
            lanes=rows,
            users=torch.from_numpy(lane_user[rows]),
            inputs=torch.from_numpy(np.where(mask, data.items[safe], 0).astype(np.int64)),
            targets=torch.from_numpy(np.where(mask, data.items[safe + 1], 0).astype(np.int64)),
            mask=torch.from_numpy(mask),
            reset=torch.from_numpy(reset[rows].copy()),
            n_events=int(mask.sum()),
            pairs=torch.from_numpy(np.flatnonzero(mask)),
            session_break=breaks,
            carry=carry,
        )
        reset[rows] = False
        lane_pos[rows] += window
        done = rows[lane_pos[rows] >= lane_stop[rows]]
        refill = done[: len(users) - queued]
        fresh = users[queued : queued + len(refill)]
        queued += len(refill)
        lane_user[refill] = fresh
        lane_pos[refill] = starts[fresh]
        lane_stop[refill] = stops[fresh]
        reset[refill] = True
        active[done[len(refill) :]] = False


@dataclass
class PredictionBatch:
    """Users' event sequences (padded) and the positions whose item is to be predicted.

    The context of the target at (row r, column c) is `items[r, :c]`; `targets` lists the
    target positions in row-major order, and every model returns its scores in that order.
    """

    users: torch.Tensor  # [B]
    items: torch.Tensor  # [B, T] (0 beyond a row's length)
    timestamps: torch.Tensor  # [B, T]
    lengths: torch.Tensor  # [B]
    target_rows: torch.Tensor  # [P]
    target_cols: torch.Tensor  # [P], >= 1
    targets: torch.Tensor  # [P] true next items

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device) -> PredictionBatch:
        return PredictionBatch(**{k: v.to(device) for k, v in vars(self).items()})


def prediction_batches(
    data: SequenceData, phase: str, batch_users: int, max_cells: int = 4_000_000
) -> Iterator[PredictionBatch]:
    """Batches covering every target of `phase` ("val" or "test") exactly once.

    A user's sequence runs up to the end of the phase (later events are never shown). Users are
    sorted by length so that padding stays small; a batch also stops growing once its padded
    matrix would exceed `max_cells` entries.
    """
    first_target, stop = data.phase_bounds(phase)
    starts = data.offsets[:-1]
    # The first event of a user has no context and is never a target.
    first_target = np.maximum(first_target, starts + 1)
    users = np.flatnonzero(stop > first_target)
    lengths = (stop - starts)[users]
    order = np.argsort(lengths, kind="stable")
    users, lengths = users[order], lengths[order]
    begin = 0
    while begin < len(users):
        # Lengths ascend, so a batch's width is its last user's length and its padded size
        # (count x width) grows with every user added.
        widths = lengths[begin : begin + batch_users]
        cells = widths * np.arange(1, len(widths) + 1)
        size = max(1, int(np.searchsorted(cells, max_cells, side="right")))
        batch = users[begin : begin + size]
        begin += size
        yield _prediction_batch(data, batch, starts[batch], first_target[batch], stop[batch])


def _prediction_batch(data: SequenceData, users: np.ndarray, start: np.ndarray,
                      first_target: np.ndarray, stop: np.ndarray) -> PredictionBatch:
    length = stop - start
    width = int(length.max())
    cols = np.arange(width)
    pos = start[:, None] + cols
    valid = cols < length[:, None]
    safe = np.where(valid, pos, 0)
    is_target = valid & (pos >= first_target[:, None])
    rows, tcols = np.nonzero(is_target)
    items = np.where(valid, data.items[safe], 0).astype(np.int64)
    return PredictionBatch(
        users=torch.from_numpy(users.astype(np.int64)),
        items=torch.from_numpy(items),
        timestamps=torch.from_numpy(np.where(valid, data.timestamps[safe], 0)),
        lengths=torch.from_numpy(length.astype(np.int64)),
        target_rows=torch.from_numpy(rows.astype(np.int64)),
        target_cols=torch.from_numpy(tcols.astype(np.int64)),
        targets=torch.from_numpy(items[rows, tcols]),
    )
