"""Item-based k-nearest-neighbours: cosine similarity of items over users' training sequences.

`itemknn` scores from the last item only; `expdecay_knn` sums the similarities of the whole
history with exponentially decaying weights."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

from seqexp.core.schema import Key, choice, flag, integer, number
from seqexp.core.stopping import FitStopped
from seqexp.data.batching import PredictionBatch
from seqexp.data.sequences import SequenceData
from seqexp.models import cpu_kernels
from seqexp.models.base import Recommender

log = logging.getLogger(__name__)
# Co-occurrence increments per fit block when model.fit_block is null: a block lasts a
# fraction of a second, so progress is logged and a stop signal heeded within seconds.
BLOCK_PRODUCTS = 64_000_000
# Users up to which every co-occurrence count fits the fit's uint16 counters (else int32).
UINT16_USERS = np.iinfo(np.uint16).max
# Entries of the dense scratch rows in which expdecay_knn sums a point's history exactly as its
# dense scores do (sparse_scores).
SCRATCH_ELEMENTS = 16_000_000


def cosine_neighbours(
    train: SequenceData, k: int, device: torch.device, block_items: int | None = None,
    stop_requested: Callable[[], str | None] = lambda: None, max_block: int = BLOCK_PRODUCTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours of every item (self excluded, zero similarities dropped; among
    equal similarities the lower item id first).

    Items are binary-coded per user: sim(i, j) = |U_i ∩ U_j| / sqrt(|U_i| |U_j|). A compiled kernel
    (`knn_kernels.top_cosines`, one item per thread at a time) counts an item's co-occurrences with
    every item from its users' item lists and keeps the top k of the nonzero ones in a heap: work in
    proportion to the pairs of items a user shares, never items x items. A block is `block_items`
    items, or (null) as many as make about `max_block` co-occurrence increments. Between blocks
    `stop_requested` is asked (FitStopped) and progress is logged. Returns [N, k] neighbour ids and
    similarities (padding: id 0, sim 0).
    """
    n_items = train.n_items
    by_user, by_item = user_item_matrices(train)
    norms = np.sqrt(np.asarray(by_item.sum(axis=1)).ravel()).astype(np.float32)
    k = min(k, max(n_items - 1, 1))
    keys = np.empty((n_items, k), dtype=np.int64)
    progress = FitProgress("item-kNN similarities", n_items)
    from seqexp.models import knn_kernels  # numba: ~0.6 s to import, loaded on first use

    counts = np.zeros((knn_kernels.thread_count(torch.get_num_threads()), n_items),
                      dtype=np.uint16 if train.n_users <= UINT16_USERS else np.int32)
    for lo, hi in _fit_blocks(by_user, by_item, block_items, max_block):
        name = stop_requested()
        if name is not None:
            raise FitStopped(name)
        knn_kernels.top_cosines(lo, hi, by_item.indptr, by_item.indices, by_user.indptr,
                                by_user.indices, norms, counts, keys)
        progress.done(hi)
    top = torch.from_numpy(keys)
    kept = top >= 0
    neighbours = torch.where(kept, knn_kernels.ID_MASK - (top & knn_kernels.ID_MASK), 0)
    bits = (top >> 32).to(torch.int32)
    similarity = torch.where(kept, bits.view(torch.float32), 0.0)
    return neighbours.to(device), similarity.to(device)


def user_item_matrices(train: SequenceData) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(users x items, items x users) binary CSR matrices of the training events."""
    mask = train.train_mask()
    by_user = sp.csr_matrix(
        (np.ones(int(mask.sum()), dtype=np.float32),
         (train.event_users()[mask], train.items[mask].astype(np.int64))),
        shape=(train.n_users, train.n_items),
    )
    by_user.sum_duplicates()
    by_user.data[:] = 1.0
    return by_user, by_user.T.tocsr()


def _fit_blocks(by_user: sp.csr_matrix, by_item: sp.csr_matrix, block_items: int | None,
                max_block: int) -> list[tuple[int, int]]:
    """(lo, hi) item ranges of the fit: `block_items` items each, or (None) ranges of about
    `max_block` co-occurrence counts (an item costs the sum over its users of their distinct
    items; one item more than that at most)."""
    n_items = by_item.shape[0]
    if block_items:
        edges = np.arange(0, n_items, block_items)
    else:
        work = np.cumsum(by_item @ np.diff(by_user.indptr).astype(np.float64))
        total = work[-1] if len(work) else 0.0
        edges = np.searchsorted(work, np.arange(max_block, total, max_block), side="right")
    edges = np.unique(np.concatenate([[0], edges, [n_items]]))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))


class FitProgress:
    """Log lines of a long fit: items done, rate and ETA, every `every_s` seconds (none for a
    fit shorter than that)."""

    def __init__(self, what: str, total: int, every_s: float = 10.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.started = self.last = time.perf_counter()

    def done(self, count: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s or count >= self.total:
            return
        self.last = now
        rate = count / (now - self.started)
        log.info("%s: %d / %d items (%.1f %%), %.0f items/s, ETA %.0f s", self.what, count,
                 self.total, 100.0 * count / self.total, rate, (self.total - count) / rate)


def neighbour_scores(
    anchors: torch.Tensor, weights: torch.Tensor | None, neighbours: torch.Tensor,
    similarity: torch.Tensor, lo: int, hi: int, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense scores [P, hi-lo] = sum over anchors a of weight(a) * sim(a, item).

    `anchors` is [P, A] item ids (the items a prediction point looks from) and `weights` [P, A]
    (None = all ones); the sparse neighbour lists are scattered into a dense block, `out` if
    given (added to), else a new zero block.
    """
    if anchors.dim() == 1:
        anchors = anchors[:, None]
    ids = neighbours[anchors].flatten(1)  # [P, A*k]
    values = similarity[anchors]
    if weights is not None:
        values = values * weights[..., None]
    values = values.flatten(1)
    scores = out if out is not None else torch.zeros(
        anchors.shape[0], hi - lo, device=values.device, dtype=values.dtype)
    if lo > 0 or hi < len(neighbours):  # an item chunk: keep the neighbours inside it
        inside = (ids >= lo) & (ids < hi)
        ids, values = torch.where(inside, ids - lo, 0), torch.where(inside, values, 0.0)
    scores.scatter_add_(1, ids, values)
    return scores


class ItemKNN(Recommender):
    """score(i) = sim(last item, i) over the top-`neighbours` cosine neighbours of the last item.

    `popularity_tiebreak` adds popularity scaled below any similarity step that matters
    (1e-6 x share of the most popular item's count), so items outside the neighbour list are
    ordered by popularity rather than tied; log it, it is a choice the paper does not state.
    """

    config_keys = {
        "neighbours": Key(integer(1), "neighbours kept per item"),
        "popularity_tiebreak": Key(flag(), "order items outside the neighbours by popularity"),
        "fit_block": Key(integer(1, nullable=True), "items per block of the similarity fit "
                         "(null = about 64M co-occurrence counts a block); a stop signal is "
                         "checked between blocks", affects_results=False),
    }

    def __init__(self, n_items: int, n_users: int, *, neighbours: int,
                 popularity_tiebreak: bool, fit_block: int | None) -> None:
        super().__init__(n_items, n_users)
        self.k = neighbours
        self.fit_block = fit_block
        self.popularity_tiebreak = popularity_tiebreak
        k = max(1, min(neighbours, n_items - 1))
        self.register_buffer("neighbours", torch.zeros(n_items, k, dtype=torch.int64))
        self.register_buffer("similarity", torch.zeros(n_items, k))
        self.register_buffer("prior", torch.zeros(n_items))

    def fit_elements(self, n_events: int) -> dict[str, tuple[int, str]]:
        """The fit's int64 keys (two float32-sized elements per neighbour), the neighbours and
        similarities built from them before they are copied into the buffers, and each
        thread's two int32 rows of the catalogue's width (`knn_kernels.top_cosines`)."""
        rows = 2 * max(1, torch.get_num_threads()) * self.n_items
        return {"fitted neighbours": (5 * self.neighbours.numel() + rows, "model.neighbours")}

    def fit(self, train: SequenceData,
            stop_requested: Callable[[], str | None] = lambda: None) -> None:
        neighbours, similarity = cosine_neighbours(train, self.k, self.device, self.fit_block,
                                                   stop_requested)
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

    def shared_scores(self) -> torch.Tensor:
        return self.prior

    def sparse_scores(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last item's neighbours at prior + similarity, as score_items adds them (a zero
        similarity, padding included, leaves the prior: dropped)."""
        similarity = self.similarity[state]
        ids = torch.where(similarity != 0, self.neighbours[state], -1)
        return ids, similarity + self.prior[ids.clamp_min(0)]

    def table_rows(self) -> int:
        """A row per item: a point's entries are its last item's neighbours."""
        return self.n_items

    def sparse_rows(self, state: torch.Tensor) -> torch.Tensor:
        return state




class ExpDecayKNN(ItemKNN):
    """score(i) = sum_k exp(-decay * (n - k)) * sim(i_k, i) over the history i_1..i_n before the
    prediction point, with the `itemknn` similarities (and its popularity tie-break).

    `decay_unit=position`: n - k counts events back from the last one. `decay_unit=time`: n - k
    is the time from event k to the last event i_n in units of `time_unit_s` seconds (default
    3600, hours), so the last event weighs 1 as in the position form.

    `window` bounds the sum to the last `window` events (null: the whole history). For
    positions a dropped event weighs at most exp(-decay * window) of the last one; with decay 1
    and window 20 the dropped terms add at most 1.6 * exp(-20) = 3.3e-9 to a score (cosines are
    <= 1), less than float32 resolution (6e-8 relative) of any score above 0.06, so the top of
    the ranking is that of the whole-history sum; items scoring less can swap places, which
    scripts/expdecay_window.py measures (README). In time units events can be close in time yet
    many positions back (a burst of ratings), so there the window is a real cut: use
    window=null to sum the whole history.

    The history is gathered as a [P, window] block of (item, weight) anchors per prediction
    point and scattered through the neighbour lists, `anchor_block` scattered entries at a
    time (a loop over blocks of anchor columns, each batched over every prediction point).
    """

    config_keys = ItemKNN.config_keys | {
        "decay": Key(number(0.0), "lambda of exp(-lambda * distance)"),
        "decay_unit": Key(choice("position", "time"), "distance in positions or in time"),
        "time_unit_s": Key(number(0.0, low_open=True), "seconds per time unit of the decay"),
        "window": Key(integer(1, nullable=True), "last events entering the sum (null = all)"),
        "anchor_block": Key(integer(1), "scattered entries per step (memory)",
                            affects_results=False),
    }

    def __init__(self, n_items: int, n_users: int, *, neighbours: int, decay: float,
                 decay_unit: str, time_unit_s: float, window: int | None,
                 popularity_tiebreak: bool, anchor_block: int, fit_block: int | None) -> None:
        super().__init__(n_items, n_users, neighbours=neighbours,
                         popularity_tiebreak=popularity_tiebreak, fit_block=fit_block)
        self.decay = decay
        self.decay_unit = decay_unit
        self.time_unit_s = time_unit_s
        self.window = window
        self.anchor_block = anchor_block

    def prediction_states(self, batch: PredictionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """([P, A] anchor items, [P, A] weights), most recent first; weight 0 pads."""
        rows, last = batch.target_rows, batch.target_cols - 1
        width = int(last.max()) + 1 if len(last) else 1
        span = width if self.window is None else min(self.window, width)
        back = torch.arange(span, device=last.device)
        cols = last[:, None] - back  # [P, A]
        valid = cols >= 0
        cols = cols.clamp_min(0)
        anchors = batch.items[rows[:, None], cols]
        if self.decay_unit == "position":
            distance = back.to(torch.float32).expand_as(cols)
        else:
            times = batch.timestamps[rows[:, None], cols]
            distance = (times[:, :1] - times).to(torch.float32) / self.time_unit_s
        weights = torch.where(valid, torch.exp(-self.decay * distance), 0.0)
        return anchors, weights

    def score_items(self, state: tuple[torch.Tensor, torch.Tensor], lo: int,
                    hi: int) -> torch.Tensor:
        anchors, weights = state
        scores = self.prior[lo:hi].expand(anchors.shape[0], hi - lo).clone()
        self._add_history(anchors, weights, lo, hi, scores)
        return scores

    def _add_history(self, anchors: torch.Tensor, weights: torch.Tensor, lo: int, hi: int,
                     out: torch.Tensor) -> None:
        """Add the decayed neighbour similarities of the history to `out` (items lo..hi-1), in
        the same order for every cell whatever the block sizes."""
        step = max(1, self.anchor_block // max(1, anchors.shape[0] * self.neighbours.shape[1]))
        for start in range(0, anchors.shape[1], step):
            part = slice(start, start + step)
            neighbour_scores(anchors[:, part], weights[:, part], self.neighbours,
                             self.similarity, lo, hi, out=out)

    def sparse_scores(self, state: tuple[torch.Tensor, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every neighbour of the history once, at its score_items score. With the CPU kernel
        `sparse_entries` (seqexp.models.cpu_kernels) a compiled kernel
        (`knn_kernels.history_entries`) sums each point's decayed similarities in its output
        row, in the order score_items adds them, so the sums are its scores bit for bit, and
        keeps an item's first mention (later ones pad, -1; the rows as wide as the most items
        a point names). Otherwise each block of points is
        summed in dense scratch rows (only the cells it touches are set and read), and of an
        item named several times in a row one entry is kept (the one whose column wins a
        scatter of column numbers)."""
        anchors, weights = state
        if cpu_kernels.active("sparse_entries", anchors.device):
            from seqexp.models import knn_kernels  # numba: ~0.6 s to import, loaded on first use

            n_points, width = anchors.shape[0], anchors.shape[1] * self.neighbours.shape[1]
            # int32 ids: half the bytes written and read again by the counting
            ids = np.empty((n_points, width), dtype=np.int32)
            scores = np.empty((n_points, width), dtype=np.float32)
            widest = knn_kernels.history_entries(
                anchors.numpy(), weights.numpy(), self.neighbours.numpy(),
                self.similarity.numpy(), self.prior.numpy(),
                self._thread_slots(knn_kernels.thread_count(torch.get_num_threads()), width),
                ids, scores)
            # rows as wide as the most items a point names (neighbour lists overlap)
            return torch.from_numpy(ids[:, :widest]), torch.from_numpy(scores[:, :widest])
        ids = self.neighbours[anchors].flatten(1)  # [P, A*k], an item may repeat in a row
        n_points, width = ids.shape
        scratch, claims = self._scratch_rows()
        rows = len(scratch)
        column = torch.arange(width, dtype=torch.int32, device=ids.device).expand(rows, width)
        scores = self.prior.new_empty(n_points, width)
        kept = torch.empty(n_points, width, dtype=torch.bool, device=ids.device)
        for start in range(0, n_points, rows):
            part = slice(start, start + rows)
            block_ids = ids[part]
            n = len(block_ids)
            block = scratch[:n].scatter_(1, block_ids, self.prior[block_ids])
            self._add_history(anchors[part], weights[part], 0, self.n_items, block)
            scores[part] = block.gather(1, block_ids)
            claim = claims[:n].scatter_(1, block_ids, column[:n])
            kept[part] = claim.gather(1, block_ids) == column[:n]
        return torch.where(kept, ids, -1), scores

    def table_rows(self) -> None:
        """None: a point's entries come from its whole window, not from one item's row."""
        return None

    def _thread_slots(self, threads: int, width: int) -> np.ndarray:
        """history_entries' slot rows, one per thread (all -1), kept between calls: new memory
        would be paged in again by every call's scattered writes. int16 where a row's `width`
        entries fit: half the cache lines of the catalogue-wide row it reads at random."""
        dtype = np.int16 if width <= np.iinfo(np.int16).max else np.int32
        kept = getattr(self, "_slots", None)
        if kept is None or kept.shape != (threads, self.n_items) or kept.dtype != dtype:
            kept = self._slots = np.full((threads, self.n_items), -1, dtype=dtype)
        return kept

    def _scratch_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Score and claim rows [R, N], kept between calls: new memory would be paged in
        again by every call's scattered writes."""
        rows = max(1, SCRATCH_ELEMENTS // self.n_items)
        kept = getattr(self, "_scratch", None)
        if kept is None or kept[0].device != self.prior.device:
            kept = (self.prior.new_empty(rows, self.n_items),
                    torch.empty(rows, self.n_items, dtype=torch.int32, device=self.prior.device))
            self._scratch = kept
        return kept
