"""The rank-counting kernel: for each prediction point, how many items score above and level
with its target, over blocks of item scores, without sorting (seqexp.engine.evaluator)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from seqexp.core.errors import SeqexpError


def count_ranks(
    score_block: Callable[[int, int], torch.Tensor], targets: torch.Tensor, n_items: int,
    chunk: int, excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greater/equal counts for one batch of prediction points, scoring items `chunk` at a time.

    When the catalogue fits one chunk it is scored once; otherwise a first pass collects the
    target scores and a second scores the chunks again to count against them. Either way each
    target score is read from the same product as the scores it is compared with. `excluded` =
    (point, item) pairs, distinct and never a point's own target, of items that are not ranked
    for that point (eval.exclude_seen): they are counted like every other item, then taken back
    out.
    """
    n_points = len(targets)
    if n_points == 0:
        empty = torch.zeros(0, dtype=torch.int32, device=targets.device)
        return empty, empty.clone()
    bounds = [(lo, min(lo + chunk, n_items)) for lo in range(0, n_items, chunk)]
    kept = [score_block(0, n_items)] if len(bounds) == 1 else None
    # Each point's target score, read from the tile that holds its target: the points sorted
    # by that tile once, then one gather per tile.
    if len(bounds) == 1:  # the usual case on a GPU: no sort, and no wait to learn the sizes
        by_tile, per_tile = torch.arange(n_points, device=targets.device), [n_points]
    else:
        tile = torch.div(targets, chunk, rounding_mode="floor")
        by_tile = torch.argsort(tile, stable=True)
        per_tile = torch.bincount(tile, minlength=len(bounds)).tolist()
    target_scores = None
    first = 0
    for index, ((lo, hi), count) in enumerate(zip(bounds, per_tile, strict=True)):
        if count == 0:
            continue
        points = by_tile[first:first + count]
        first += count
        scores = kept[index] if kept is not None else score_block(lo, hi)
        if target_scores is None:  # in the scores' dtype: float64 ties must stay ties
            target_scores = scores.new_empty(n_points, 1)
        target_scores[points, 0] = scores[points, targets[points] - lo]
    # Row sums of sign(s − t) over all tiles: exact integers, in float64 across tiles.
    net = torch.zeros(n_points, dtype=torch.float64, device=targets.device)
    moved = torch.zeros_like(net)
    # One buffer for the differences of every tile, not a new [P, chunk] tensor per tile.
    differences = target_scores.new_empty(n_points, min(chunk, n_items, SIGN_COLUMNS))
    greater = torch.zeros(n_points, dtype=torch.int32, device=targets.device)
    equal = torch.full((n_points,), -1, dtype=torch.int32, device=targets.device)  # − target
    for index, (lo, hi) in enumerate(bounds):
        scores = kept[index] if kept is not None else score_block(lo, hi)
        _sign_sums(scores, target_scores, differences, net, moved)
        if excluded is not None:
            _uncount(scores, target_scores, excluded, lo, hi, greater, equal)
    # sign(s − t) sums to (above − below), its absolute value to (above + below)
    greater += ((net + moved) / 2).to(torch.int32)
    equal += (n_items - moved).to(torch.int32)
    return greater, equal


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
