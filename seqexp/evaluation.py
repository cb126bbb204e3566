"""The one evaluator: full-catalogue ranks by counting, for every model.

For a prediction point with target score s, let g = #items scoring strictly higher and
e = #other items scoring exactly s. Then
- pessimistic rank (the headline) = 1 + g + e, so constant scores rank last;
- optimistic rank = 1 + g (ties ignored);
- under random tie-breaking the rank is uniform on 1+g .. 1+g+e, and the metrics below are its
  exact expectations.
Recall@k = share of events with rank <= k; MRR@k = mean of 1/rank over events with rank <= k
(0 otherwise); micro-averaged over events.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from seqexp.data.baskets import basket_starts, check_gap
from seqexp.data.batching import PredictionBatch, prediction_batches
from seqexp.data.sequences import SequenceData
from seqexp.errors import SeqexpError
from seqexp.models.base import Recommender


@dataclass
class RankCounts:
    """Per-event counts of items scoring above (`greater`) and level with (`equal`) the target."""

    greater: np.ndarray
    equal: np.ndarray

    def __len__(self) -> int:
        return len(self.greater)

    def rank_pessimistic(self) -> np.ndarray:
        return 1 + self.greater + self.equal

    def rank_optimistic(self) -> np.ndarray:
        return 1 + self.greater

    def metrics(self, cutoffs: Sequence[int]) -> dict[str, float]:
        """mrr_at_k / recall_at_k (pessimistic) plus _optimistic and _expected variants."""
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
            # rank uniform on g+1 .. g+e+1: P(rank <= k) and E[1/rank; rank <= k]
            recall = np.clip((k - g) / (e + 1.0), 0.0, 1.0)
            harmonic = _harmonic(k)
            top = np.minimum(g + e + 1, k).astype(np.int64)
            low = np.minimum(g, k).astype(np.int64)
            mrr = (harmonic[top] - harmonic[low]) / (e + 1.0)
            out[f"recall_at_{k}_expected"] = float(recall.mean())
            out[f"mrr_at_{k}_expected"] = float(np.maximum(mrr, 0.0).mean())
        out["n_events"] = float(n)
        return out


def _harmonic(k: int) -> np.ndarray:
    """H[j] = sum_{r=1..j} 1/r for j = 0..k."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, k + 1))])


def count_ranks(
    score_block: Callable[[int, int], torch.Tensor], targets: torch.Tensor, n_items: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greater/equal counts for one batch of prediction points, scoring items `chunk` at a time.

    When the catalogue fits one chunk the scores are computed once; otherwise a first pass
    collects the target scores and a second counts against them.
    """
    n_points = len(targets)
    if n_points == 0:
        empty = torch.zeros(0, dtype=torch.int32, device=targets.device)
        return empty, empty.clone()
    whole = None
    if chunk >= n_items:
        whole = score_block(0, n_items)
        target_scores = whole.gather(1, targets[:, None])
    else:
        target_scores = None
        for lo in range(0, n_items, chunk):
            hi = min(lo + chunk, n_items)
            inside = (targets >= lo) & (targets < hi)
            if inside.any():
                scores = score_block(lo, hi)
                if target_scores is None:  # in the scores' dtype: float64 ties must stay ties
                    target_scores = scores.new_empty(n_points, 1)
                target_scores[inside] = scores[inside].gather(1, (targets[inside] - lo)[:, None])
    greater = torch.zeros(n_points, dtype=torch.int32, device=targets.device)
    equal = torch.full((n_points,), -1, dtype=torch.int32, device=targets.device)  # − target
    for lo in range(0, n_items, chunk):
        scores = whole if whole is not None else score_block(lo, min(lo + chunk, n_items))
        _check_finite(scores)
        block_greater, block_equal = _sign_counts(scores, target_scores)
        greater += block_greater
        equal += block_equal
    return greater, equal


# Columns per float32 sum of signs: exact while partial sums stay below 2**24.
SIGN_COLUMNS = 1 << 24


def _sign_counts(scores: torch.Tensor, target_scores: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the number of scores above and equal to the row's target score: sign(s − t)
    sums to (above − below) and its absolute value to (above + below), one pass each instead
    of two comparisons. sign(s − t) is 0 exactly when s = t: subnormal differences stay
    nonzero (torch.set_flush_denormal(True), which seqexp never sets, would make them ties),
    and a tie at ±inf gives sign(NaN) = 0. NaN scores must be excluded first."""
    net = torch.zeros(len(scores), dtype=torch.int64, device=scores.device)
    moved = torch.zeros_like(net)
    for lo in range(0, scores.shape[1], SIGN_COLUMNS):
        # not in place: a model may return a view of its own tensors
        sign = torch.sub(scores[:, lo:lo + SIGN_COLUMNS], target_scores).sign_()
        net += sign.sum(1, dtype=torch.float32).to(torch.int64)  # float32 for bf16/fp16 too
        moved += sign.abs_().sum(1, dtype=torch.float32).to(torch.int64)
    return ((net + moved) // 2).to(torch.int32), (scores.shape[1] - moved).to(torch.int32)


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


def _for_device(table: dict[str, int], device: torch.device) -> int:
    return table.get(device.type, table["cpu"])


class Evaluator:
    def __init__(self, cutoffs: Sequence[int] = (5, 10, 20), batch_users: int | None = None,
                 max_block_elements: int | None = None) -> None:
        cutoffs = list(cutoffs)
        if not cutoffs or any(not isinstance(k, int) or k < 1 for k in cutoffs):
            raise SeqexpError(f"eval.cutoffs={cutoffs} must be a list of positive integers")
        if any(value is not None and value < 1 for value in (batch_users, max_block_elements)):
            raise SeqexpError("eval.batch_users and eval.max_block_elements must be positive "
                              "(or null: chosen for the device)")
        self.cutoffs = sorted(set(cutoffs))
        self.batch_users = batch_users
        self.max_block_elements = max_block_elements

    def users_per_batch(self, device: torch.device) -> int:
        return self.batch_users or _for_device(AUTO_BATCH_USERS, device)

    def block_elements(self, device: torch.device) -> int:
        return self.max_block_elements or _for_device(AUTO_BLOCK_ELEMENTS, device)

    @torch.no_grad()
    def rank_counts(self, model: Recommender, data: SequenceData, phase: str) -> RankCounts:
        was_training = model.training
        model.eval()
        device = model.device
        greater, equal = [], []
        try:
            for batch in prediction_batches(data, phase, self.users_per_batch(device)):
                batch = batch.to(device)
                g, e = self._batch_counts(model, batch, data.n_items)
                greater.append(g.cpu())
                equal.append(e.cpu())
        finally:
            model.train(was_training)
        if not greater:
            return RankCounts(np.zeros(0, np.int64), np.zeros(0, np.int64))
        return RankCounts(torch.cat(greater).numpy(), torch.cat(equal).numpy())

    def _batch_counts(self, model: Recommender, batch: PredictionBatch, n_items: int):
        state = model.prediction_states(batch)
        # B x N must fit: split the prediction points if needed, then the items.
        block = self.block_elements(batch.targets.device)
        points = max(1, min(batch.n_targets, block // max(n_items, 1)))
        chunk = max(1, block // points)
        g_parts, e_parts = [], []
        for start in range(0, batch.n_targets, points):
            part = slice(start, start + points)
            sub_state = _slice_state(state, part)
            g, e = count_ranks(
                lambda lo, hi, s=sub_state: model.score_items(s, lo, hi),
                batch.targets[part], n_items, chunk,
            )
            g_parts.append(g)
            e_parts.append(e)
        return torch.cat(g_parts), torch.cat(e_parts)

    def evaluate(self, model: Recommender, data: SequenceData, phase: str) -> dict[str, float]:
        return self.rank_counts(model, data, phase).metrics(self.cutoffs)

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
        out = {"n_baskets": float(len(user))}
        for name, values in ((f"f1_at_{k}", f1), (f"ndcg_at_{k}", ndcg)):
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
