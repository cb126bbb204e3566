"""The rank-counting kernels: for each prediction point, how many items score above and level
with its target (seqexp.engine.evaluator). `count_ranks` reads dense blocks of item scores,
without sorting; `count_sparse_ranks` reads a score vector shared by every point, sorted once,
and a few entries per point that differ from it; `count_table_ranks` the same when each point's
entries are one row of a fixed table, prepared once (`SparseTable`), so that a point costs a
few binary searches in its row instead of a pass over its entries; `count_row_ranks` reads
whole score rows that many points share (a user's, where scores depend on the user alone),
each sorted once."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numba
import numpy as np
import torch

from seqexp.core.errors import SeqexpError
from seqexp.models import cpu_kernels, knn_kernels


def count_ranks(
    score_block: Callable[[int, int], torch.Tensor], targets: torch.Tensor, n_items: int,
    chunk: int, excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greater/equal counts for one batch of prediction points, scoring items `chunk` at a time.

    When the catalogue fits one chunk it is scored once; otherwise a first pass collects the
    target scores from the chunks that hold targets (kept, within KEPT_SCORES, for the second
    pass) and a second pass counts every chunk against them. Either way each target score is
    read from the same product as the scores it is compared with. `excluded` = (point, item)
    pairs, distinct and never a point's own target, of items that are not ranked for that
    point (eval.exclude_seen): they are counted like every other item, then taken back out.
    On a CPU (the `dense_counts` kernel) float32 and float64 chunks are counted in one
    compiled pass (_tile_counts); otherwise, and for other dtypes, by sums of signs.
    """
    return count_block_ranks([scores_alone(score_block)], [targets], n_items, chunk,
                             [excluded])[0]


# score_parts(lo, hi, out) = (product [P, hi-lo], bias [hi-lo] or None): the scores of items
# lo..hi-1 are product + bias (each sum rounded in the product's dtype); `out`, when given, is
# a [P, hi-lo] buffer the product may be written into.
ScoreParts = Callable[[int, int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]


def scores_alone(score_block: Callable[[int, int], torch.Tensor]) -> ScoreParts:
    """The ScoreParts of `score_block` (lo, hi) -> scores: no bias, no buffer."""
    return lambda lo, hi, out=None: (score_block(lo, hi), None)


def linear_parts(queries: torch.Tensor, items: torch.Tensor, bias: torch.Tensor | None,
                 lo: int, hi: int, out: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ScoreParts of the scores queries @ items[lo:hi].T + bias[lo:hi] (a model's
    score_factors): the product alone, in `out` when given, and the bias, added while
    counting (no bias copied into each tile, no fresh tile allocated)."""
    product = torch.mm(queries, items[lo:hi].T, out=out)
    return product, None if bias is None else bias[lo:hi]


def count_block_ranks(
    score_blocks: list[ScoreParts], targets: list[torch.Tensor], n_items: int, chunk: int,
    excluded: list[tuple[torch.Tensor, torch.Tensor] | None],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """count_ranks of several blocks of points (block b: its scores `score_blocks[b]`, as
    ScoreParts, its `targets[b]` and `excluded[b]`), their second passes taken chunk by chunk:
    each item chunk is scored and counted for every block in turn, so that on a CPU the
    chunk's item rows come from memory for the first block and from the core's cache for the
    others (the item matrix is read once per group of blocks, not once per block), and the
    products of chunks not kept go into one buffer the blocks reuse. The same products and
    counts as count_ranks block by block; the blocks share KEPT_SCORES."""
    bounds = [(lo, min(lo + chunk, n_items)) for lo in range(0, n_items, chunk)]
    room = KEPT_SCORES // max(1, len(score_blocks))
    buffer = TileBuffer()
    blocks = [_BlockCounts(score, points, bounds, chunk, pairs, room, buffer)
              for score, points, pairs in zip(score_blocks, targets, excluded, strict=True)]
    for index, (lo, hi) in enumerate(bounds):
        for block in blocks:
            block.count(index, lo, hi, buffer)
    return [block.totals(n_items) for block in blocks]


class TileBuffer:
    """One flat buffer, grown on demand, lent as a contiguous [rows, columns] product (the
    last shape's view kept: the blocks of a group ask for the same one tile after tile)."""

    def __init__(self) -> None:
        self.flat: torch.Tensor | None = None
        self.last: torch.Tensor | None = None

    def take(self, rows: int, columns: int, like: torch.Tensor) -> torch.Tensor:
        last = self.last
        if last is not None and last.shape == (rows, columns) and last.dtype == like.dtype:
            return last
        size = rows * columns
        if self.flat is None or self.flat.numel() < size or self.flat.dtype != like.dtype:
            self.flat = like.new_empty(size)
        self.last = self.flat[:size].view(rows, columns)
        return self.last


class _BlockCounts:
    """One block's counts in count_ranks, made one item chunk at a time."""

    def __init__(self, score_parts: ScoreParts, targets: torch.Tensor,
                 bounds: list[tuple[int, int]], chunk: int,
                 excluded: tuple[torch.Tensor, torch.Tensor] | None, room: int,
                 buffer: TileBuffer | None = None) -> None:
        n_points, device = len(targets), targets.device
        self.n_points, self.score_parts, self.excluded = n_points, score_parts, excluded
        self.greater = torch.zeros(n_points, dtype=torch.int32, device=device)
        self.equal = torch.full((n_points,), -1, dtype=torch.int32, device=device)  # − target
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if n_points == 0:
            return
        self.kept, self.target_scores = _target_scores(
            score_parts, targets, bounds, chunk, room, buffer if device.type == "cpu" else None)
        dtype = self.target_scores.dtype
        self.compiled = (cpu_kernels.active("dense_counts", device)
                         and dtype in (torch.float32, torch.float64))
        # _tile_counts' own arguments, made once rather than once per tile; a chunk without
        # a bias is counted against zeros (s + 0 compares as s, and NaN stays NaN)
        self.tile_arguments = (self.target_scores.view(-1).numpy(), self.greater.numpy(),
                               self.equal.numpy()) if self.compiled else ()
        self.zeros = torch.zeros(chunk, dtype=dtype) if self.compiled else None
        # Row sums of sign(s − t) over all tiles: exact integers, in float64 across tiles.
        self.net = torch.zeros(n_points, dtype=torch.float64, device=device)
        self.moved = torch.zeros_like(self.net)
        # One buffer for the differences of every tile, not a new [P, chunk] tensor per tile.
        self.differences = None if self.compiled else self.target_scores.new_empty(
            n_points, min(chunk, bounds[-1][1], SIGN_COLUMNS))

    def count(self, index: int, lo: int, hi: int, buffer: TileBuffer) -> None:
        """Count chunk `index` (items lo..hi-1), its product in `buffer` on a CPU."""
        if self.n_points == 0:
            return
        if index in self.kept:
            product, bias = self.kept.pop(index)
        else:
            out = (buffer.take(self.n_points, hi - lo, self.target_scores)
                   if self.compiled else None)
            product, bias = self.score_parts(lo, hi, out)
        if self.compiled:
            added = self.zeros[:hi - lo] if bias is None else bias
            if _tile_counts(product.detach().numpy(), added.detach().numpy(),
                            *self.tile_arguments):
                check_finite(product + added)
        else:  # the scores made whole, then sums of signs
            product, bias = (product if bias is None else product + bias), None
            _sign_sums(product, self.target_scores, self.differences, self.net, self.moved)
        if self.excluded is not None:
            _uncount(product, bias, self.target_scores, self.excluded, lo, hi, self.greater,
                     self.equal)

    def totals(self, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(greater, equal) once every chunk is counted."""
        if self.n_points and not self.compiled:
            # sign(s − t) sums to (above − below), its absolute value to (above + below)
            self.greater += ((self.net + self.moved) / 2).to(torch.int32)
            self.equal += (n_items - self.moved).to(torch.int32)
        return self.greater, self.equal


# Score elements of first-pass chunks kept for the second pass, per group of blocks (32 MB;
# a CPU tile's product costs more than reading it back): beyond them, chunks are scored again.
KEPT_SCORES = 1 << 23


def _target_scores(score_parts: ScoreParts, targets: torch.Tensor,
                   bounds: list[tuple[int, int]], chunk: int, room: int = KEPT_SCORES,
                   buffer: TileBuffer | None = None
                   ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor | None]],
                              torch.Tensor]:
    """({chunk index: its (product, bias)} of the first-pass chunks kept, within `room`
    elements, [P, 1] target scores): each point's target score read from the chunk that holds
    its target, the points sorted by that chunk once, then one gather per chunk. A single
    chunk is always kept (scored once). The products of chunks not kept go into `buffer`,
    where given, once the first product has told the scores' dtype: one buffer, as in the
    second pass, not a fresh tile per chunk (blocks of one key, KeyRowScores, have their
    targets in tens of tiles)."""
    n_points = len(targets)
    if len(bounds) == 1:  # the usual case on a GPU: no sort, and no wait to learn the sizes
        by_tile, per_tile = torch.arange(n_points, device=targets.device), [n_points]
    else:
        tile = torch.div(targets, chunk, rounding_mode="floor")
        by_tile = torch.argsort(tile, stable=True)
        per_tile = torch.bincount(tile, minlength=len(bounds)).tolist()
    kept: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    target_scores = None
    first = 0
    for index, ((lo, hi), count) in enumerate(zip(bounds, per_tile, strict=True)):
        if count == 0:
            continue
        points = by_tile[first:first + count]
        first += count
        size = n_points * (hi - lo)
        keep = len(bounds) == 1 or size <= room
        out = (None if keep or buffer is None or target_scores is None
               else buffer.take(n_points, hi - lo, target_scores))
        product, bias = score_parts(lo, hi, out)
        if keep:
            kept[index] = product, bias
            room -= size
        if target_scores is None:  # in the scores' dtype: float64 ties must stay ties
            target_scores = product.new_empty(n_points, 1)
        target_scores[points, 0] = _scores_at(product, bias, points, targets[points] - lo)
    return kept, target_scores


def _scores_at(product: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
               columns: torch.Tensor) -> torch.Tensor:
    """The scores product[rows, columns] (+ bias[columns]), each sum rounded as
    _tile_counts rounds it."""
    found = product[rows, columns]
    return found if bias is None else found + bias[columns]


@numba.njit(nogil=True, cache=True)
def _tile_counts(product: np.ndarray, bias: np.ndarray, target_scores: np.ndarray,
                 greater: np.ndarray, equal: np.ndarray) -> bool:
    """count_ranks's counts of one chunk on a CPU, in one pass over its scores
    product[p, j] + bias[j] ([P, C] and [C], the sum rounded in their dtype, as torch's `+`
    rounds it): greater[p] += #scores of row p above target_scores[p], equal[p] += #level with
    it (comparisons, exact; a tie at ±inf is level, as sign(inf − inf) = 0 makes it in
    _sign_sums). True if a score is NaN. No GIL: the evaluator's threads count their blocks
    side by side."""
    nan = False
    for p in range(product.shape[0]):
        target = target_scores[p]
        above = level = 0
        odd = False
        for j in range(product.shape[1]):
            score = product[p, j] + bias[j]
            above += score > target
            level += score == target
            odd |= score != score
        greater[p] += above
        equal[p] += level
        nan |= odd
    return nan


def _uncount(product: torch.Tensor, bias: torch.Tensor | None, target_scores: torch.Tensor,
             excluded: tuple[torch.Tensor, torch.Tensor], lo: int, hi: int,
             greater: torch.Tensor, equal: torch.Tensor) -> None:
    """Take the excluded items of columns lo..hi-1 back out of the counts (in place); the
    scores are `product` (+ `bias` per column when given)."""
    point, item = excluded
    inside = (item >= lo) & (item < hi)
    point, item = point[inside], item[inside] - lo
    _take_back(greater, equal, point, _scores_at(product, bias, point, item),
               target_scores[point, 0])


def _take_back(greater: torch.Tensor, equal: torch.Tensor, point: torch.Tensor,
               score: torch.Tensor, target: torch.Tensor) -> None:
    """Excluded items out of the counts (in place): an item scoring `score` for `point`,
    whose target scores `target`, is one less above it, or one less level with it."""
    for counts, taken in ((greater, point[score > target]), (equal, point[score == target])):
        counts.index_add_(0, taken, torch.ones_like(taken, dtype=counts.dtype), alpha=-1)


def count_sparse_ranks(
    shared: torch.Tensor, ordered: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor,
    scores: torch.Tensor, excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The counts of `count_ranks` for scores = `shared` [N] except entries [P, W]: point p
    scores item ids[p, w] at scores[p, w] (each item at most once a row, id -1 pads).
    `ordered` = `shared` sorted. `excluded` as for count_ranks.

    Two binary searches in `ordered` count the shared scores above and level with the
    target's score; each entry then moves its item from its shared score to its own score
    (take its shared comparison out, put its own in), and each excluded item is taken out at
    the score it has for that point. Comparisons only: the counts are those of count_ranks.
    """
    n_points = len(targets)
    own = scores.to(shared.dtype)
    if cpu_kernels.active("sparse_entries", ids.device) and ids.shape[1]:
        target_score = shared[targets]
        moved = torch.zeros(2, n_points, dtype=torch.int32)
        numba.set_num_threads(knn_kernels.thread_count(torch.get_num_threads()))
        if _entry_moves(shared.numpy(), own.numpy(), ids.numpy(), targets.numpy(),
                        target_score.numpy(), moved.numpy()):
            check_finite(torch.where(ids >= 0, own, 0.0))
        greater, equal = _shared_counts(ordered, target_score)
        greater += moved[0]
        equal += moved[1]
    else:
        greater, equal, target_score = _tensor_counts(ordered, targets, ids, own, shared)
    if excluded is not None and n_points:
        point, item = excluded
        _take_back(greater, equal, point, _excluded_scores(shared, ids, own, point, item),
                   target_score[point])
    return greater, equal


def _shared_counts(ordered: torch.Tensor, target_score: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two binary searches in the sorted shared scores: how many lie above and level with
    each target score (less the target itself); row by row where `ordered` [R, N] and
    `target_score` [R, M] are rows."""
    level_or_below = torch.searchsorted(ordered, target_score, right=True)
    below = torch.searchsorted(ordered, target_score)
    return ((ordered.shape[-1] - level_or_below).to(torch.int32),
            (level_or_below - below - 1).to(torch.int32))


def _tensor_counts(ordered: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor,
                   scores: torch.Tensor, shared: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """count_sparse_ranks' counts and target scores in whole-tensor operations (any device)."""
    base = shared[ids.clamp_min(0)]
    # a padding entry "moves" its item from the shared score to the same score: no change
    own = torch.where(ids >= 0, scores, base)
    if torch.isnan(own.sum()):
        check_finite(own)
    target_score = shared[targets]
    if ids.shape[1]:
        at_target = ids == targets[:, None]
        column = at_target.to(torch.int8).argmax(1, keepdim=True)
        target_score = torch.where(at_target.any(1), own.gather(1, column)[:, 0], target_score)
    greater, equal = _shared_counts(ordered, target_score)
    if ids.shape[1]:
        point_score = target_score[:, None]
        greater += ((own > point_score).sum(1, dtype=torch.int32)
                    - (base > point_score).sum(1, dtype=torch.int32))
        equal += ((own == point_score).sum(1, dtype=torch.int32)
                  - (base == point_score).sum(1, dtype=torch.int32))
    return greater, equal, target_score


@numba.njit(parallel=True, cache=True)
def _entry_moves(shared: np.ndarray, own: np.ndarray, ids: np.ndarray, targets: np.ndarray,
                 target_score: np.ndarray, moved: np.ndarray) -> bool:
    """_tensor_counts' entry terms on a CPU, one point at a time in compiled code (no
    whole-tensor gathers and temporaries), the points shared among numba's threads (each
    point's terms are its own): target_score[p] becomes the target's entry score where the
    point has one; moved[0, p] / moved[1, p] = how many of its entries move their item above
    / level with it (own score against shared score; padding, id -1, is skipped). True if an
    entry's score is NaN."""
    nan = 0
    for p in numba.prange(ids.shape[0]):
        score = target_score[p]
        for w in range(ids.shape[1]):
            if ids[p, w] == targets[p]:
                score = own[p, w]
                break
        target_score[p] = score
        above = level = 0
        for w in range(ids.shape[1]):
            item = ids[p, w]
            if item < 0:
                continue
            nan += own[p, w] != own[p, w]
            base = shared[item]
            above += (own[p, w] > score) - (base > score)
            level += (own[p, w] == score) - (base == score)
        moved[0, p] = above
        moved[1, p] = level
    return nan > 0


def _excluded_scores(shared: torch.Tensor, ids: torch.Tensor, own: torch.Tensor,
                     point: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """The score each excluded (point, item) pair has: its entry's if the point has one for
    the item, else the shared score (entries found by binary search in their sorted keys)."""
    score = shared[item]
    if ids.numel() == 0 or len(point) == 0:
        return score
    n_items = len(shared)
    rows = torch.arange(len(ids), device=ids.device)[:, None]
    keys = torch.where(ids >= 0, rows * n_items + ids, -1).flatten()
    keys, order = torch.sort(keys)
    wanted = point * n_items + item
    at = torch.searchsorted(keys, wanted).clamp_max(len(keys) - 1)
    found = keys[at] == wanted
    return torch.where(found, own.flatten()[order[at]].to(shared.dtype), score)


# Rows of a sparse table sorted at a time: their int64 scratch (a few MB) stays in cache, where
# whole-table temporaries of a LastFM-sized catalogue (~1 GB each) are paged in pass by pass.
TABLE_CHUNK_ROWS = 2048


class SparseTable(NamedTuple):
    """A table of sparse entries ([R, W] ids, -1 padding, and scores) prepared for counting
    (`prepare_table`): per row, its entries' ids ascending with their scores (padding: id
    n_items, last), and the scores at which the row's entries move their items, sorted: each
    entry's own score (weight +1) and its item's shared score (weight -1), padding at +inf
    (weight 0), with the prefix sums of the weights (prefix[r, j] = sum of the first j)."""

    ids: torch.Tensor  # [R, 2^a - 1] >= W columns, int32
    scores: torch.Tensor  # [R, 2^a - 1], in ids' order
    moves: torch.Tensor  # [R, 2^b - 1] >= 2W columns, ascending
    prefix: torch.Tensor  # [R, 2^b]


def prepare_table(shared: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor,
                  out: SparseTable | None = None) -> SparseTable:
    """The SparseTable of entries (ids, scores) [R, W] over `shared` [N] (NaN refused),
    written into `out` when given (R rows of empty_table(_, W, shared)'s widths). Rows are
    padded to a width of 2^m - 1, so that a binary search never leaves its row."""
    valid = ids >= 0
    own = scores.to(shared.dtype)
    if own.numel():
        check_finite(torch.where(valid, own, 0.0))
    base = shared.index_select(0, ids.clamp_min(0).flatten()).view(ids.shape)
    out = empty_table(len(ids), ids.shape[1], shared) if out is None else out
    if shared.dtype == torch.float32 and shared.device.type == "cpu":
        _packed_table(ids, own, base, len(shared), out)
        return out
    for part in _row_chunks(len(ids)):  # chunks: temporaries that stay in cache
        row_ids, row_scores, moves, weights = _sorted_rows(valid[part], ids[part], own[part],
                                                           base[part], len(shared))
        out.ids[part], out.scores[part], out.moves[part] = row_ids, row_scores, moves
        out.prefix[part] = torch.nn.functional.pad(weights.cumsum(1, dtype=weights.dtype),
                                                   (1, 0))
    return out


def empty_table(rows: int, width: int, shared: torch.Tensor) -> SparseTable:
    """An unfilled SparseTable of `rows` rows for entries `width` wide, in `shared`'s dtype
    and device (torch.empty: memory is taken as the rows are written)."""
    id_width, move_width = (1 << width.bit_length()) - 1, (1 << (2 * width).bit_length()) - 1
    return SparseTable(
        torch.empty((rows, id_width), dtype=torch.int32, device=shared.device),
        torch.empty((rows, id_width), dtype=shared.dtype, device=shared.device),
        torch.empty((rows, move_width), dtype=shared.dtype, device=shared.device),
        torch.empty((rows, move_width + 1), dtype=_weight_type(move_width),
                    device=shared.device))


class RowTable:
    """A model's fixed table of sparse entries (Recommender.table_rows), each row prepared
    (prepare_table) the first time a point names it: an evaluation prepares the rows its
    points name, not the whole table. Rows are stored in the order they come, `slots` maps
    a row to its place; the storage is allocated once at the whole table's size and takes
    memory as rows fill it."""

    def __init__(self, shared: torch.Tensor, n_rows: int) -> None:
        self.shared = shared
        self.slots = torch.full((n_rows,), -1, dtype=torch.int64, device=shared.device)
        self.storage: SparseTable | None = None
        self.width = self.size = 0

    def prepared(self, rows: torch.Tensor,
                 entries: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[SparseTable, torch.Tensor]:
        """(the table of the rows prepared so far, each point's place in it) for points
        naming `rows` [P]; `entries(points)` gives ([len(points), W] ids, scores) of the
        points at those indices, asked for one point of each row not prepared yet."""
        missing = (self.slots[rows] < 0).nonzero()[:, 0]
        if len(missing):
            new, first, _ = distinct_keys(rows[missing])
            ids, scores = entries(missing[first])
            if self.storage is None:
                self.width = ids.shape[1]
                self.storage = empty_table(len(self.slots), self.width, self.shared)
            if ids.shape[1] != self.width:
                raise ValueError("a table's sparse_scores must keep one width for every row")
            stop = self.size + len(new)
            prepare_table(self.shared, ids, scores,
                          SparseTable(*(column[self.size:stop] for column in self.storage)))
            self.slots[new] = torch.arange(self.size, stop, device=self.slots.device)
            self.size = stop
        if self.storage is None:  # no point yet
            return empty_table(0, 0, self.shared), self.slots[rows]
        return SparseTable(*(column[:self.size] for column in self.storage)), self.slots[rows]


def distinct_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the distinct keys ascending, the index of each one's first occurrence in `keys`, the
    place of each element of `keys` among the distinct ones)."""
    distinct, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full_like(distinct, len(keys)).scatter_reduce_(
        0, inverse, torch.arange(len(keys), device=keys.device), "amin")
    return distinct, first, inverse


def _row_chunks(rows: int) -> list[slice]:
    """Slices of TABLE_CHUNK_ROWS rows covering `rows` (one empty slice for none)."""
    return [slice(lo, lo + TABLE_CHUNK_ROWS) for lo in range(0, max(rows, 1), TABLE_CHUNK_ROWS)]


def _sorted_rows(valid: torch.Tensor, ids: torch.Tensor, own: torch.Tensor,
                 base: torch.Tensor, n_items: int) -> tuple[torch.Tensor, ...]:
    """The rows of a SparseTable before the prefix sums: (ids ascending, their scores, moves
    ascending, their weights), padded (torch's row sorts)."""
    row_ids, order = torch.where(valid, ids, n_items).to(torch.int32).sort(1)
    padding = torch.tensor(torch.inf, dtype=own.dtype, device=own.device)
    moves = torch.cat([torch.where(valid, own, padding), torch.where(valid, base, padding)], 1)
    weights = torch.cat([valid, valid], 1).to(_weight_type(moves.shape[1]))
    weights[:, ids.shape[1]:] *= -1
    moves, by_score = moves.sort(1)
    return (_pad_columns(row_ids, n_items), _pad_columns(own.gather(1, order), 0),
            _pad_columns(moves, torch.inf), _pad_columns(weights.gather(1, by_score), 0))


def _packed_table(ids: torch.Tensor, own: torch.Tensor, base: torch.Tensor,
                  n_items: int, out: SparseTable) -> None:
    """prepare_table for float32 scores on a CPU: each entry packed into one int64 (an id
    above its score's bits; a move's score, as an int32 of the same order, above a 2-bit
    weight tag) by a compiled kernel, the rows sorted by numpy's vectorised sort (several
    times faster than argsorts and gathers, benchmarks.md) and unpacked into the table,
    prefix sums included, by another, TABLE_CHUNK_ROWS rows at a time, into `out`. Equal
    scores may come in any order: the counts read the moves only at the ends of runs of
    equal scores."""
    rows = len(ids)
    table = SparseTable(*(column.numpy() for column in out))
    by_id = np.empty((min(rows, TABLE_CHUNK_ROWS), table.ids.shape[1]), np.int64)
    by_move = np.empty((len(by_id), table.moves.shape[1]), np.int64)
    ids, own, base = ids.numpy(), own.numpy().view(np.int32), base.numpy().view(np.int32)
    for lo in range(0, rows, TABLE_CHUNK_ROWS):
        part, n = slice(lo, lo + TABLE_CHUNK_ROWS), min(TABLE_CHUNK_ROWS, rows - lo)
        _pack_rows(ids[part], own[part], base[part], n_items, by_id[:n], by_move[:n])
        by_id[:n].sort(axis=1)
        by_move[:n].sort(axis=1)
        _unpack_rows(by_id[:n], by_move[:n], table.ids[part], table.scores[part].view(np.int32),
                     table.moves[part].view(np.int32), table.prefix[part])


@numba.njit(parallel=True, cache=True)
def _pack_rows(ids: np.ndarray, own: np.ndarray, base: np.ndarray, n_items: int,
               by_id: np.ndarray, by_move: np.ndarray) -> None:
    """_packed_table's keys of each row: by_id = id << 32 | own's bits (padding: n_items <<
    32); by_move = the order-keeping int of own << 2 | 2 (weight +1) and of base << 2 | 0
    (weight -1), padding +inf << 2 | 1 (weight 0). `own` and `base`: float32 bits as int32."""
    width = ids.shape[1]
    pad_move = _ordered_int(np.int32(0x7F800000)) << 2 | 1  # +inf, weight 0
    for r in numba.prange(ids.shape[0]):
        for w in range(width):
            if ids[r, w] >= 0:
                by_id[r, w] = np.int64(ids[r, w]) << 32 | (np.int64(own[r, w]) & 0xFFFFFFFF)
                by_move[r, w] = _ordered_int(own[r, w]) << 2 | 2
                by_move[r, width + w] = _ordered_int(base[r, w]) << 2
            else:
                by_id[r, w] = np.int64(n_items) << 32
                by_move[r, w] = by_move[r, width + w] = pad_move
        by_id[r, width:] = np.int64(n_items) << 32
        by_move[r, 2 * width:] = pad_move


@numba.njit(cache=True)
def _ordered_int(bits: np.int32) -> np.int64:
    """float32 bits -> int64 in the float's order (-0.0 just below 0.0): a negative number's
    magnitude bits flipped. Its own inverse on int32."""
    return np.int64(bits ^ ((bits >> 31) & 0x7FFFFFFF))


@numba.njit(parallel=True, cache=True)
def _unpack_rows(by_id: np.ndarray, by_move: np.ndarray, ids: np.ndarray, scores: np.ndarray,
                 moves: np.ndarray, prefix: np.ndarray) -> None:
    """The sorted keys of _pack_rows into the table's rows (`scores`, `moves`: float32 bits
    as int32), with the prefix sums of the weights."""
    for r in numba.prange(by_id.shape[0]):
        for w in range(by_id.shape[1]):
            ids[r, w] = np.int32(by_id[r, w] >> 32)
            scores[r, w] = np.int32(by_id[r, w] & 0xFFFFFFFF)
        prefix[r, 0] = 0
        for w in range(by_move.shape[1]):
            key = by_move[r, w]
            moves[r, w] = np.int32(_ordered_int(np.int32(key >> 2)))
            prefix[r, w + 1] = prefix[r, w] + (key & 3) - 1


def _weight_type(width: int) -> torch.dtype:
    return torch.int16 if width < 2**15 else torch.int32


def _pad_columns(table: torch.Tensor, value: float) -> torch.Tensor:
    """`table` [R, W] widened to 2^m - 1 columns with `value`."""
    width = (1 << table.shape[1].bit_length()) - 1
    return torch.nn.functional.pad(table, (0, width - table.shape[1]), value=value)


def count_table_ranks(
    shared: torch.Tensor, ordered: torch.Tensor, table: SparseTable, rows: torch.Tensor,
    targets: torch.Tensor, excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The counts of `count_sparse_ranks` for points whose entries are the rows `rows` [P] of
    `table`. The target's score is its row's entry (a binary search in the row's ids), else
    its shared score; two binary searches in `ordered` count the shared scores above and level
    with it, and two in the row's moves give, through the prefix sums, how many of the row's
    items move above it (sum of the weights of moves above) and level with it. Comparisons
    only: the counts are those of count_ranks. `excluded` as for count_ranks."""
    target_score = _table_scores(shared, table, rows, targets)
    greater, equal = _shared_counts(ordered, target_score)
    if table.ids.shape[1]:
        width = table.prefix.shape[1]
        prefix, start = table.prefix.flatten(), rows * width
        at_most = prefix.index_select(0, start + _row_counts(table.moves, rows, target_score,
                                                             True))
        less = prefix.index_select(0, start + _row_counts(table.moves, rows, target_score,
                                                          False))
        greater -= at_most.to(torch.int32)  # the row's weights sum to 0
        equal += (at_most - less).to(torch.int32)
    if excluded is not None and len(targets):
        point, item = excluded
        _take_back(greater, equal, point, _table_scores(shared, table, rows[point], item),
                   target_score[point])
    return greater, equal


def count_row_ranks(
    rows: torch.Tensor, row_of_point: torch.Tensor, targets: torch.Tensor,
    excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The counts of `count_ranks` for points that share whole score rows: point p scores the
    items as rows[row_of_point[p]] ([R, N]; e.g. every point of a user where scores depend on
    the user alone). Each row is sorted once; a point then costs two binary searches in its
    row for its target's score, read from that same row: comparisons only, the counts are
    those of count_ranks. `excluded` as for count_ranks."""
    check_finite(rows)
    target_score = rows[row_of_point, targets]
    # each row's points side by side, padded to the longest: one search of a [R, M] table
    by_row = torch.argsort(row_of_point, stable=True)
    per_row = torch.bincount(row_of_point, minlength=len(rows))
    row = row_of_point[by_row]
    column = torch.arange(len(by_row), device=rows.device) - (per_row.cumsum(0) - per_row)[row]
    values = rows.new_zeros(len(rows), int(per_row.max()) if len(by_row) else 0)
    values[row, column] = target_score[by_row]
    greater, equal = torch.empty_like(targets, dtype=torch.int32), torch.empty_like(
        targets, dtype=torch.int32)
    above, level = _shared_counts(sort_rows(rows), values)
    greater[by_row], equal[by_row] = above[row, column], level[row, column]
    if excluded is not None and len(targets):
        point, item = excluded
        _take_back(greater, equal, point, rows[row_of_point[point], item], target_score[point])
    return greater, equal


def sort_rows(scores: torch.Tensor) -> torch.Tensor:
    """`scores` [..., N] sorted along the last dimension: by numpy's vectorised sort for
    float32 and float64 on a CPU (9-23 times torch's sort there, docs/benchmarks.md), by
    torch's elsewhere. Equal scores (0.0 and -0.0 among them) may come in any order."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(scores.detach().numpy(), axis=-1))
    return torch.sort(scores, dim=-1).values


def _table_scores(shared: torch.Tensor, table: SparseTable, rows: torch.Tensor,
                  items: torch.Tensor) -> torch.Tensor:
    """The score of each item for its row: the row's entry for it if any, else shared."""
    score = shared[items]
    width = table.ids.shape[1]
    if width == 0 or len(items) == 0:
        return score
    at = rows * width + _row_counts(table.ids, rows, items, False).clamp_max(width - 1)
    found = table.ids.flatten().index_select(0, at) == items
    return torch.where(found, table.scores.flatten().index_select(0, at), score)


def _row_counts(table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                right: bool) -> torch.Tensor:
    """Per point, how many entries of its row of `table` [R, 2^m - 1] (ascending rows) are
    below its value (at most its value with `right`): a branchless binary search, one gather
    a step, never past the row's end."""
    flat = table.flatten()
    start = rows * table.shape[1] - 1
    count = torch.zeros_like(rows)
    step = (table.shape[1] + 1) // 2
    while step:
        probe = count + step
        entry = flat.index_select(0, start + probe)
        count = torch.where((entry <= values) if right else (entry < values), probe, count)
        step //= 2
    return count


# Columns per float32 sum of signs: exact while partial sums stay below 2**24.
SIGN_COLUMNS = 1 << 24


def _sign_sums(scores: torch.Tensor, target_scores: torch.Tensor, differences: torch.Tensor,
               net: torch.Tensor, moved: torch.Tensor) -> None:
    """Add, per row, the sum of sign(s − t) (= above − below the row's target score t) to `net`
    and the sum of |sign(s − t)| (= above + below) to `moved`: one pass each instead of two
    comparisons. sign(s − t) is 0 exactly when s = t: subnormal differences stay nonzero
    (torch.set_flush_denormal(True), which seqexp never sets, would make them ties), and a tie
    at ±inf gives sign(NaN) = 0. NaN scores are an error (SeqexpError). `differences` is
    scratch space of at least [P, min(width, SIGN_COLUMNS)]."""
    for lo in range(0, scores.shape[1], SIGN_COLUMNS):
        part = scores[:, lo:lo + SIGN_COLUMNS]
        # into the scratch buffer, never in place: a model may return a view of its tensors
        difference = torch.sub(part, target_scores, out=differences[:, :part.shape[1]])
        # A NaN score makes the sum of the differences NaN (and so do +inf and −inf
        # differences side by side, hence the check of the scores themselves): one pass over
        # the differences while they are in cache, not one over the scores.
        if torch.isnan(difference.sum()):
            check_finite(part)
        sign = difference.sign_()
        net += sign.sum(1, dtype=torch.float32)  # float32 for bf16/fp16 too
        moved += sign.abs_().sum(1, dtype=torch.float32)


def check_finite(scores: torch.Tensor) -> None:
    """Refuse NaN scores, which would otherwise rank the target first."""
    # A NaN compares false with everything and would rank the target first. (amax propagates
    # NaN and reads without writing a mask: cheaper than isnan().any().)
    if torch.isnan(scores.amax()):
        raise SeqexpError("the model produced NaN scores; lower train.lr or check the data")
