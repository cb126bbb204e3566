"""Item-based k-nearest-neighbours: cosine similarity of items over users' training sequences."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

from seqexp.data.batching import PredictionBatch
from seqexp.data.sequences import SequenceData
from seqexp.models.base import Recommender


def cosine_neighbours(
    train: SequenceData, k: int, device: torch.device, max_block: int = 50_000_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours of every item (self excluded, zero similarities dropped).

    Items are binary-coded per user: sim(i, j) = |U_i ∩ U_j| / sqrt(|U_i| |U_j|). The Gram
    matrix is formed in blocks of item columns (a sparse-dense product), so memory stays at
    max_block entries. Returns [N, k] neighbour ids and similarities (padding: id 0, sim 0).
    """
    n_items = train.n_items
    mask = train.train_mask()
    matrix = sp.csr_matrix(
        (np.ones(int(mask.sum()), dtype=np.float32),
         (train.event_users()[mask], train.items[mask].astype(np.int64))),
        shape=(train.n_users, n_items),
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    by_item = matrix.T.tocsr()
    norms = torch.from_numpy(np.sqrt(np.asarray(by_item.sum(axis=1)).ravel())).to(device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is used plainly here
        warnings.simplefilter("ignore", UserWarning)
        by_item_t = torch.sparse_csr_tensor(
            torch.from_numpy(by_item.indptr.astype(np.int64)),
            torch.from_numpy(by_item.indices.astype(np.int64)),
            torch.from_numpy(by_item.data), size=by_item.shape, check_invariants=False,
        ).to(device)
    k = min(k, max(n_items - 1, 1))
    neighbours = torch.zeros(n_items, k, dtype=torch.int64, device=device)
    similarity = torch.zeros(n_items, k, dtype=torch.float32, device=device)
    block = max(1, min(n_items, max_block // max(n_items, train.n_users)))
    matrix_csc = matrix.tocsc()
    for lo in range(0, n_items, block):  # blocks of item columns, each a batched product
        hi = min(lo + block, n_items)
        columns = torch.from_numpy(matrix_csc[:, lo:hi].toarray()).to(device)
        gram = torch.sparse.mm(by_item_t, columns).T  # [hi-lo, N] co-occurrence counts
        sims = gram / (norms[lo:hi, None] * norms[None, :]).clamp_min(1e-12)
        sims[torch.arange(hi - lo), torch.arange(lo, hi)] = 0.0  # self excluded
        values, ids = sims.topk(k, dim=1)
        keep = values > 0
        neighbours[lo:hi] = torch.where(keep, ids, 0)
        similarity[lo:hi] = torch.where(keep, values, 0.0)
    return neighbours, similarity


def neighbour_scores(
    anchors: torch.Tensor, weights: torch.Tensor | None, neighbours: torch.Tensor,
    similarity: torch.Tensor, lo: int, hi: int,
) -> torch.Tensor:
    """Dense scores [P, hi-lo] = sum over anchors a of weight(a) * sim(a, item).

    `anchors` is [P, A] item ids (the items a prediction point looks from) and `weights` [P, A]
    (None = all ones); the sparse neighbour lists are scattered into a dense block.
    """
    if anchors.dim() == 1:
        anchors = anchors[:, None]
    ids = neighbours[anchors].flatten(1)  # [P, A*k]
    values = similarity[anchors]
    if weights is not None:
        values = values * weights[..., None]
    values = values.flatten(1)
    inside = (ids >= lo) & (ids < hi)
    scores = torch.zeros(anchors.shape[0], hi - lo, device=values.device, dtype=values.dtype)
    scores.scatter_add_(1, torch.where(inside, ids - lo, 0), torch.where(inside, values, 0.0))
    return scores


class ItemKNN(Recommender):
    """score(i) = sim(last item, i) over the top-`neighbours` cosine neighbours of the last item.

    `popularity_tiebreak` adds popularity scaled below any similarity step that matters
    (1e-6 x share of the most popular item's count), so items outside the neighbour list are
    ordered by popularity rather than tied; log it, it is a choice the paper does not state.
    """

    def __init__(self, n_items: int, n_users: int, neighbours: int = 100,
                 popularity_tiebreak: bool = True) -> None:
        super().__init__(n_items, n_users)
        self.k = neighbours
        self.popularity_tiebreak = popularity_tiebreak
        k = max(1, min(neighbours, n_items - 1))
        self.register_buffer("neighbours", torch.zeros(n_items, k, dtype=torch.int64))
        self.register_buffer("similarity", torch.zeros(n_items, k))
        self.register_buffer("prior", torch.zeros(n_items))

    def fit(self, train: SequenceData) -> None:
        neighbours, similarity = cosine_neighbours(train, self.k, self.device)
        self.neighbours.copy_(neighbours)
        self.similarity.copy_(similarity)
        if self.popularity_tiebreak:
            counts = torch.from_numpy(train.item_popularity()).float()
            self.prior.copy_(1e-6 * counts / counts.max().clamp_min(1.0))

    def prediction_states(self, batch: PredictionBatch) -> torch.Tensor:
        return batch.items[batch.target_rows, batch.target_cols - 1]

    def score_items(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        scores = neighbour_scores(state, None, self.neighbours, self.similarity, lo, hi)
        return scores + self.prior[lo:hi]
