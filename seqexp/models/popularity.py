"""Most-popular baseline: the same ranking of training counts for every prediction point (a
shared score vector with no per-point part)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from seqexp.data.batching import PredictionBatch
from seqexp.data.sequences import SequenceData
from seqexp.models.base import Recommender


class Popularity(Recommender):
    def __init__(self, n_items: int, n_users: int) -> None:
        super().__init__(n_items, n_users)
        self.register_buffer("counts", torch.zeros(n_items))

    def fit(self, train: SequenceData,
            stop_requested: Callable[[], str | None] = lambda: None) -> None:
        self.counts.copy_(torch.from_numpy(train.item_popularity()).float())

    def prediction_states(self, batch: PredictionBatch) -> int:
        return batch.n_targets

    def score_items(self, state: int, lo: int, hi: int) -> torch.Tensor:
        return self.counts[lo:hi].expand(state, hi - lo)

    def shared_scores(self) -> torch.Tensor:
        return self.counts

    def sparse_scores(self, state: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(state, 0, dtype=torch.int64, device=self.counts.device)
        return ids, self.counts.new_zeros(state, 0)
