"""The model contract. The trainer and the evaluator know models only through it.

Every model answers two questions:
- fit on these sequences: `fit(train)` for the closed-form part (similarities, counts) and, for
  models with trainable parameters, `training_batches` + `training_loss` driven by the one
  training loop;
- score all items for these prediction points: `prediction_states(batch)` summarises each
  target's context (a hidden state, the last item, a user), `score_items(state, lo, hi)` gives
  the scores of items lo..hi-1 for every prediction point, in the batch's target order.

A model whose scores are a vector shared by every prediction point plus a few entries per point
(popularity, item-kNN) says so through `shared_scores` and `sparse_scores` (and, when a point's
entries are one row of a fixed table, `table_rows` and `sparse_rows`); the evaluator then
ranks from the shared vector sorted once and those entries instead of dense score rows
(seqexp.engine.ranks, docs/evaluation.md). Its `score_items` must give the same scores.

A model carries no state from call to call: what training carries from one batch to the next
(a recurrent state per lane) travels with the epoch's batches (seqexp/data/batching.py,
`LaneStates`), and `training_state`/`load_training_state` read and put it back through a batch.
Its config keys are the class attribute `config_keys`, next to its constructor; a model is
registered by its class (seqexp/run/registry.py) and named by its file conf/model/<name>.yaml.
docs/adding-a-model.md shows a complete model; tests/test_conformance.py checks the contract for
every registered one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from seqexp.core.schema import Key, ModelCheck
from seqexp.data.batching import PredictionBatch
from seqexp.data.sequences import SequenceData

# What prediction_states returns: one row per prediction point (see there).
PredictionState = torch.Tensor | int | tuple[torch.Tensor, ...]


class Recommender(nn.Module):
    """Base class: an nn.Module so that devices, train/eval modes and checkpoints are uniform."""

    # {constructor argument: its Key (rule, one-line doc, affects-results mark)}: the config
    # schema's table of model.* for this class (seqexp/core/schema.py), beside the common
    # name, _target_ and _partial_. The constructor receives checked values.
    config_keys: ClassVar[Mapping[str, Key]] = {}
    # Checks that tie several of those keys together (model.n_heads must divide
    # model.hidden_size): each takes the model block, each present key past its own rule, and
    # returns None or one line naming the keys and what to do. The schema runs them with the
    # keys' rules, on the command line and on a checkpoint's config, before the model is built.
    config_checks: ClassVar[Sequence[ModelCheck]] = ()

    def __init__(self, n_items: int, n_users: int) -> None:
        super().__init__()
        self.n_items = n_items
        self.n_users = n_users

    @property
    def device(self) -> torch.device:
        """The device of the parameters (else buffers, else the CPU): where batches go."""
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    @property
    def trainable(self) -> bool:
        """Whether the training loop has epochs to run (any parameter needs a gradient)."""
        return any(p.requires_grad for p in self.parameters())

    @property
    def uses_users(self) -> bool:
        """Whether scores depend on the user as well as on the items before the prediction
        point (a user vector); seqexp.apps.recommend needs a user for such a model."""
        return False

    def training_state(self, batch: Any = None) -> dict[str, torch.Tensor]:
        """State carried from batch to batch of an epoch besides the parameters and buffers
        (a recurrent model's hidden states, which travel with the batches), as it stands after
        training on `batch` (None: between epochs, where nothing is carried): saved in the
        resumable training state of an epoch stopped after `batch`. Default: nothing."""
        return {}

    def load_training_state(self, state: dict[str, torch.Tensor], batch: Any = None) -> None:
        """Put back what training_state(batch) returned, into the carry that `batch` (the
        last batch the saved state had trained on, drawn again from the same random state)
        shares with the epoch's later batches. Default: nothing."""

    def fit(self, train: SequenceData,
            stop_requested: Callable[[], str | None] = lambda: None) -> None:
        """Closed-form fitting on the training events (each user's events before
        `train.train_end`), once before any epoch; default: nothing. A fit that takes long asks
        `stop_requested` between its steps and, when it names a signal, raises
        seqexp.core.stopping.FitStopped."""

    def fit_elements(self, n_events: int) -> dict[str, tuple[int, str]]:
        """What `fit` holds at once besides the model's tensors, as `step_elements` says it
        (for `n_events` training events); default: nothing."""
        return {}

    def step_elements(self, batch_size: int, n_events: int) -> dict[str, tuple[int, str]]:
        """What one training step of `batch_size` holds besides the parameters, their gradients
        and the optimiser's state: {part: (float elements, the config key that bounds it)},
        for `n_events` training events. Read on a model built on the meta device
        (seqexp/engine/memory.py), so that a run that cannot fit is refused before anything is
        allocated. Default: a trainable model scores every item for each of its batch's rows
        (at most one per event), with the scores' gradient; a model without trainable
        parameters has no training step."""
        if not self.trainable:
            return {}
        rows = min(batch_size, n_events)
        return {"scores": (2 * rows * self.n_items, "train.batch_size")}

    def set_sparse_gradients(self, sparse: bool) -> None:
        """Whether training steps should give row-sparse (COO) gradients for the model's large
        tables where it can (the trainer says so for an optimiser that takes them,
        train.optimizer=lazy_adam, which then updates the rows a batch touched alone).
        Default: ignored; dense gradients, which every optimiser takes."""

    def training_batches(
        self, train: SequenceData, batch_size: int, rng: np.random.Generator
    ) -> Iterator[Any]:
        """One epoch of mini-batches (drawn with `rng` only, so that an epoch's batches can be
        drawn again on resume); each has an `n_events` attribute (for events/s)."""
        raise NotImplementedError(f"{type(self).__name__} has no trainable parameters")

    def training_loss(self, batch: Any) -> torch.Tensor:
        """Mean loss of one mini-batch (called in train mode, with gradients)."""
        raise NotImplementedError(f"{type(self).__name__} has no trainable parameters")

    def prediction_states(self, batch: PredictionBatch) -> PredictionState:
        """A summary of each prediction point's context, read only from the events before it
        (the context of the target at (target_rows[p], target_cols[p]) is
        items[target_rows[p], :target_cols[p]]): a tensor whose first dimension is the P
        points, a tuple of such tensors, or the int P for a state all points share. The
        evaluator takes rows of it along that first dimension (slices, or the points in
        another order; a tensor with stride 0 there, e.g. an expanded view, is one row shared
        by all points) and hands them to score_items, possibly from several threads."""
        raise NotImplementedError

    def score_items(self, state: PredictionState, lo: int, hi: int) -> torch.Tensor:
        """Scores [P, hi - lo] of items lo..hi-1 for the P prediction points of `state`, in
        evaluation mode and without gradients; the same for any split of the catalogue into
        chunks (the evaluator scores large catalogues chunk by chunk). Higher is better."""
        raise NotImplementedError

    def score_factors(self, state: PredictionState
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(queries [P, K], item_matrix [n_items, K], item_bias [n_items] or None) when
        score_items(state, lo, hi) is queries @ item_matrix[lo:hi].T + item_bias[lo:hi] and
        nothing else: the evaluator then writes each tile's product into a buffer it reuses
        and adds the bias while counting (the sum rounded once, after the product). None (the
        default): scores are read through score_items alone."""
        return None

    def score_key_columns(self, batch: PredictionBatch) -> tuple[torch.Tensor, int] | None:
        """([P] integer keys of the prediction points of `batch`, G) when the first G columns
        of score_factors' queries are equal for points with equal keys (seqmf: the user's own
        factors, beside the mean of its last items' transition factors). Where it counts in
        CPU tiles, the evaluator may then score the points in blocks of one key each: those G
        columns' part of the scores made once per key as one row, added while counting like
        an item bias, and the product made of the other columns alone. None (the default):
        every column is a product."""
        return None

    def score_row_keys(self, batch: PredictionBatch) -> torch.Tensor | None:
        """[P] integer keys of the prediction points of `batch` such that points with equal
        keys get equal scores for every item (a model whose scores depend on the user alone:
        the user). The evaluator then scores one row per key, sorts it once and ranks each
        of its points by binary searches, where the points share their rows widely enough.
        None (the default): no two points are taken to share their scores."""
        return None

    def shared_scores(self) -> torch.Tensor | None:
        """[n_items] scores shared by every prediction point when this model's scores are that
        vector plus the per-point entries of `sparse_scores`; None (the default): dense scores,
        read through `score_items` only."""
        return None

    def sparse_scores(self, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """([P, W] item ids, [P, W] scores) for the P points of `state`: point p scores item
        ids[p, w] at scores[p, w] and every item its row does not name at its shared score. An
        item appears at most once in a row; id -1 pads (its score is ignored). Only for models
        whose `shared_scores` is not None."""
        raise NotImplementedError(f"{type(self).__name__} has dense scores only")

    def table_rows(self) -> int | None:
        """R, when every point's sparse entries are one row of a fixed table of R rows
        (item-kNN: the last item's neighbours): `sparse_rows(state)` names each point's row,
        and points naming the same row get the same `sparse_scores`. The evaluator then
        prepares each row once, when a point first names it, and ranks a point by binary
        searches in its row. None (the default): the entries come from sparse_scores only."""
        return None

    def sparse_rows(self, state: Any) -> torch.Tensor:
        """[P] the row of the fixed table holding each point's entries (only for models
        whose table_rows is not None)."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse table")
