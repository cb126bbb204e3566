"""The one evaluator: full-catalogue ranks by counting, for every model.

For a prediction point with target score s, let g = #items scoring strictly higher and
e = #other items scoring exactly s. Then
- pessimistic rank (the headline) = 1 + g + e, so constant scores rank last;
- optimistic rank = 1 + g (ties ignored);
- under random tie-breaking the rank is uniform on 1+g .. 1+g+e, and the metrics below are its
  exact expectations.
Recall@k = share of events with rank <= k; MRR@k = mean of 1/rank over events with rank <= k
(0 otherwise); NDCG@k = mean of 1/log2(1 + rank) over events with rank <= k (0 otherwise: one
relevant item, so the ideal DCG is 1); micro-averaged over events.

With `exclude_seen`, items the user had already interacted with before the prediction point are
not ranked, except the target itself: an event whose target was seen before stays a possible
hit (the usual protocol; ranking it unreachable would make every repeat a certain miss).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from seqexp.core.atomic import atomic_path
from seqexp.core.errors import SeqexpError
from seqexp.data.baskets import basket_starts, check_gap
from seqexp.data.batching import PredictionBatch, prediction_batches
from seqexp.data.sequences import SequenceData
from seqexp.models.base import Recommender


@dataclass
class RankCounts:
    """Per-event counts of items scoring above (`greater`) and level with (`equal`) the target,
    with who and what each event was when the evaluator knows it: the user, the position of the
    target in the user's sequence (0 = first event) and the target item."""

    greater: np.ndarray
    equal: np.ndarray
    users: np.ndarray | None = None
    positions: np.ndarray | None = None
    targets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.greater)

    def rank_pessimistic(self) -> np.ndarray:
        return 1 + self.greater + self.equal

    def rank_optimistic(self) -> np.ndarray:
        return 1 + self.greater

    def metrics(self, cutoffs: Sequence[int]) -> dict[str, float]:
        """mrr_at_k / recall_at_k / ndcg_at_k (pessimistic) plus _optimistic and _expected
        variants."""
        n = len(self)
        if n == 0:
            raise SeqexpError("no events to evaluate: the split left no targets")
        out: dict[str, float] = {}
        pess, opt = self.rank_pessimistic(), self.rank_optimistic()
        g, e = self.greater.astype(np.float64), self.equal.astype(np.float64)
        for k in cutoffs:
            for suffix, rank in (("", pess), ("_optimistic", opt)):
                hit = rank <= k
                out[f"recall_at_{k}{suffix}"] = float(hit.mean())
                out[f"mrr_at_{k}{suffix}"] = float(np.where(hit, 1.0 / rank, 0.0).sum() / n)
                gain = np.where(hit, 1.0 / np.log2(1.0 + np.minimum(rank, k)), 0.0)
                out[f"ndcg_at_{k}{suffix}"] = float(gain.sum() / n)
            # rank uniform on g+1 .. g+e+1: P(rank <= k), E[1/rank; rank <= k] and
            # E[1/log2(1 + rank); rank <= k] from cumulative sums over ranks 1..k
            recall = np.clip((k - g) / (e + 1.0), 0.0, 1.0)
            top = np.minimum(g + e + 1, k).astype(np.int64)
            low = np.minimum(g, k).astype(np.int64)
            for name, table in (("mrr", _harmonic(k)), ("ndcg", _discounts(k))):
                value = (table[top] - table[low]) / (e + 1.0)
                out[f"{name}_at_{k}_expected"] = float(np.maximum(value, 0.0).mean())
            out[f"recall_at_{k}_expected"] = float(recall.mean())
        out["n_events"] = float(n)
        return out

    def by_history(self, history: np.ndarray, cutoffs: Sequence[int]) -> dict[str, float]:
        """MRR/Recall/NDCG@k (pessimistic) per quartile of the users' history length:
        `history[u]` = training events of user u. Quartile edges are taken over the users that
        have events here; an event belongs to the quartile of its user (hist_q1 = shortest
        histories, a user at an edge goes to the lower quartile). Keys:
        hist_q<j>_{mrr,recall,ndcg}_at_<k>, hist_q<j>_n_events, hist_q<j>_max_train_events."""
        if self.users is None:
            raise ValueError("by_history needs the events' users")
        quartile, edges = history_quartiles(history, self.users)
        out: dict[str, float] = {}
        for j in range(4):
            members = quartile == j
            if not members.any():
                continue
            part = RankCounts(self.greater[members], self.equal[members])
            values = part.metrics(cutoffs)
            for key, value in values.items():
                if key == "n_events":
                    out[f"hist_q{j + 1}_n_events"] = value
                elif not key.endswith(("_optimistic", "_expected")):
                    out[f"hist_q{j + 1}_{key}"] = value
            out[f"hist_q{j + 1}_max_train_events"] = float(edges[j + 1])
        return out


def history_quartiles(history: np.ndarray, users: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Quartile (0..3) of each event's user by history length, and the five edges (min, the
    three quartile cuts, max) over the distinct users among `users`."""
    per_user = np.asarray(history)[np.unique(users)]
    edges = np.quantile(per_user, [0.0, 0.25, 0.5, 0.75, 1.0])
    quartile = np.searchsorted(edges[1:4], np.asarray(history)[users], side="left")
    return quartile, edges


def _harmonic(k: int) -> np.ndarray:
    """H[j] = sum_{r=1..j} 1/r for j = 0..k."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, k + 1))])


def _discounts(k: int) -> np.ndarray:
    """D[j] = sum_{r=1..j} 1/log2(1 + r) for j = 0..k."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])


def count_ranks(
    score_block: Callable[[int, int], torch.Tensor], targets: torch.Tensor, n_items: int,
    chunk: int, excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greater/equal counts for one batch of prediction points, scoring items `chunk` at a time.

    With `keep_scores` (or when the catalogue fits one chunk) every chunk is scored once and
    kept until its points' target scores are known; otherwise a first pass collects the target
    scores and a second scores the chunks again to count against them. Either way each target
    score is read from the same product as the scores it is compared with. `excluded` =
    (point, item) pairs, distinct and never a point's own target, of items that are not ranked
    for that point (eval.exclude_seen): they are counted like every other item, then taken back
    out.
    """
    n_points = len(targets)
    if n_points == 0:
        empty = torch.zeros(0, dtype=torch.int32, device=targets.device)
        return empty, empty.clone()
    bounds = [(lo, min(lo + chunk, n_items)) for lo in range(0, n_items, chunk)]
    kept = ([score_block(lo, hi) for lo, hi in bounds] if keep_scores or len(bounds) == 1
            else None)
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
            _check_finite(part)
        sign = difference.sign_()
        net += sign.sum(1, dtype=torch.float32)  # float32 for bf16/fp16 too
        moved += sign.abs_().sum(1, dtype=torch.float32)


def _check_finite(scores: torch.Tensor) -> None:
    # A NaN compares false with everything and would rank the target first. (amax propagates
    # NaN and reads without writing a mask: cheaper than isnan().any().)
    if torch.isnan(scores.amax()):
        raise SeqexpError("the model produced NaN scores; lower train.lr or check the data")


# Users per evaluation batch when eval.batch_users is null: on a GPU, large batches keep the
# per-step launch cost of replaying sequences small; on a CPU, small ones stay in cache.
AUTO_BATCH_USERS = {"cpu": 256, "cuda": 8192}
# Score-block size (points x items) when eval.max_block_elements is null: on a CPU a block that
# stays in the last-level cache (12 MB of float32) while it is compared and summed ranked 2.1x
# faster than a 200 MB one (scripts/bench_models.py, gru, scale 0.05); a GPU wants few, large
# blocks.
AUTO_BLOCK_ELEMENTS = {"cpu": 3_000_000, "cuda": 50_000_000}
# Items per score product on a CPU: a block's points are scored against the catalogue in tiles
# whose output (points x TILE_COLUMNS float32, about 1 MB) stays in a core's L2 cache while it
# is written and then ranked; the whole-row block is 12 MB. A GPU scores whole rows at once.
TILE_COLUMNS = {"cpu": 1024}


def _for_device(table: dict[str, int], device: torch.device) -> int:
    return table.get(device.type, table["cpu"])


class Evaluator:
    def __init__(self, cutoffs: Sequence[int] = (5, 10, 20), batch_users: int | None = None,
                 max_block_elements: int | None = None, exclude_seen: bool = False,
                 progress: bool = False) -> None:
        cutoffs = list(cutoffs)
        if not cutoffs or any(not isinstance(k, int) or k < 1 for k in cutoffs):
            raise SeqexpError(f"eval.cutoffs={cutoffs} must be a list of positive integers")
        if any(value is not None and value < 1 for value in (batch_users, max_block_elements)):
            raise SeqexpError("eval.batch_users and eval.max_block_elements must be positive "
                              "(or null: chosen for the device)")
        if not isinstance(exclude_seen, bool):
            raise SeqexpError(f"eval.exclude_seen={exclude_seen!r} must be true or false")
        self.cutoffs = sorted(set(cutoffs))
        self.batch_users = batch_users
        self.max_block_elements = max_block_elements
        self.exclude_seen = exclude_seen
        self.progress = progress

    def users_per_batch(self, device: torch.device) -> int:
        return self.batch_users or _for_device(AUTO_BATCH_USERS, device)

    def block_elements(self, device: torch.device) -> int:
        return self.max_block_elements or _for_device(AUTO_BLOCK_ELEMENTS, device)

    @torch.no_grad()
    def rank_counts(self, model: Recommender, data: SequenceData, phase: str) -> RankCounts:
        was_training = model.training
        model.eval()
        device = model.device
        parts: dict[str, list[torch.Tensor]] = {
            "greater": [], "equal": [], "users": [], "positions": [], "targets": []}
        bar = tqdm(total=phase_targets(data, phase), desc=phase, unit="ev", unit_scale=True,
                   disable=not self.progress, leave=False, mininterval=1.0)
        try:
            with bar:
                for batch in prediction_batches(data, phase, self.users_per_batch(device)):
                    # where each target sits, read before the batch moves to the device
                    parts["users"].append(batch.users[batch.target_rows])
                    parts["positions"].append(batch.target_cols)
                    parts["targets"].append(batch.targets)
                    batch = batch.to(device)
                    g, e = self._batch_counts(model, batch, data.n_items)
                    parts["greater"].append(g.cpu())
                    parts["equal"].append(e.cpu())
                    bar.update(batch.n_targets)
                bar.refresh()  # its last state shows 100 % (mininterval skips the last draw)
        finally:
            model.train(was_training)
        if not parts["greater"]:
            return RankCounts(*(np.zeros(0, np.int64) for _ in parts))
        return RankCounts(**{k: torch.cat(v).numpy() for k, v in parts.items()})

    def _batch_counts(self, model: Recommender, batch: PredictionBatch, n_items: int):
        state = model.prediction_states(batch)
        excluded = seen_items(batch, n_items) if self.exclude_seen else None
        # B x N must fit: split the prediction points if needed, then the items.
        device = batch.targets.device
        block = self.block_elements(device)
        points = max(1, min(batch.n_targets, block // max(n_items, 1)))
        chunk = max(1, block // points)
        keep = points * n_items <= block  # every point's whole row of scores fits the block
        chunk = min(chunk, TILE_COLUMNS.get(device.type, chunk))
        g_parts, e_parts = [], []
        for start in range(0, batch.n_targets, points):
            part = slice(start, start + points)
            sub_state = _slice_state(state, part)
            sub_excluded = None
            if excluded is not None:
                point, item = excluded
                lo, hi = torch.searchsorted(point, torch.tensor(
                    [start, start + points], device=point.device)).tolist()
                sub_excluded = (point[lo:hi] - start, item[lo:hi])
            g, e = count_ranks(
                lambda lo, hi, s=sub_state: model.score_items(s, lo, hi),
                batch.targets[part], n_items, chunk, sub_excluded, keep,
            )
            g_parts.append(g)
            e_parts.append(e)
        return torch.cat(g_parts), torch.cat(e_parts)

    def evaluate(self, model: Recommender, data: SequenceData, phase: str) -> dict[str, float]:
        return self.rank_counts(model, data, phase).metrics(self.cutoffs)

    def full_metrics(self, counts: RankCounts, data: SequenceData) -> dict[str, float]:
        """The metrics of `counts` overall and by history-length quartile (hist_q<j>_...)."""
        return counts.metrics(self.cutoffs) | counts.by_history(train_events(data), self.cutoffs)

    @torch.no_grad()
    def next_basket_metrics(self, model: Recommender, data: SequenceData, phase: str,
                            gap_s: float, k: int) -> dict[str, float]:
        """F1@k and NDCG@k of next-basket prediction, for any model through the contract.

        The phase's events of each user are cut into baskets (seqexp.data.baskets; a basket
        that began before the phase keeps only its phase events). Each basket is predicted once,
        from the model's state at its first phase event, against the set of its distinct items.
        A basket item counts at its pessimistic rank (1 + #items scoring higher + #other items
        scoring the same, as in `RankCounts`), a hit when that rank is <= k: F1 = 2·hits /
        (k + |basket|), NDCG = sum over hits of 1/log2(1 + rank), divided by the ideal
        sum over ranks 1..min(k, |basket|). Averaged over a user's baskets, then over users.
        """
        gap_s, k = check_basket_settings(gap_s, k)
        was_training = model.training
        model.eval()
        f1, ndcg, users = [], [], []
        try:
            for batch in prediction_batches(data, phase, self.users_per_batch(model.device)):
                batch = batch.to(model.device)
                point_f1, point_ndcg, point_users = self._basket_batch(
                    model, batch, data.n_items, gap_s, k)
                f1.append(point_f1.cpu())
                ndcg.append(point_ndcg.cpu())
                users.append(point_users.cpu())
        finally:
            model.train(was_training)
        if not users:
            raise SeqexpError("no baskets to evaluate: the split left no targets")
        user = torch.cat(users).numpy()
        n_baskets = np.bincount(user, minlength=data.n_users)
        has = n_baskets > 0
        out = {"basket_count": float(len(user))}
        for name, values in ((f"basket_f1_at_{k}", f1), (f"basket_ndcg_at_{k}", ndcg)):
            per_user = np.bincount(user, torch.cat(values).double().numpy(), data.n_users)
            out[name] = float((per_user[has] / n_baskets[has]).mean())
        return out

    def _basket_batch(self, model: Recommender, batch: PredictionBatch, n_items: int,
                      gap_s: float, k: int):
        rows, cols = batch.target_rows, batch.target_cols
        opens_basket = basket_starts(batch.timestamps, gap_s)[rows, cols]
        opens_basket[0] = True
        opens_basket[1:] |= rows[1:] != rows[:-1]  # a row's first target opens its basket
        point = opens_basket.cumsum(0) - 1  # targets are row-major, baskets contiguous
        openers = opens_basket.nonzero().squeeze(1)
        sub = PredictionBatch(batch.users, batch.items, batch.timestamps, batch.lengths,
                              rows[openers], cols[openers], batch.targets[openers])
        # The distinct items of each basket: (point, item) pairs.
        pairs = torch.unique(point * n_items + batch.targets)
        pair_point, pair_item = pairs // n_items, pairs % n_items
        n_points = len(openers)
        size = torch.bincount(pair_point, minlength=n_points)
        hits = torch.zeros(n_points, dtype=torch.long, device=pairs.device)
        dcg = torch.zeros(n_points, dtype=torch.float64, device=pairs.device)
        state = model.prediction_states(sub)
        points = max(1, self.block_elements(pairs.device) // max(n_items, 1))
        for start in range(0, n_points, points):
            part = slice(start, start + points)
            scores = model.score_items(_slice_state(state, part), 0, n_items)
            _check_finite(scores)
            top = scores.topk(min(k + 1, n_items), dim=1).values
            inside = (pair_point >= start) & (pair_point < start + len(scores))
            local, item = pair_point[inside] - start, pair_item[inside]
            item_score = scores[local, item]
            # Pessimistic rank <= k iff fewer than k + 1 items score >= the item, i.e. it
            # beats the (k+1)-th best score; then all those items are among the top k.
            bar = top[local, k] if n_items > k else torch.full_like(item_score, -torch.inf)
            hit = item_score > bar
            rank = (top[local, :k] >= item_score[:, None]).sum(1)
            hit_point = pair_point[inside][hit]
            hits += torch.bincount(hit_point, minlength=n_points)
            dcg.index_add_(0, hit_point, 1.0 / torch.log2(rank[hit].double() + 1.0))
        discounts = 1.0 / torch.log2(torch.arange(2, k + 2, device=pairs.device).double())
        ideal = discounts.cumsum(0)[size.clamp(max=k) - 1]
        f1 = 2 * hits / (k + size)
        return f1, dcg / ideal, batch.users[rows[openers]]


def phase_targets(data: SequenceData, phase: str) -> int:
    """How many prediction points `phase` has (a user's first event is never one)."""
    first, stop = data.phase_bounds(phase)
    first = np.maximum(first, data.offsets[:-1] + 1)
    return int(np.clip(stop - first, 0, None).sum())


def seen_items(batch: PredictionBatch, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(point, item) pairs, sorted by point: every distinct item of a prediction point's
    context (the user's earlier events) except the point's own target."""
    items, rows, cols = batch.items, batch.target_rows, batch.target_cols
    width = items.shape[1]
    cell_row, cell_col = (torch.arange(width, device=items.device)
                          < batch.lengths[:, None]).nonzero(as_tuple=True)
    pairs, inverse = torch.unique(cell_row * n_items + items[cell_row, cell_col],
                                  return_inverse=True)
    first_col = torch.full((len(pairs),), width, dtype=cell_col.dtype, device=items.device)
    first_col.scatter_reduce_(0, inverse, cell_col, "amin")
    pair_row, pair_item = pairs // n_items, pairs % n_items
    # Points are row-major with ascending columns, so the points that saw an item (column
    # after its first occurrence) are a contiguous run ending at the row's last point.
    point_key = rows * width + cols
    begin = torch.searchsorted(point_key, pair_row * width + first_col, right=True)
    end = torch.searchsorted(point_key, pair_row * width + (width - 1), right=True)
    count = end - begin
    owner = torch.repeat_interleave(torch.arange(len(pairs), device=items.device), count)
    run_start = torch.cumsum(count, 0) - count
    point = (begin - run_start)[owner] + torch.arange(len(owner), device=items.device)
    item = pair_item[owner]
    keep = item != batch.targets[point]
    point, item = point[keep], item[keep]
    order = torch.argsort(point, stable=True)
    return point[order], item[order]


def check_basket_settings(gap_s: float, k: int) -> tuple[float, int]:
    """eval.basket_gap_s and eval.basket_k, or a SeqexpError naming the bad key."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SeqexpError(f"eval.basket_k={k!r} must be a positive integer")
    return check_gap(gap_s, "eval.basket_gap_s"), k


def _slice_state(state, part: slice):
    """Prediction states are tensors, ints (a count) or tuples of tensors, one row per point."""
    if isinstance(state, torch.Tensor):
        return state[part]
    if isinstance(state, int):
        return len(range(state)[part])
    if isinstance(state, tuple):
        return tuple(_slice_state(s, part) for s in state)
    raise TypeError(f"unsupported prediction state type {type(state).__name__}")


def train_events(data: SequenceData) -> np.ndarray:
    """Training events of every user (the history length the quartile metrics use)."""
    return data.train_end - data.offsets[:-1]


RANKS_FORMAT = "seqexp.ranks/1"


def write_ranks(counts: RankCounts, data: SequenceData, path: Path,
                settings: dict | None = None) -> Path:
    """Write the per-event ranks as Parquet, one row per event sorted by (user, position):
    user (index of the user in the processed data), position (of the target in the user's
    sequence, 0 = first event), item (training-vocabulary code), rank_pessimistic,
    rank_optimistic and user_train_events (the user's history length), each in the smallest
    unsigned integer type that holds it. The file's metadata (key `seqexp`) holds the number
    of items, the tie policies and `settings` (e.g. eval.exclude_seen). Atomic."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if counts.users is None or counts.positions is None or counts.targets is None:
        raise ValueError("write_ranks needs the events' users, positions and targets")
    order = np.lexsort((counts.positions, counts.users))
    columns = {
        "user": counts.users, "position": counts.positions, "item": counts.targets,
        "rank_pessimistic": counts.rank_pessimistic(), "rank_optimistic": counts.rank_optimistic(),
        "user_train_events": train_events(data)[counts.users],
    }
    arrays = {}
    for name, values in columns.items():
        values = np.asarray(values)[order]
        smallest = np.min_scalar_type(int(values.max()) if len(values) else 0)
        arrays[name] = pa.array(values.astype(smallest, copy=False))
    meta = {"format": RANKS_FORMAT, "n_items": int(data.n_items), "n_users": int(data.n_users),
            "rank_pessimistic": "1 + #items scoring higher + #other items scoring the same",
            "rank_optimistic": "1 + #items scoring higher", **(settings or {})}
    table = pa.table(arrays).replace_schema_metadata({"seqexp": json.dumps(meta)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def write_id_maps(data: SequenceData, path: Path) -> Path | None:
    """The raw ids behind the user indices and item codes of a ranks file, once per run: one
    row per user and per item (kind "user" / "item", code, raw_id as a string). None when the
    data carries no raw ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if data.user_ids is None or data.item_ids is None:
        return None
    kinds = np.repeat(np.array(["user", "item"]), [len(data.user_ids), len(data.item_ids)])
    codes = np.concatenate([np.arange(len(data.user_ids)), np.arange(len(data.item_ids))])
    table = pa.table({"kind": pa.array(kinds).dictionary_encode(), "code": codes,
                      "raw_id": np.concatenate([data.user_ids, data.item_ids]).astype(str)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_id_maps(path: Path) -> dict[str, np.ndarray]:
    """{"user": raw ids by user index, "item": raw ids by item code} from write_id_maps."""
    import pyarrow.parquet as pq

    frame = pq.read_table(path).to_pandas()
    return {kind: part.sort_values("code")["raw_id"].to_numpy(dtype=str)
            for kind, part in frame.groupby("kind", observed=True)}


def read_ranks(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The columns of a test_ranks.parquet as int64 arrays, and its metadata."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"seqexp", b"{}"))
    return {name: table.column(name).to_numpy().astype(np.int64)
            for name in table.column_names}, meta
