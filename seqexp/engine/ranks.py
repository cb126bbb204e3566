"""The rank-counting kernels: for each prediction point, how many items score above and level
with its target (seqexp.engine.evaluator). `count_ranks` reads dense blocks of item scores,
without sorting; `count_sparse_ranks` reads a score vector shared by every point, sorted once,
and a few entries per point that differ from it; `count_table_ranks` the same when each point's
entries are one row of a fixed table, prepared once (`SparseTable`), so that a point costs a
few binary searches in its row instead of a pass over its entries."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numba
import numpy as np
import torch

from seqexp.core.errors import SeqexpError
from seqexp.models import cpu_kernels


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
    n_points = len(targets)
    if n_points == 0:
        empty = torch.zeros(0, dtype=torch.int32, device=targets.device)
        return empty, empty.clone()
    bounds = [(lo, min(lo + chunk, n_items)) for lo in range(0, n_items, chunk)]
    kept, target_scores = _target_scores(score_block, targets, bounds, chunk)
    compiled = (cpu_kernels.active("dense_counts", targets.device)
                and target_scores.dtype in (torch.float32, torch.float64))
    greater = torch.zeros(n_points, dtype=torch.int32, device=targets.device)
    equal = torch.full((n_points,), -1, dtype=torch.int32, device=targets.device)  # − target
    # Row sums of sign(s − t) over all tiles: exact integers, in float64 across tiles.
    net = torch.zeros(n_points, dtype=torch.float64, device=targets.device)
    moved = torch.zeros_like(net)
    # One buffer for the differences of every tile, not a new [P, chunk] tensor per tile.
    differences = None if compiled else target_scores.new_empty(
        n_points, min(chunk, n_items, SIGN_COLUMNS))
    for index, (lo, hi) in enumerate(bounds):
        scores = kept.pop(index) if index in kept else score_block(lo, hi)
        if compiled:
            if _tile_counts(scores.detach().numpy(), target_scores.view(-1).numpy(),
                            greater.numpy(), equal.numpy()):
                check_finite(scores)
        else:
            _sign_sums(scores, target_scores, differences, net, moved)
        if excluded is not None:
            _uncount(scores, target_scores, excluded, lo, hi, greater, equal)
    if not compiled:  # sign(s − t) sums to (above − below), its absolute value to (above + below)
        greater += ((net + moved) / 2).to(torch.int32)
        equal += (n_items - moved).to(torch.int32)
    return greater, equal


# Score elements of a block's first-pass chunks kept for its second pass (32 MB of float32;
# a CPU tile's product costs more than reading it back): beyond them, chunks are scored again.
KEPT_SCORES = 1 << 23


def _target_scores(score_block: Callable[[int, int], torch.Tensor], targets: torch.Tensor,
                   bounds: list[tuple[int, int]], chunk: int
                   ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({chunk index: its scores} of the first-pass chunks kept, [P, 1] target scores): each
    point's target score read from the chunk that holds its target, the points sorted by that
    chunk once, then one gather per chunk. A single chunk is always kept (scored once)."""
    n_points = len(targets)
    if len(bounds) == 1:  # the usual case on a GPU: no sort, and no wait to learn the sizes
        by_tile, per_tile = torch.arange(n_points, device=targets.device), [n_points]
    else:
        tile = torch.div(targets, chunk, rounding_mode="floor")
        by_tile = torch.argsort(tile, stable=True)
        per_tile = torch.bincount(tile, minlength=len(bounds)).tolist()
    kept: dict[int, torch.Tensor] = {}
    room = KEPT_SCORES
    target_scores = None
    first = 0
    for index, ((lo, hi), count) in enumerate(zip(bounds, per_tile, strict=True)):
        if count == 0:
            continue
        points = by_tile[first:first + count]
        first += count
        scores = score_block(lo, hi)
        if len(bounds) == 1 or scores.numel() <= room:
            kept[index] = scores
            room -= scores.numel()
        if target_scores is None:  # in the scores' dtype: float64 ties must stay ties
            target_scores = scores.new_empty(n_points, 1)
        target_scores[points, 0] = scores[points, targets[points] - lo]
    return kept, target_scores


@numba.njit(nogil=True, cache=True)
def _tile_counts(scores: np.ndarray, target_scores: np.ndarray, greater: np.ndarray,
                 equal: np.ndarray) -> bool:
    """count_ranks's counts of one chunk [P, C] on a CPU, in one pass: greater[p] += #scores
    of row p above target_scores[p], equal[p] += #level with it (comparisons, exact; a tie
    at ±inf is level, as sign(inf − inf) = 0 makes it in _sign_sums). True if a score is NaN.
    No GIL: the evaluator's threads count their blocks side by side."""
    nan = False
    for p in range(scores.shape[0]):
        target = target_scores[p]
        above = level = 0
        odd = False
        for j in range(scores.shape[1]):
            score = scores[p, j]
            above += score > target
            level += score == target
            odd |= score != score
        greater[p] += above
        equal[p] += level
        nan |= odd
    return nan


def _uncount(scores: torch.Tensor, target_scores: torch.Tensor,
             excluded: tuple[torch.Tensor, torch.Tensor], lo: int, hi: int,
             greater: torch.Tensor, equal: torch.Tensor) -> None:
    """Take the excluded items of columns lo..hi-1 back out of the counts (in place)."""
    point, item = excluded
    inside = (item >= lo) & (item < hi)
    point, item = point[inside], item[inside] - lo
    score, target = scores[point, item], target_scores[point, 0]
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
        score = _excluded_scores(shared, ids, own, point, item)
        target = target_score[point]
        for counts, taken in ((greater, point[score > target]), (equal, point[score == target])):
            counts.index_add_(0, taken, torch.ones_like(taken, dtype=counts.dtype), alpha=-1)
    return greater, equal


def _shared_counts(ordered: torch.Tensor, target_score: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two binary searches in the sorted shared scores: how many lie above and level with
    each target score (less the target itself)."""
    level_or_below = torch.searchsorted(ordered, target_score, right=True)
    below = torch.searchsorted(ordered, target_score)
    return ((len(ordered) - level_or_below).to(torch.int32),
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


@numba.njit(cache=True)
def _entry_moves(shared: np.ndarray, own: np.ndarray, ids: np.ndarray, targets: np.ndarray,
                 target_score: np.ndarray, moved: np.ndarray) -> bool:
    """_tensor_counts' entry terms on a CPU, one point at a time in compiled code (no
    whole-tensor gathers and temporaries): target_score[p] becomes the target's entry score
    where the point has one; moved[0, p] / moved[1, p] = how many of its entries move their
    item above / level with it (own score against shared score; padding, id -1, is skipped).
    True if an entry's score is NaN."""
    nan = False
    for p in range(ids.shape[0]):
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
            nan |= own[p, w] != own[p, w]
            base = shared[item]
            above += (own[p, w] > score) - (base > score)
            level += (own[p, w] == score) - (base == score)
        moved[0, p] = above
        moved[1, p] = level
    return nan


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
TABLE_CHUNK_ROWS = 8192


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


def prepare_table(shared: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor) -> SparseTable:
    """The SparseTable of entries (ids, scores) [R, W] over `shared` [N] (NaN refused). Rows
    are padded to a width of 2^m - 1, so that a binary search never leaves its row."""
    valid = ids >= 0
    own = scores.to(shared.dtype)
    if own.numel():
        check_finite(torch.where(valid, own, 0.0))
    base = shared.index_select(0, ids.clamp_min(0).flatten()).view(ids.shape)
    packed = shared.dtype == torch.float32 and shared.device.type == "cpu"
    sort_rows = _packed_sorted_rows if packed else _sorted_rows
    parts = [sort_rows(valid[part], ids[part], own[part], base[part], len(shared))
             for part in _row_chunks(len(ids))]  # chunks: temporaries that stay in cache
    row_ids, row_scores, moves, weights = (torch.cat(columns) for columns in zip(*parts,
                                                                                strict=True))
    prefix = torch.nn.functional.pad(weights.cumsum(1, dtype=weights.dtype), (1, 0))
    return SparseTable(row_ids, row_scores, moves, prefix)


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


def _packed_sorted_rows(valid: torch.Tensor, ids: torch.Tensor, own: torch.Tensor,
                        base: torch.Tensor, n_items: int) -> tuple[torch.Tensor, ...]:
    """_sorted_rows for float32 scores on a CPU: each entry packed into one int64 (an id
    above its score's bits; a move's score, as an int32 of the same order, above a 2-bit
    weight tag) and the rows sorted by numpy's vectorised sort, several times faster than
    argsorts and gathers (benchmarks.md). Equal scores may come in any order: the counts
    read the moves only at the ends of runs of equal scores."""
    rows, width = ids.shape
    valid, own, base = valid.numpy(), own.numpy(), base.numpy()
    by_id = np.full((rows, (1 << width.bit_length()) - 1), n_items << 32, dtype=np.int64)
    by_id[:, :width] = (np.where(valid, ids.numpy(), n_items) << 32) | own.view(np.uint32)
    by_id.sort(axis=1)
    pad = _ordered_bits(np.float32(np.inf)) << 2 | 1  # tag 1: weight 0
    moves = np.full((rows, (1 << (2 * width).bit_length()) - 1), pad, dtype=np.int64)
    moves[:, :width] = np.where(valid, _ordered_bits(own) << 2 | 2, pad)  # tag 2: +1
    moves[:, width:2 * width] = np.where(valid, _ordered_bits(base) << 2, pad)  # tag 0: -1
    moves.sort(axis=1)
    weights = ((moves & 3) - 1).astype(np.int16 if moves.shape[1] < 2**15 else np.int32)
    scores = (by_id & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    return tuple(torch.from_numpy(t) for t in (
        (by_id >> 32).astype(np.int32), scores, _float_of(moves >> 2), weights))


def _ordered_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> int64 in the same order (-0.0 just below 0.0): the bits, with a negative
    number's magnitude bits flipped."""
    bits = np.asarray(values, dtype=np.float32).view(np.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64)


def _float_of(ordered: np.ndarray) -> np.ndarray:
    """The inverse of _ordered_bits."""
    bits = ordered.astype(np.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(np.float32)


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
    level_or_below = torch.searchsorted(ordered, target_score, right=True)
    below = torch.searchsorted(ordered, target_score)
    greater = (len(shared) - level_or_below).to(torch.int32)
    equal = (level_or_below - below - 1).to(torch.int32)  # − the target itself
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
        score = _table_scores(shared, table, rows[point], item)
        target = target_score[point]
        for counts, taken in ((greater, point[score > target]), (equal, point[score == target])):
            counts.index_add_(0, taken, torch.ones_like(taken, dtype=counts.dtype), alpha=-1)
    return greater, equal


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
