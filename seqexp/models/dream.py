"""DREAM (Yu et al., SIGIR 2016): a recurrent model over a user's baskets.

A basket is a run of a user's events without a gap above `basket_gap_s` (seqexp.data.baskets).
Its vector b_t pools the item vectors n_i of its events (max or mean, nn.EmbeddingBag), the
recurrence is h_t = f(X b_t + R h_{t-1} + c), and the scores of all items are o_t = N^T h_t with
the same item matrix N as the input. Training: BPR over the events of basket t+1 scored with
h_t, one uniformly sampled negative per event, never an item of that basket, plus DREAM's L2
regulariser (λ/2)·(||X||² + ||R||² + ||N||²) with λ = `l2` (`DREAM.l2_penalty`).

Training and evaluation run the same recurrence: evaluation replays a user's whole history from
h_0, and training cuts a long history into windows of `max_baskets` baskets that are run in the
user's order, each starting from the (detached) state at the end of the previous one, as the
truncated BPTT of the recurrent models does; so the state that predicts a basket in evaluation
is one that training produced and trained on.

The initial state h_0 is learned and predicts a user's first basket, so that prediction points
in a first basket get a non-constant (popularity-like) ranking instead of the all-zero scores
of h_0 = 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqexp.core.schema import Key, choice, integer, number
from seqexp.data.baskets import (
    Baskets,
    basket_starts,
    concat_ranges,
    sample_outside,
    split_baskets,
)
from seqexp.data.batching import LaneStates, PredictionBatch
from seqexp.data.sequences import SequenceData
from seqexp.models.base import Recommender


@dataclass
class BasketSequences:
    """Rows of baskets, flattened for nn.EmbeddingBag: basket j holds
    `items[bag_offsets[j]:bag_offsets[j+1]]` and is step `basket_steps[j]` of row
    `basket_rows[j]`; the rows are run as a padded [n_rows, n_steps] recurrence."""

    items: torch.Tensor  # [E]
    bag_offsets: torch.Tensor  # [NB]
    basket_rows: torch.Tensor  # [NB]
    basket_steps: torch.Tensor  # [NB]
    n_rows: int
    n_steps: int

    def to(self, device: torch.device) -> BasketSequences:
        return BasketSequences(self.items.to(device), self.bag_offsets.to(device),
                               self.basket_rows.to(device), self.basket_steps.to(device),
                               self.n_rows, self.n_steps)


@dataclass
class BasketBatch:
    """Training windows (one per lane, a window is a row) plus one BPR pair per event of every
    basket. `pair_states` is the flat index of the state that predicts the pair: row * n_steps +
    step for the state after step `step` of its row, n_rows * n_steps + row for the state the
    row enters with (its first basket's predictor)."""

    sequences: BasketSequences
    pair_states: torch.Tensor  # [P]
    positives: torch.Tensor  # [P]
    negatives: torch.Tensor  # [P]
    n_events: int
    users: torch.Tensor  # [R] the user of each row
    lanes: torch.Tensor  # [R] the lane of each row, whose carried state a later window enters with
    fresh: torch.Tensor  # [R] bool: the row starts its user's history (enters with h_0)
    last_steps: torch.Tensor  # [R] step of each row's last basket (its state is carried on)
    # the states each lane carries from window to window, shared by the batches of one epoch
    # (None: a batch made on its own, every row enters with h_0 or its lane's zero state)
    carry: LaneStates | None = None


class DREAM(Recommender):
    config_keys = {
        "hidden_size": Key(integer(1), "size of the item vectors and the hidden state"),
        "pooling": Key(choice("max", "mean"), "pooling of a basket's item vectors"),
        "cell": Key(choice("rnn", "gru"), "the recurrence"),
        "basket_gap_s": Key(number(0.0), "a gap above this many seconds starts a new basket"),
        "max_baskets": Key(integer(2, nullable=True), "baskets per training row (null = whole "
                           "histories)"),
        "init_std": Key(number(0.0, low_open=True), "std of the item vectors' initialisation"),
        "l2": Key(number(0.0), "L2 penalty (λ/2)·(‖X‖² + ‖R‖² + ‖N‖²) added to each batch's "
                  "BPR loss, on DREAM's own parameters"),
    }

    def __init__(
        self,
        n_items: int,
        n_users: int,
        *,
        hidden_size: int,
        pooling: str,
        cell: str,
        basket_gap_s: float,
        max_baskets: int | None,
        init_std: float,
        l2: float,
    ) -> None:
        super().__init__(n_items, n_users)
        self.basket_gap_s = float(basket_gap_s)  # checked by the schema (model.basket_gap_s)
        self.hidden_size = hidden_size
        self.cell_name = cell
        self.max_baskets = max_baskets
        self.l2 = l2
        # N: the input vectors n_i of the basket items and, transposed, the output layer.
        self.item_vectors = nn.EmbeddingBag(n_items, hidden_size, mode=pooling)
        nn.init.normal_(self.item_vectors.weight, std=init_std)
        # cell=rnn runs PyTorch's fused tanh RNN in the coordinates g = 2h - 1, in which it is
        # exactly the sigmoid recurrence (see `sigmoid_rnn_parameters`).
        rnn_class = nn.RNN if cell == "rnn" else nn.GRU
        self.recurrent = rnn_class(hidden_size, hidden_size, batch_first=True)
        # PyTorch's default input weights suit unit-scale inputs; basket vectors start at the
        # scale init_std, so the input weights are scaled up to match. Without it the input
        # term is ~0.1 of the recurrent one and training stalls at popularity for ~10 epochs.
        with torch.no_grad():
            self.recurrent.weight_ih_l0.div_(init_std)
        self.initial = nn.Parameter(torch.zeros(hidden_size))  # h_0 before the squashing

    @property
    def item_matrix(self) -> torch.Tensor:
        """N as [n_items, hidden]: row i is n_i."""
        return self.item_vectors.weight

    def sigmoid_rnn_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(X, R, c) of h_t = σ(X b_t + R h_{t-1} + c) for cell=rnn.

        σ(a) = (1 + tanh(a/2)) / 2, so with g = 2h - 1 the fused recurrence
        g_t = tanh(W_ih b_t + W_hh g_{t-1} + b_ih + b_hh) is h_t = σ(2 W_ih b_t + 4 W_hh h_{t-1}
        + 2 (b_ih + b_hh - W_hh 1)).
        """
        rnn = self.recurrent
        w_hh = rnn.weight_hh_l0
        bias = rnn.bias_ih_l0 + rnn.bias_hh_l0 - w_hh.sum(1)
        return 2 * rnn.weight_ih_l0, 4 * w_hh, 2 * bias

    def _to_state(self, g: torch.Tensor) -> torch.Tensor:
        return (1 + g) / 2 if self.cell_name == "rnn" else g

    def initial_state(self) -> torch.Tensor:
        """h_0: in (0, 1) like every sigmoid state for cell=rnn, in (-1, 1) for gru."""
        return self._to_state(torch.tanh(self.initial))

    def basket_vectors(self, items: torch.Tensor, bag_offsets: torch.Tensor) -> torch.Tensor:
        """b for each basket: the max (or mean) of its items' vectors n_i, per dimension."""
        return self.item_vectors(items, bag_offsets)

    def l2_penalty(self) -> torch.Tensor:
        """(λ/2)·(||X||² + ||R||² + ||N||²): DREAM's regulariser on its own parameters, not on the
        fused kernel's (X = 2 W_ih and R = 4 W_hh for cell=rnn, so decaying W_ih and W_hh
        would put λ/4 on X, λ/16 on R and pull the bias towards -2 W_hh 1). For cell=gru, X
        and R are the GRU's input and recurrent weights. The biases and h_0, which the paper
        does not have, are not penalised."""
        if self.cell_name == "rnn":
            inputs, recurrent, _ = self.sigmoid_rnn_parameters()
        else:
            inputs, recurrent = self.recurrent.weight_ih_l0, self.recurrent.weight_hh_l0
        squares = (inputs.square().sum() + recurrent.square().sum()
                   + self.item_matrix.square().sum())
        return self.l2 / 2 * squares

    def _recurrence(self, sequences: BasketSequences, entering: torch.Tensor) -> torch.Tensor:
        """The recurrent module's hidden state after every step of every row, [n_rows, n_steps,
        hidden], from `entering` [n_rows, hidden] (its coordinates: g = 2h - 1 for cell=rnn).
        Steps after a row's last basket run on zero inputs; their states are never read."""
        pooled = self.basket_vectors(sequences.items, sequences.bag_offsets)
        inputs = pooled.new_zeros(sequences.n_rows, sequences.n_steps, self.hidden_size)
        inputs[sequences.basket_rows, sequences.basket_steps] = pooled
        g, _ = self.recurrent(inputs, entering[None].contiguous())
        return g

    def basket_states(self, sequences: BasketSequences) -> torch.Tensor:
        """h_t after every step of every row, each row from h_0, [n_rows, n_steps, hidden]."""
        g0 = torch.tanh(self.initial).expand(sequences.n_rows, -1)
        return self._to_state(self._recurrence(sequences, g0))

    def _states_with_initial(self, sequences: BasketSequences) -> torch.Tensor:
        """All states as [n_rows * n_steps + 1, hidden], h_0 last, so index -1 picks h_0."""
        initial = self.initial_state()[None]
        if sequences.n_steps == 0:
            return initial
        states = self.basket_states(sequences).reshape(-1, self.hidden_size)
        return torch.cat([states, initial])

    def training_state(self, batch: BasketBatch | None = None) -> dict[str, torch.Tensor]:
        if batch is None or batch.carry is None:
            return {}
        return {"carry": batch.carry.states.clone()}

    def load_training_state(self, state: dict[str, torch.Tensor],
                            batch: BasketBatch | None = None) -> None:
        if batch is not None and batch.carry is not None and "carry" in state:
            batch.carry.states.copy_(state["carry"])

    def training_batches(
        self, train: SequenceData, batch_size: int, rng: np.random.Generator
    ) -> Iterator[BasketBatch]:
        """One epoch of training windows, users in random order, `batch_size` lanes per batch.

        A window is up to `max_baskets` consecutive training baskets of one user (all of them
        for null); windows do not overlap, so every basket is predicted once. Each lane runs
        one user's windows in order, one window per batch, and takes the next user when its
        user is done; a user's first window enters with h_0 (which predicts the first basket),
        every later one with the detached state at the end of the user's previous window,
        which is the state the whole-history replay of the evaluation reaches there.
        """
        baskets = split_baskets(train, self.basket_gap_s, train.train_end)
        counts = np.diff(baskets.user_offsets)
        users = rng.permutation(np.flatnonzero(counts > 0))
        if len(users) == 0:
            return
        window = int(counts.max()) if self.max_baskets is None else self.max_baskets
        n_lanes = min(batch_size, len(users))
        # Per lane, the recurrent module's hidden state (g for cell=rnn) at the end of the
        # lane's last window, detached: a user's next window starts from it.
        carry = LaneStates(self.initial.detach().new_zeros(n_lanes, self.hidden_size))
        lane_user = users[:n_lanes].copy()
        lane_next = baskets.user_offsets[lane_user]  # the next basket of each lane
        lane_stop = baskets.user_offsets[lane_user + 1]
        fresh = np.ones(n_lanes, dtype=bool)
        active = np.ones(n_lanes, dtype=bool)
        queued = n_lanes
        while True:
            lanes = np.flatnonzero(active)
            if len(lanes) == 0:
                return
            first = lane_next[lanes]
            stop = np.minimum(lane_stop[lanes], first + window)
            yield replace(self._basket_batch(train, baskets, lanes, lane_user[lanes], first,
                                             stop, fresh[lanes].copy(), rng), carry=carry)
            fresh[lanes] = False
            lane_next[lanes] = stop
            done = lanes[stop >= lane_stop[lanes]]
            refill = done[:len(users) - queued]
            taken = users[queued:queued + len(refill)]
            queued += len(refill)
            lane_user[refill] = taken
            lane_next[refill] = baskets.user_offsets[taken]
            lane_stop[refill] = baskets.user_offsets[taken + 1]
            fresh[refill] = True
            active[done[len(refill):]] = False

    def _basket_batch(self, train: SequenceData, baskets: Baskets, lanes: np.ndarray,
                      users: np.ndarray, first: np.ndarray, stop: np.ndarray, fresh: np.ndarray,
                      rng: np.random.Generator) -> BasketBatch:
        per_row = stop - first
        n_rows, n_steps = len(first), int(per_row.max())
        basket_ids = concat_ranges(first, per_row)
        basket_rows = np.repeat(np.arange(n_rows), per_row)
        basket_steps = basket_ids - np.repeat(first, per_row)
        sizes = baskets.sizes()[basket_ids]
        events = baskets.events[concat_ranges(baskets.offsets[basket_ids], sizes)]
        items = train.items[events].astype(np.int64)
        bag_bounds = np.concatenate([[0], np.cumsum(sizes)])
        # A basket is predicted by the state before it: step - 1 of its row, or the state the
        # row enters with (h_0 or the carried state) for the row's first basket.
        state = np.where(basket_steps > 0, basket_rows * n_steps + basket_steps - 1,
                         n_rows * n_steps + basket_rows)
        event_basket = np.repeat(np.arange(len(basket_ids)), sizes)
        negatives = sample_outside(event_basket, items, bag_bounds, self.n_items, rng)
        pairs = np.flatnonzero(negatives >= 0)
        sequences = BasketSequences(
            items=torch.from_numpy(items), bag_offsets=torch.from_numpy(bag_bounds[:-1]),
            basket_rows=torch.from_numpy(basket_rows), basket_steps=torch.from_numpy(basket_steps),
            n_rows=n_rows, n_steps=n_steps,
        )
        return BasketBatch(
            sequences=sequences, pair_states=torch.from_numpy(state[event_basket[pairs]]),
            positives=torch.from_numpy(items[pairs]),
            negatives=torch.from_numpy(negatives[pairs]), n_events=len(pairs),
            users=torch.from_numpy(users), lanes=torch.from_numpy(lanes),
            fresh=torch.from_numpy(fresh),
            last_steps=torch.from_numpy(per_row - 1),
        )

    def _window_recurrence(self, batch: BasketBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(entering [n_rows, hidden], after every step [n_rows, n_steps, hidden]) of a
        training batch, in the recurrent module's coordinates."""
        device = self.device
        fresh = batch.fresh.to(device)
        initial = torch.tanh(self.initial).expand(len(fresh), -1)
        if batch.carry is None:  # a batch made on its own: nothing carried
            entering = initial
        else:
            carried = batch.carry.states[batch.lanes.to(device)]
            entering = torch.where(fresh[:, None], initial, carried)
        return entering, self._recurrence(batch.sequences.to(device), entering)

    def window_states(self, batch: BasketBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(h each row enters with [n_rows, hidden], h after every step [n_rows, n_steps,
        hidden]) of a training batch, with the carried states as they are now."""
        entering, states = self._window_recurrence(batch)
        return self._to_state(entering), self._to_state(states)

    def training_loss(self, batch: BasketBatch) -> torch.Tensor:
        """BPR: mean over pairs of -log σ(o_pos - o_neg), both scored with the same h_t, plus
        the L2 penalty; the state at each row's end is carried (detached) to its lane."""
        device = self.device
        entering, states = self._window_recurrence(batch)
        rows = torch.arange(len(entering), device=device)
        ends = states[rows, batch.last_steps.to(device)]
        if batch.carry is not None:
            # in the carry's dtype: under train.amp the recurrence may run in bfloat16
            batch.carry.leave(batch.lanes.to(device), ends.to(batch.carry.states.dtype))
        every_state = torch.cat([self._to_state(states).reshape(-1, self.hidden_size),
                                 self._to_state(entering)])
        h = every_state[batch.pair_states.to(device)]
        n_pos = self.item_matrix[batch.positives.to(device)]
        n_neg = self.item_matrix[batch.negatives.to(device)]
        loss = -F.logsigmoid(((n_pos - n_neg) * h).sum(1)).mean()
        return loss + self.l2_penalty() if self.l2 else loss

    def prediction_states(self, batch: PredictionBatch) -> torch.Tensor:
        """For each target, h after the last basket that ends before the target's basket
        (targets of one basket share it); h_0 in a user's first basket. Only the baskets
        before each row's last target basket are pooled and run."""
        items, lengths = batch.items, batch.lengths
        cols = torch.arange(items.shape[1], device=items.device)
        valid = cols < lengths[:, None]
        starts = basket_starts(batch.timestamps, self.basket_gap_s)
        step = starts.cumsum(1) - 1
        target_step = step[batch.target_rows, batch.target_cols]
        needed = torch.zeros(len(lengths), dtype=torch.long, device=items.device)
        needed.scatter_reduce_(0, batch.target_rows, target_step, reduce="amax")
        keep = valid & (step < needed[:, None])
        opens = keep & starts
        rows, open_cols = opens.nonzero(as_tuple=True)
        sequences = BasketSequences(
            items=items[keep], bag_offsets=opens[keep].nonzero().squeeze(1),
            basket_rows=rows, basket_steps=step[rows, open_cols],
            n_rows=len(lengths), n_steps=int(needed.max()) if len(needed) else 0,
        )
        states = self._states_with_initial(sequences)
        flat = torch.where(target_step > 0,
                           batch.target_rows * sequences.n_steps + target_step - 1, -1)
        return states[flat]

    def score_items(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return state @ self.item_matrix[lo:hi].T

    def score_factors(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return state, self.item_matrix, None
