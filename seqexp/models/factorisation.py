"""Factorisation baselines trained with BPR: `mf` (user x item) and `seqmf` (FPMC-style: user x
item plus transitions from the last items).

Both score as one inner product of a context vector and an item vector, so one class serves
both: with a transition window of w last items,

    score(u, i) = p_u . q_i  +  mean_{j in last w items} l_j . q'_i  (+ b_i)

which is `mf` for w = 0 (score = p_u . q_i + b_i) and `seqmf` for w = 2 (the mean is
the 1/2 sum). A prediction point with fewer than w earlier events averages over the items it
has: with a single earlier event the transition term is l_{i1} . q'_i. This is FPMC's 1/|B|
normalisation (the mean over the previous basket), so the transition term has the same scale
whatever the history length.

Training: BPR (Rendle et al., 2009), one sampled negative per training event per epoch. An
epoch is one pass over the training events in random order (for w >= 1, the events with at
least one earlier training event, which are the ones that have a transition); negatives are
drawn uniformly from all items other than the positive. Items the user has seen elsewhere can be
drawn as negatives, as in the usual vectorised BPR samplers; with thousands of items the share
is small. Sampling runs in torch on the model's device, seeded from the trainer's generator.

`seen_bias=True`, a variant that is not the paper's equation (off by default; the presets
`mf_seen` and `seqmf_seen`), adds one learned scalar β to the score of every item already in
the user's history before the prediction point: score + β·[i seen before]. The evaluation
protocol keeps seen items rankable, and the factor term scores a user's own training items
highest (they are its BPR positives), so without β they fill the top of the list: on
MovieLens, where nobody rates a movie twice, that holds plain MF at popularity's Recall@20
(docs/real-data.md). β is trained by the same BPR pairs (whether the positive and the
negative were seen before the positive's position): it turns negative where items do not
repeat and positive where they do (listening logs), so it is learned, not a filter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqexp.core.errors import SeqexpError
from seqexp.core.schema import Key, flag, integer, number
from seqexp.data.batching import PredictionBatch
from seqexp.data.sequences import SequenceData
from seqexp.models.base import Recommender


@dataclass
class BPRBatch:
    users: torch.Tensor  # [B]
    positions: torch.Tensor  # [B] global event position of the positive
    context: torch.Tensor  # [B, w] last items before the positive, most recent first (0: none)
    context_mask: torch.Tensor  # [B, w] bool, true where the item exists
    positives: torch.Tensor  # [B]
    negatives: torch.Tensor  # [B]
    n_events: int
    # [B] whether the positive / negative item is among the user's training events before the
    # positive (only with seen_bias)
    positive_seen: torch.Tensor | None = None
    negative_seen: torch.Tensor | None = None


class BPRFactorisation(Recommender):
    """score(u, i) = [p_u, mean l_j] . [q_i, q'_i] + b_i (see the module docstring)."""

    def __init__(self, n_items: int, n_users: int, *, factors: int, window: int,
                 item_bias: bool, init_std: float, l2: float, seen_bias: bool) -> None:
        super().__init__(n_items, n_users)
        self.factors = factors
        self.window = window
        self.l2 = l2
        self.user_factors = nn.Parameter(torch.randn(n_users, factors) * init_std)
        # Item side: q_i, and for transitions q'_i next to it, so that scoring is one matmul.
        width = factors * (2 if window else 1)
        self.item_factors = nn.Parameter(torch.randn(n_items, width) * init_std)
        self.transition_factors = (
            nn.Parameter(torch.randn(n_items, factors) * init_std) if window else None
        )  # l_j, the factor of an item as the origin of a transition
        self.item_bias = nn.Parameter(torch.zeros(n_items)) if item_bias else None
        # β, the learned offset of items seen before the prediction point (module docstring)
        self.seen_bias = nn.Parameter(torch.zeros(())) if seen_bias else None
        self.sparse_gradients = False  # row-sparse gradients of the factor tables (lazy_adam)

    @property
    def uses_users(self) -> bool:
        return True

    def context_vectors(self, users: torch.Tensor, context: torch.Tensor,
                        context_mask: torch.Tensor) -> torch.Tensor:
        """[p_u, mean of l_j over the existing context items]: [B, factors * (1 or 2)]."""
        user = self._rows(self.user_factors, users)
        if not self.window:
            return user
        weights = context_mask.to(user.dtype)
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1.0)
        transition = torch.einsum("bw,bwf->bf", weights,
                                  self._rows(self.transition_factors, context))
        return torch.cat([user, transition], dim=1)

    def set_sparse_gradients(self, sparse: bool) -> None:
        self.sparse_gradients = sparse

    def step_elements(self, batch_size: int, n_events: int) -> dict[str, tuple[int, str]]:
        """The rows one BPR batch gathers, each with its gradient: the user's factors, the
        context items' transition factors, the positive's and the negative's item rows, and
        the context vector made of them; no row of item scores. The sampler's index arrays
        (one entry per training event) are data-sized: the estimate leaves the data out."""
        rows = min(batch_size, n_events)
        width = self.item_factors.shape[1]
        per_row = self.factors * (1 + self.window) + 3 * width
        return {"BPR rows": (2 * rows * per_row, "train.batch_size")}

    def _rows(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """table[index], with a row-sparse gradient for `table` when asked
        (set_sparse_gradients; the item bias: SparseGather). Otherwise plain indexing, whose
        dense gradient sums a batch's repeated rows as it always has."""
        if self.sparse_gradients:
            return F.embedding(index, table, sparse=True)
        return table[index]

    def _bias(self, items: torch.Tensor) -> torch.Tensor | float:
        if self.item_bias is None:
            return 0.0
        return (SparseGather.apply(self.item_bias, items) if self.sparse_gradients
                else self.item_bias[items])

    # --- training -------------------------------------------------------------------------

    def training_batches(
        self, train: SequenceData, batch_size: int, rng: np.random.Generator
    ) -> Iterator[BPRBatch]:
        device = self.device
        positions, users = self._training_positions(train)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(rng.integers(2**62)))
        items = torch.from_numpy(train.items.astype(np.int64)).to(device)
        positions = torch.from_numpy(positions).to(device)
        users = torch.from_numpy(users).to(device)
        starts = torch.from_numpy(train.offsets[:-1]).to(device)[users]
        order = torch.randperm(len(positions), generator=generator, device=device)
        back = torch.arange(1, self.window + 1, device=device)
        first_seen = self._first_training_positions(train) if self.seen_bias is not None else None
        for lo in range(0, len(order), batch_size):
            take = order[lo:lo + batch_size]
            pos, user = positions[take], users[take]
            before = pos[:, None] - back  # most recent first
            mask = before >= starts[take, None]
            positives = items[pos]
            # Uniform over the n_items - 1 items other than the positive.
            negatives = torch.randint(self.n_items - 1, (len(take),), generator=generator,
                                      device=device)
            negatives += negatives >= positives
            seen = (None, None) if first_seen is None else (
                self._seen_before(first_seen, user, positives, pos),
                self._seen_before(first_seen, user, negatives, pos))
            yield BPRBatch(users=user, positions=pos,
                           context=torch.where(mask, items[before.clamp_min(0)], 0),
                           context_mask=mask, positives=positives, negatives=negatives,
                           n_events=len(take), positive_seen=seen[0], negative_seen=seen[1])

    def _first_training_positions(self, train: SequenceData) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted keys user * n_items + item of every (user, item) with a training event, and
        the global position of that pair's first training event."""
        positions = np.flatnonzero(train.train_mask())
        keys = train.event_users()[positions].astype(np.int64) * self.n_items + train.items[
            positions]
        unique, first = np.unique(keys, return_index=True)  # first: the earliest position
        return (torch.from_numpy(unique).to(self.device),
                torch.from_numpy(positions[first]).to(self.device))

    def _seen_before(self, first_seen: tuple[torch.Tensor, torch.Tensor], users: torch.Tensor,
                     items: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Whether each user had a training event of the item before the given position."""
        keys, first = first_seen
        query = users * self.n_items + items
        where = torch.searchsorted(keys, query).clamp_max(len(keys) - 1)
        return (keys[where] == query) & (first[where] < positions)

    def _training_positions(self, train: SequenceData) -> tuple[np.ndarray, np.ndarray]:
        """Global positions of the training events that are BPR positives, and their users."""
        mask = train.train_mask()
        if self.window:  # a transition needs an earlier training event of the same user
            mask[train.offsets[:-1][train.train_end > train.offsets[:-1]]] = False
        positions = np.flatnonzero(mask)
        return positions, train.event_users()[positions]

    def training_loss(self, batch: BPRBatch) -> torch.Tensor:
        if self.n_items < 2:
            raise SeqexpError("BPR needs at least 2 items to sample a negative")
        context = self.context_vectors(batch.users, batch.context, batch.context_mask)
        positive = self._rows(self.item_factors, batch.positives)
        negative = self._rows(self.item_factors, batch.negatives)
        margin = (context * (positive - negative)).sum(1)
        margin = margin + self._bias(batch.positives) - self._bias(batch.negatives)
        if self.seen_bias is not None:
            margin = margin + self.seen_bias * (batch.positive_seen.to(margin.dtype)
                                                - batch.negative_seen.to(margin.dtype))
        loss = F.softplus(-margin).mean()  # -log sigmoid(margin)
        if self.l2:
            # BPR's per-sample regulariser: only the rows this batch touches.
            loss = loss + self.l2 * (context.square().sum(1) + positive.square().sum(1)
                                     + negative.square().sum(1)).mean()
        return loss

    # --- scoring --------------------------------------------------------------------------

    def prediction_states(
        self, batch: PredictionBatch
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The context vectors [P, width]; with seen_bias a tuple of them, each point's row and
        column [P], and the batch's item rows as a [P, B, T] expanded view (no copy), so that
        the evaluator's slicing over points keeps all four aligned."""
        rows, cols = batch.target_rows, batch.target_cols
        before = cols[:, None] - 1 - torch.arange(self.window, device=cols.device)
        mask = before >= 0
        context = torch.where(mask, batch.items[rows[:, None], before.clamp_min(0)], 0)
        context = self.context_vectors(batch.users[rows], context, mask)
        if self.seen_bias is None:
            return context
        return context, rows, cols, batch.items[None].expand(len(rows), *batch.items.shape)

    def score_items(self, state: torch.Tensor | tuple[torch.Tensor, ...], lo: int,
                    hi: int) -> torch.Tensor:
        context = state if isinstance(state, torch.Tensor) else state[0]
        bias = None if self.item_bias is None else self.item_bias[lo:hi]
        scores = F.linear(context, self.item_factors[lo:hi], bias)
        if self.seen_bias is not None and len(context):
            _, rows, cols, items = state
            scores += self.seen_bias * seen_block(items[0], rows, cols, lo, hi).to(scores.dtype)
        return scores

    def score_factors(self, state: torch.Tensor | tuple[torch.Tensor, ...]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        if self.seen_bias is not None:  # scores also depend on the point's own history
            return None
        return (state if isinstance(state, torch.Tensor) else state[0], self.item_factors,
                self.item_bias)

    def score_key_columns(self, batch: PredictionBatch) -> tuple[torch.Tensor, int] | None:
        if not self.window or self.seen_bias is not None:  # mf: whole rows (score_row_keys)
            return None
        return batch.users[batch.target_rows], self.factors  # p_u, then the transitions' mean

    def score_row_keys(self, batch: PredictionBatch) -> torch.Tensor | None:
        if self.window or self.seen_bias is not None:  # the last items or the history count
            return None
        return batch.users[batch.target_rows]  # p_u . q_i + b_i: the user's row


class SparseGather(torch.autograd.Function):
    """vector[index] whose gradient for `vector` is a sparse COO tensor (F.embedding's
    sparse=True takes a 2-D table, and a sparse gradient cannot pass the view of a vector
    as one)."""

    @staticmethod
    def forward(ctx, vector: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.size = vector.shape
        return vector[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(index[None], grad, ctx.size, check_invariants=False), None


def seen_block(items: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, lo: int,
               hi: int) -> torch.Tensor:
    """[P, hi-lo] bool: item lo + k occurs in row `rows[p]` of `items` [B, T] before column
    `cols[p]`.

    The first column of every item in every row (a [B, hi-lo] table, no larger than the score
    block) is compared with each point's column; padding lies after every target, so it never
    counts."""
    n_rows, width = items.shape
    inside = (items >= lo) & (items < hi)
    columns = torch.arange(width, device=items.device).expand(n_rows, width)
    first = torch.full((n_rows, hi - lo), width, dtype=torch.long, device=items.device)
    first.scatter_reduce_(1, torch.where(inside, items - lo, 0).long(),
                          torch.where(inside, columns, width), reduce="amin")
    return first[rows] < cols[:, None]


class MF(BPRFactorisation):
    """BPR matrix factorisation: score = p_u . q_i + b_i."""

    config_keys = {
        "factors": Key(integer(1), "latent factors"),
        "item_bias": Key(flag(), "a learned bias per item"),
        "init_std": Key(number(0.0, low_open=True), "std of the normal initialisation"),
        "l2": Key(number(0.0), "BPR's L2 penalty per sample"),
        "seen_bias": Key(flag(), "a learned offset for items in the user's history"),
    }

    def __init__(self, n_items: int, n_users: int, *, factors: int, item_bias: bool,
                 init_std: float, l2: float, seen_bias: bool) -> None:
        super().__init__(n_items, n_users, factors=factors, window=0, item_bias=item_bias,
                         init_std=init_std, l2=l2, seen_bias=seen_bias)


class SeqMF(BPRFactorisation):
    """FPMC-style: score = p_u . q_i + mean_{j in last `window` items} l_j . q'_i."""

    config_keys = MF.config_keys | {
        "window": Key(integer(1), "last items whose transitions are averaged")}

    def __init__(self, n_items: int, n_users: int, *, factors: int, window: int,
                 item_bias: bool, init_std: float, l2: float, seen_bias: bool) -> None:
        super().__init__(n_items, n_users, factors=factors, window=window, item_bias=item_bias,
                         init_std=init_std, l2=l2, seen_bias=seen_bias)
