"""DREAM (Yu et al., SIGIR 2016): a recurrent model over a user's baskets.

A basket is a run of a user's events without a gap above `basket_gap_s` (seqexp.data.baskets).
Its vector b_t pools the item vectors n_i of its events (max or mean, nn.EmbeddingBag), the
recurrence is h_t = f(X b_t + R h_{t-1} + c), and the scores of all items are o_t = N^T h_t with
the same item matrix N as the input. Training: BPR over the events of basket t+1 scored with
h_t, one uniformly sampled negative per event, never an item of that basket; L2 weight decay is
the trainer's `train.weight_decay` (Adam's coupled L2, the gradient of (λ/2)·||θ||²).

The initial state h_0 is learned and predicts a user's first basket, so that prediction points
in a first basket get a non-constant (popularity-like) ranking instead of the all-zero scores
of h_0 = 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqexp.data.baskets import (
    Baskets,
    basket_starts,
    check_gap,
    concat_ranges,
    sample_outside,
    split_baskets,
)
from seqexp.data.batching import PredictionBatch
from seqexp.data.sequences import SequenceData
from seqexp.models.base import Recommender

POOLINGS = ("max", "mean")
CELLS = ("rnn", "gru")


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
    """Training rows plus one BPR pair per event of every predicted basket. `pair_states` is
    the flat index row * n_steps + step of the state that predicts the pair, -1 for h_0."""

    sequences: BasketSequences
    pair_states: torch.Tensor  # [P]
    positives: torch.Tensor  # [P]
    negatives: torch.Tensor  # [P]
    n_events: int


class DREAM(Recommender):
    def __init__(
        self,
        n_items: int,
        n_users: int,
        hidden_size: int = 50,
        pooling: str = "max",
        cell: str = "rnn",
        basket_gap_s: float = 1800.0,
        max_baskets: int | None = 64,
        init_std: float = 0.1,
    ) -> None:
        super().__init__(n_items, n_users)
        self.basket_gap_s = check_gap(basket_gap_s, "model.basket_gap_s")
        self.hidden_size = hidden_size
        self.cell_name = cell
        self.max_baskets = max_baskets
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

    def basket_states(self, sequences: BasketSequences) -> torch.Tensor:
        """h_t after every step of every row, [n_rows, n_steps, hidden]. Steps after a row's
        last basket run on zero inputs; their states are never read."""
        pooled = self.basket_vectors(sequences.items, sequences.bag_offsets)
        inputs = pooled.new_zeros(sequences.n_rows, sequences.n_steps, self.hidden_size)
        inputs[sequences.basket_rows, sequences.basket_steps] = pooled
        g0 = torch.tanh(self.initial).expand(1, sequences.n_rows, -1).contiguous()
        g, _ = self.recurrent(inputs, g0)
        return self._to_state(g)

    def _states_with_initial(self, sequences: BasketSequences) -> torch.Tensor:
        """All states as [n_rows * n_steps + 1, hidden], h_0 last, so index -1 picks h_0."""
        initial = self.initial_state()[None]
        if sequences.n_steps == 0:
            return initial
        states = self.basket_states(sequences).reshape(-1, self.hidden_size)
        return torch.cat([states, initial])

    def training_batches(
        self, train: SequenceData, batch_size: int, rng: np.random.Generator
    ) -> Iterator[BasketBatch]:
        """Rows of training baskets in random order, `batch_size` rows per batch.

        A row is a user's whole training basket sequence, or, for a user with more than
        `max_baskets` baskets, a window of `max_baskets` consecutive baskets; windows overlap
        by one basket, which is input only in the later window, so every basket is predicted
        exactly once. Each row starts from h_0 (states are not carried across windows); a
        user's first basket is predicted from h_0.
        """
        baskets = split_baskets(train, self.basket_gap_s, train.train_end)
        counts = np.diff(baskets.user_offsets)
        stride = None if self.max_baskets is None else self.max_baskets - 1
        if stride is None:
            windows = (counts > 0).astype(np.int64)
        else:
            windows = np.where(counts > 0, np.maximum(1, -(-(counts - 1) // stride)), 0)
        row_user = np.repeat(np.arange(train.n_users), windows)
        row_window = concat_ranges(np.zeros(len(windows), np.int64), windows)
        row_first = baskets.user_offsets[row_user] + row_window * (stride or 0)
        row_stop = baskets.user_offsets[row_user + 1]
        if self.max_baskets is not None:
            row_stop = np.minimum(row_stop, row_first + self.max_baskets)
        order = rng.permutation(len(row_user))
        for begin in range(0, len(order), batch_size):
            rows = order[begin:begin + batch_size]
            yield self._basket_batch(train, baskets, row_first[rows], row_stop[rows],
                                     row_window[rows] == 0, rng)

    def _basket_batch(self, train: SequenceData, baskets: Baskets, first: np.ndarray,
                      stop: np.ndarray, predict_first: np.ndarray,
                      rng: np.random.Generator) -> BasketBatch:
        per_row = stop - first
        n_steps = int(per_row.max())
        basket_ids = concat_ranges(first, per_row)
        basket_rows = np.repeat(np.arange(len(first)), per_row)
        basket_steps = basket_ids - np.repeat(first, per_row)
        sizes = baskets.sizes()[basket_ids]
        events = baskets.events[concat_ranges(baskets.offsets[basket_ids], sizes)]
        items = train.items[events].astype(np.int64)
        bag_bounds = np.concatenate([[0], np.cumsum(sizes)])
        # A basket is predicted by the state before it: step - 1 of its row, or h_0 (-1) for
        # a user's first basket; the first basket of a later window is input only.
        predicted = (basket_steps > 0) | predict_first[basket_rows]
        state = np.where(basket_steps > 0, basket_rows * n_steps + basket_steps - 1, -1)
        event_basket = np.repeat(np.arange(len(basket_ids)), sizes)
        pairs = np.flatnonzero(predicted[event_basket])
        negatives = sample_outside(event_basket[pairs], items, bag_bounds, self.n_items, rng)
        pairs, negatives = pairs[negatives >= 0], negatives[negatives >= 0]
        sequences = BasketSequences(
            items=torch.from_numpy(items), bag_offsets=torch.from_numpy(bag_bounds[:-1]),
            basket_rows=torch.from_numpy(basket_rows), basket_steps=torch.from_numpy(basket_steps),
            n_rows=len(first), n_steps=n_steps,
        )
        return BasketBatch(
            sequences=sequences, pair_states=torch.from_numpy(state[event_basket[pairs]]),
            positives=torch.from_numpy(items[pairs]), negatives=torch.from_numpy(negatives),
            n_events=len(pairs),
        )

    def training_loss(self, batch: BasketBatch) -> torch.Tensor:
        """BPR: mean over pairs of -log σ(o_pos - o_neg), both scored with the same h_t."""
        device = self.device
        states = self._states_with_initial(batch.sequences.to(device))
        h = states[batch.pair_states.to(device)]
        n_pos = self.item_matrix[batch.positives.to(device)]
        n_neg = self.item_matrix[batch.negatives.to(device)]
        return -F.logsigmoid(((n_pos - n_neg) * h).sum(1)).mean()

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
