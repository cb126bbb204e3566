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

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from seqexp.core.errors import SeqexpError
from seqexp.core.stopping import EvaluationStopped
from seqexp.data.baskets import basket_starts
from seqexp.data.batching import PredictionBatch, prediction_batches
from seqexp.data.sequences import SequenceData, validation_sample
from seqexp.engine.metrics import RankCounts
from seqexp.engine.ranks import (
    RowTable,
    ScoreParts,
    check_finite,
    count_block_ranks,
    count_row_ranks,
    count_sparse_ranks,
    count_table_ranks,
    distinct_keys,
    linear_parts,
    scores_alone,
    sort_rows,
)
from seqexp.models import cpu_kernels
from seqexp.models.base import Recommender

# Users per evaluation batch when eval.batch_users is null: on a GPU, large batches keep the
# per-step launch cost of replaying sequences small; on a CPU, small ones stay in cache.
AUTO_BATCH_USERS = {"cpu": 256, "cuda": 8192}
# Score-block size (points x items) when eval.max_block_elements is null: few, large blocks
# (the eval_blocks CPU kernel: blocks that stay in the last-level cache).
AUTO_BLOCK_ELEMENTS = 50_000_000
# Steps of a model with shared + sparse scores: the first SPARSE_POINTS prediction points,
# then as many as make about SPARSE_ENTRIES entries (at least SPARSE_POINTS): 8 MB of ids and
# scores, enough that a step's fixed cost (a few dozen small calls) is small next to its
# kernels (docs/benchmarks.md, kNN at the LastFM shape).
SPARSE_POINTS = 64
SPARSE_ENTRIES = 1 << 20
# A sparse entry costs tens of times a dense score (random access against streaming): with
# more entries per point than 1/DENSE_WIDTH_RATIO of the catalogue (expdecay_knn's 2,000 on
# fewer than 128,000 items) the rest of the batch is scored densely. The counts are the same
# either way; the crossover is measured in docs/benchmarks.md.
DENSE_WIDTH_RATIO = 64
# Fewest prediction points per CPU score block: a block of a few points reads the whole item
# matrix for them alone (a memory-bound product); a catalogue too large for this many rows in
# EVAL_BLOCK_ELEMENTS gets blocks of this many whole rows (LastFM-1K: 64 x 445,369 scores).
MIN_BLOCK_POINTS = 64
# ... except where the CPU counts in tiles: a catalogue above EVAL_BLOCK_ELEMENTS /
# MIN_BLOCK_POINTS items (LastFM-1K) is scored TILE_POINTS points x TILE_ITEMS items at a
# time on each core, into one 1 MB float32 buffer the core reuses (within its L2), counted
# right after its product while it is in the cache, not after a 114 MB block has left it;
# points are grouped by their target's tile (_dense_counts). A tile's item rows (400 KB at
# hidden 100) leave the core's cache room for the product, and a tile of 256 points makes
# half the calls per score of one of 128 (each call hands the GIL between the cores'
# threads); docs/benchmarks.md compares this shape with 128 x 2,048 and others.
TILE_POINTS = 256
TILE_ITEMS = 1024
# Tiles of TILE_GROUP blocks of points scored one item tile after the other: the tile's item
# rows are read from memory once for the group, then from the core's cache
# (docs/benchmarks.md).
TILE_GROUP = 8
# Models whose points share whole score rows (Recommender.score_row_keys: a user's, for `mf`)
# are ranked row by row, each row scored and sorted once, where a batch has at least this many
# points per distinct row: a sort costs a few times one point's dense pass (the crossover is
# measured in docs/benchmarks.md).
SHARED_ROW_POINTS = 8
# Models whose queries begin with columns that points of one key share
# (Recommender.score_key_columns: seqmf's user factors) are scored in blocks of one key each
# (KeyRowScores) where a batch has at least this many points per key (the crossover is
# measured in docs/benchmarks.md).
KEY_ROW_POINTS = 256


def _for_device(table: dict[str, int], device: torch.device) -> int:
    return table.get(device.type, table["cpu"])


class Evaluator:
    """Ranks and metrics of a phase's targets. Its settings are the config's eval.* keys,
    train.progress and seed (`from_config`); conf/eval/default.yaml holds their defaults, so
    the constructor takes every one of them."""

    def __init__(self, *, cutoffs: Sequence[int], batch_users: int | None,
                 max_block_elements: int | None, exclude_seen: bool, progress: bool,
                 val_max_scores: int | None, seed: int) -> None:
        cutoffs = list(cutoffs)
        self.cutoffs = sorted(set(cutoffs))
        self.batch_users = batch_users
        self.max_block_elements = max_block_elements
        self.exclude_seen = exclude_seen
        self.progress = progress
        # validation ranks a fixed sample of users (drawn with `seed`) within this many scores
        self.val_max_scores = val_max_scores
        self.seed = seed

    @staticmethod
    def arguments(cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor's arguments read from a whole config (its eval.* keys,
        train.progress and seed)."""
        evaluation, block = cfg["eval"], cfg["eval"]["max_block_elements"]
        return {"cutoffs": list(evaluation["cutoffs"]), "batch_users": evaluation["batch_users"],
                "max_block_elements": None if block is None else int(block),
                "exclude_seen": evaluation["exclude_seen"],
                "progress": bool(cfg["train"]["progress"]),
                "val_max_scores": evaluation["val_max_scores"], "seed": int(cfg["seed"])}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **changes: Any) -> Evaluator:
        """The evaluator of a whole config, with `changes` (constructor arguments)."""
        return cls(**(cls.arguments(cfg) | changes))

    def users_per_batch(self, device: torch.device) -> int:
        return self.batch_users or _for_device(AUTO_BATCH_USERS, device)

    def block_elements(self, device: torch.device, n_items: int) -> int:
        if self.max_block_elements:
            return self.max_block_elements
        if cpu_kernels.active("eval_blocks", device):
            return max(cpu_kernels.EVAL_BLOCK_ELEMENTS, MIN_BLOCK_POINTS * n_items)
        return AUTO_BLOCK_ELEMENTS

    def cpu_tiles(self, device: torch.device, n_items: int) -> bool:
        """Whether dense scores are counted in CPU tiles, one block per core at a time."""
        return (not self.max_block_elements and cpu_kernels.active("eval_blocks", device)
                and n_items * MIN_BLOCK_POINTS > cpu_kernels.EVAL_BLOCK_ELEMENTS)

    def block_shape(self, device: torch.device, n_items: int, n_points: int) -> tuple[int, int]:
        """(points, items) of the dense score blocks of a batch of `n_points` points: whole rows
        where block_elements holds one, else item tiles (CPU tiles at large catalogues)."""
        if self.cpu_tiles(device, n_items):
            return max(1, min(n_points, TILE_POINTS)), min(n_items, TILE_ITEMS)
        block = self.block_elements(device, n_items)
        points = max(1, min(n_points, block // max(n_items, 1)))
        return points, max(1, block // points)

    def prediction_states(self, model: Recommender, batch: PredictionBatch, n_items: int):
        """model.prediction_states(batch), on one intra-op thread where the CPU counts in
        tiles (one block per core): a replay's steps are small ops, and on a loaded machine a
        two-thread op waits at its barrier for a descheduled partner (as in on_each_core;
        docs/benchmarks.md). The same products, split over fewer threads."""
        if not self.cpu_tiles(batch.targets.device, n_items):
            return model.prediction_states(batch)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return model.prediction_states(batch)
        finally:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def rank_counts(self, model: Recommender, data: SequenceData, phase: str,
                    stop_requested: Callable[[], str | None] | None = None) -> RankCounts:
        """Every target's rank counts in `phase`. `stop_requested` is asked after each batch:
        a stop signal ends the evaluation there (EvaluationStopped). Validation ranks the
        targets of a fixed sample of users when all of them exceed `val_max_scores`; test
        ranks every target."""
        if phase == "val":
            data = validation_sample(data, self.val_max_scores, self.seed)
        was_training = model.training
        model.eval()
        device = model.device
        parts: dict[str, list[torch.Tensor]] = {
            "greater": [], "equal": [], "users": [], "positions": [], "targets": []}
        shared = sorted_shared_scores(model)
        table = row_table(model, shared)
        bar = tqdm(total=phase_targets(data, phase), desc=phase, unit="ev", unit_scale=True,
                   disable=None if self.progress else True, leave=False, mininterval=1.0)
        try:
            with bar:
                for batch in prediction_batches(data, phase, self.users_per_batch(device)):
                    # where each target sits, read before the batch moves to the device
                    parts["users"].append(batch.users[batch.target_rows])
                    parts["positions"].append(batch.target_cols)
                    parts["targets"].append(batch.targets)
                    batch = batch.to(device)
                    g, e = self._batch_counts(model, batch, data.n_items, shared, table)
                    parts["greater"].append(g.cpu())
                    parts["equal"].append(e.cpu())
                    bar.update(batch.n_targets)
                    stop = None if stop_requested is None else stop_requested()
                    if stop is not None:
                        raise EvaluationStopped(stop)
                bar.refresh()  # its last state shows 100 % (mininterval skips the last draw)
        finally:
            model.train(was_training)
        if not parts["greater"]:
            return RankCounts(*(np.zeros(0, np.int64) for _ in parts))
        return RankCounts(**{k: torch.cat(v).numpy() for k, v in parts.items()})

    def _batch_counts(self, model: Recommender, batch: PredictionBatch, n_items: int,
                      shared: tuple[torch.Tensor, torch.Tensor] | None = None,
                      table: RowTable | None = None):
        """Greater/equal counts of a batch's points: from dense score blocks, or with `shared`
        = (the model's shared scores, sorted) from those and its sparse entries, read from
        the rows of its sparse `table` when it has one."""
        state = self.prediction_states(model, batch, n_items)
        excluded = seen_items(batch, n_items) if self.exclude_seen else None
        if shared is not None and table is not None:  # every point at once: a few searches
            prepared, rows = table.prepared(
                model.sparse_rows(state).long(),
                lambda points: model.sparse_scores(_take_state(state, points)))
            return count_table_ranks(*shared, prepared, rows, batch.targets, excluded)
        rows = shared_rows(model, batch) if shared is None else None
        if rows is not None:
            return self._row_counts(model, state, rows, batch.targets, excluded, n_items)
        # B x N must fit: split the prediction points if needed, then the items.
        device = batch.targets.device
        dense_points, chunk = self.block_shape(device, n_items, batch.n_targets)
        tiles = self.cpu_tiles(device, n_items)
        workers, group = (torch.get_num_threads(), TILE_GROUP) if tiles else (1, 1)
        keyed = key_columns(model, batch) if tiles and shared is None else None
        # sparse: a first step, then steps of about SPARSE_ENTRIES entries; dense: the rest
        points = batch.n_targets if shared is None else SPARSE_POINTS
        g_parts, e_parts = [], []
        start = 0
        while start < batch.n_targets:
            part = slice(start, start + points)
            sub_state = _slice_state(state, part)
            sub_excluded = _block_pairs(excluded, start, start + points)
            if shared is not None:
                ids, scores = model.sparse_scores(sub_state)
                g, e = count_sparse_ranks(*shared, batch.targets[part], ids, scores,
                                          sub_excluded)
                start += points
                points = max(SPARSE_POINTS, SPARSE_ENTRIES // max(ids.shape[1], 1))
                if ids.shape[1] * DENSE_WIDTH_RATIO > n_items:  # dense rows cost less
                    shared, points = None, batch.n_targets
            else:
                g, e = _dense_counts(model, sub_state, batch.targets[part], n_items,
                                     (dense_points, chunk), sub_excluded, workers, group,
                                     None if keyed is None else (keyed[0][part], keyed[1]))
                start += points
            g_parts.append(g)
            e_parts.append(e)
        return torch.cat(g_parts), torch.cat(e_parts)

    def _row_counts(self, model: Recommender, state, rows: tuple[torch.Tensor, torch.Tensor],
                    targets: torch.Tensor, excluded: tuple[torch.Tensor, torch.Tensor] | None,
                    n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """count_row_ranks over `rows` = (the first point of each distinct score row, each
        point's row), as many rows a step as a score block holds, one step per core at a time
        on a CPU (the sorts run outside the GIL)."""
        first, row_of_point = rows
        device = targets.device
        step = max(1, self.block_elements(device, n_items) // max(n_items, 1))
        by_row = torch.argsort(row_of_point, stable=True)
        bounds = torch.searchsorted(row_of_point[by_row], torch.arange(
            0, len(first) + step, step, device=device)).tolist()
        pairs = None if excluded is None else _pairs_by_place(excluded, _places(by_row))

        def count(part: int) -> tuple[torch.Tensor, torch.Tensor]:
            lo, hi = bounds[part], bounds[part + 1]
            points = by_row[lo:hi]
            scores = model.score_items(_take_state(state, first[part * step:][:step]), 0,
                                       n_items)
            return count_row_ranks(scores, row_of_point[points] - part * step, targets[points],
                                   _block_pairs(pairs, lo, hi))
        workers = torch.get_num_threads() if device.type == "cpu" else 1
        greater = torch.empty(len(targets), dtype=torch.int32, device=device)
        equal = torch.empty_like(greater)
        steps = [part for part in range(len(bounds) - 1) if bounds[part] < bounds[part + 1]]
        for part, (g, e) in zip(steps, on_each_core(count, steps, workers), strict=True):
            points = by_row[bounds[part]:bounds[part + 1]]
            greater[points], equal[points] = g, e
        return greater, equal

    def evaluate(self, model: Recommender, data: SequenceData, phase: str,
                 stop_requested: Callable[[], str | None] | None = None) -> dict[str, float]:
        return self.rank_counts(model, data, phase, stop_requested).metrics(self.cutoffs)

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
        gap_s = float(gap_s)  # eval.basket_gap_s, checked by the schema with eval.basket_k
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
        points = max(1, self.block_elements(pairs.device, n_items) // max(n_items, 1))
        for start in range(0, n_points, points):
            part = slice(start, start + points)
            scores = model.score_items(_slice_state(state, part), 0, n_items)
            check_finite(scores)
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


def _dense_counts(model: Recommender, state, targets: torch.Tensor, n_items: int,
                  shape: tuple[int, int],
                  excluded: tuple[torch.Tensor, torch.Tensor] | None = None, workers: int = 1,
                  group: int = 1, keyed: tuple[torch.Tensor, int] | None = None):
    """count_ranks over blocks of `shape` = (points, items) of model.score_items, on `workers`
    threads (see on_each_core), `group` blocks at a time chunk by chunk (count_block_ranks),
    the points in the order and blocks of block_plan. With `keyed` = (each point's key, G)
    (key_columns), each block holds points of one key, scored by KeyRowScores."""
    chunk = shape[1]
    order, bounds = block_plan(targets, n_items, shape, None if keyed is None else keyed[0])
    if order is not None and excluded is not None:  # the pairs' points renumbered, sorted
        excluded = _pairs_by_place(excluded, _places(order))
    blocks = [(slice(start, stop) if order is None else order[start:stop],
               _block_pairs(excluded, start, stop)) for start, stop in pairwise(bounds)]
    groups = tile_groups(blocks, group, workers)
    scorers = (partial(point_scorers, model, state) if keyed is None
               else KeyRowScores(model.score_factors(state), *keyed))

    def count(blocks_of_group: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = [rows for rows, _ in blocks_of_group]
        return count_block_ranks(scorers(rows), [targets[points] for points in rows], n_items,
                                 chunk, [pairs for _, pairs in blocks_of_group])
    greater = torch.empty(len(targets), dtype=torch.int32, device=targets.device)
    equal = torch.empty_like(greater)
    for blocks_of_group, counts in zip(groups, on_each_core(count, groups, workers),
                                       strict=True):
        for (rows, _), (g, e) in zip(blocks_of_group, counts, strict=True):
            greater[rows], equal[rows] = g, e
    return greater, equal


def block_plan(targets: torch.Tensor, n_items: int, shape: tuple[int, int],
               keys: torch.Tensor | None = None) -> tuple[torch.Tensor | None, list[int]]:
    """(the order in which the points are scored, None for their own; the bounds of the
    blocks of up to `shape`[0] points in that order). When a row is split into item tiles,
    the points are taken in the order of their target's tile, so that a block's targets lie
    in a tile or two and count_ranks's first pass (the targets' scores) scores those alone,
    not a tile per point. With `keys`, the points are sorted by key first and no block holds
    two keys: a key's points fill its blocks in the order of their target's tile."""
    points, chunk = shape
    n_points = len(targets)
    if keys is None:
        tiled = chunk < n_items and n_points > points
        order = torch.argsort(torch.div(targets, chunk, rounding_mode="floor"),
                              stable=True) if tiled else None
        return order, [*range(0, n_points, points), n_points]
    tiles = -(-n_items // chunk)
    order = torch.argsort(keys.long() * tiles + torch.div(targets, chunk, rounding_mode="floor"),
                          stable=True)
    per_key = torch.unique_consecutive(keys[order], return_counts=True)[1]
    blocks_per_key = -(-per_key // points)
    key_starts = torch.cumsum(per_key, 0) - per_key
    block_starts = torch.cumsum(blocks_per_key, 0) - blocks_per_key
    in_key = torch.arange(int(blocks_per_key.sum()), device=keys.device) - torch.repeat_interleave(
        block_starts, blocks_per_key)
    starts = torch.repeat_interleave(key_starts, blocks_per_key) + in_key * points
    return order, [*starts.tolist(), n_points]


def point_scorers(model: Recommender, state, blocks: list) -> list[ScoreParts]:
    """The ScoreParts of each block of points (rows of `state`): score_parts."""
    return [score_parts(model, _take_state(state, rows)) for rows in blocks]


class KeyRowScores:
    """The ScoreParts of blocks of points of one key each, for a model whose score_factors
    (queries, items, bias) have their first `width` query columns equal for points with
    equal keys (key_columns): a block's scores are queries[:, width:] @ items[:, width:].T
    plus the row of its key, queries[key, :width] @ items[:, :width].T + bias, made once for
    the blocks of a group (one product of one row) and added while counting as a bias is.
    The product is `width` columns narrower (seqmf: half of it). Each sum is rounded in
    another order than score_items's one product, so a rank may differ from the dense
    path's where a score lies within the last bit of its target's, as between any two
    product shapes; every target's score is still read from the scores it is compared with."""

    def __init__(self, factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                 keys: torch.Tensor, width: int) -> None:
        queries, items, bias = factors
        self.keys, self.bias = keys, bias
        self.key_queries, self.queries = queries[:, :width], queries[:, width:]
        # each part's item columns contiguous: a tile's rows then lie next to each other
        self.key_items = items[:, :width].contiguous()
        self.items = items[:, width:].contiguous()

    def __call__(self, blocks: list) -> list[ScoreParts]:
        rows: dict[int, torch.Tensor] = {}
        parts = []
        for points in blocks:
            first = points[:1]
            key = int(self.keys[first])
            if key not in rows:
                product = torch.mm(self.key_queries[first], self.key_items.T)[0]
                rows[key] = product if self.bias is None else product + self.bias
            parts.append(partial(linear_parts, self.queries[points], self.items, rows[key]))
        return parts


def key_columns(model: Recommender, batch: PredictionBatch) -> tuple[torch.Tensor, int] | None:
    """model.score_key_columns(batch) where the `key_rows` CPU kernel is on and the batch
    has KEY_ROW_POINTS points or more per key (fewer make small blocks whose products cost
    more than the columns they save); else None."""
    if not cpu_kernels.active("key_rows", batch.targets.device):
        return None
    keyed = model.score_key_columns(batch)
    if keyed is None or len(torch.unique(keyed[0])) * KEY_ROW_POINTS > batch.n_targets:
        return None
    return keyed


def score_parts(model: Recommender, state) -> ScoreParts:
    """The ScoreParts of `state`'s points: from the model's score_factors where it has them
    (the product in the evaluator's buffer, the bias added while counting), else its
    score_items."""
    factors = model.score_factors(state)
    if factors is None:
        return scores_alone(partial(model.score_items, state))
    return partial(linear_parts, *factors)


def tile_groups(blocks: list, group: int, workers: int) -> list[list]:
    """`blocks` in consecutive groups of up to `group` (counted chunk by chunk,
    count_block_ranks), as many groups as a multiple of `workers` (where there are blocks
    enough) and of sizes that differ by one block at most, so that the workers, each taking
    the next group when done with one, finish together."""
    workers = max(workers, 1)
    count = -(-len(blocks) // max(group, 1))
    count = min(len(blocks), -(-count // workers) * workers)
    size, larger = divmod(len(blocks), max(count, 1))
    bounds = [0]
    for index in range(count):
        bounds.append(bounds[-1] + size + (index < larger))
    return [blocks[start:stop] for start, stop in pairwise(bounds)]


def on_each_core(count: Callable, blocks: list, workers: int) -> list:
    """[count(block) for block in blocks], on `workers` threads of one intra-op thread each
    when workers > 1. A tile's product and counts are small: on a loaded machine a
    two-thread op waits at its barrier for a descheduled partner (milliseconds per op,
    docs/benchmarks.md), while one block per core never waits, and its tile stays in that
    core's cache. Grad mode is per thread: set again in each."""
    if workers <= 1 or len(blocks) <= 1:
        return [count(block) for block in blocks]
    threads = torch.get_num_threads()

    def single_threaded(block):
        torch.set_num_threads(1)  # this thread's own OpenMP and MKL setting
        with torch.no_grad():
            return count(block)
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(single_threaded, blocks))
    finally:  # torch also keeps the last setting as the default of threads started later
        torch.set_num_threads(threads)


def _block_pairs(excluded: tuple[torch.Tensor, torch.Tensor] | None, start: int, stop: int):
    """The (point, item) pairs of points start..stop-1 (pairs sorted by point), renumbered
    from 0."""
    if excluded is None:
        return None
    point, item = excluded
    lo, hi = torch.searchsorted(point, torch.tensor([start, stop], device=point.device)).tolist()
    return point[lo:hi] - start, item[lo:hi]


def shared_rows(model: Recommender, batch: PredictionBatch
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the first point of each distinct score row, each point's row), the rows ascending by
    key, when the model names the points that share their scores (score_row_keys) and the
    batch has SHARED_ROW_POINTS points or more per row; else None (dense blocks)."""
    keys = model.score_row_keys(batch)
    if keys is None:
        return None
    distinct, first, row_of_point = distinct_keys(keys)
    if batch.n_targets < SHARED_ROW_POINTS * len(distinct):
        return None
    return first, row_of_point


def _places(order: torch.Tensor) -> torch.Tensor:
    """The inverse of the permutation `order`: each element's place in it."""
    places = torch.empty_like(order)
    places[order] = torch.arange(len(order), device=order.device)
    return places


def _pairs_by_place(excluded: tuple[torch.Tensor, torch.Tensor], where: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (point, item) pairs with each point renumbered to where[point], sorted by it."""
    point = where[excluded[0]]
    order = torch.argsort(point, stable=True)
    return point[order], excluded[1][order]


def sorted_shared_scores(model: Recommender) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(shared scores, the same sorted) of a model whose scores are a shared vector plus sparse
    entries (docs/evaluation.md), else None: its ranks come from dense score blocks."""
    shared = model.shared_scores()
    if shared is None:
        return None
    check_finite(shared)
    return shared, sort_rows(shared)


def row_table(model: Recommender, shared: tuple[torch.Tensor, torch.Tensor] | None
              ) -> RowTable | None:
    """The model's table of sparse entries, its rows prepared for counting as points name
    them (seqexp.engine.ranks), when it has shared scores and a table; else None."""
    rows = None if shared is None else model.table_rows()
    return None if rows is None else RowTable(shared[0], rows)


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


def _take_state(state, rows: slice | torch.Tensor):
    """The state of points `rows` (a slice, or indices): as _slice_state; a tensor that is one
    row repeated for every point (stride 0 along the points, e.g. an expanded view) is sliced,
    not gathered into a copy per point."""
    if isinstance(rows, slice):
        return _slice_state(state, rows)
    if isinstance(state, torch.Tensor):
        return state[:len(rows)] if state.stride(0) == 0 else state[rows]
    if isinstance(state, int):
        return len(rows)
    if isinstance(state, tuple):
        return tuple(_take_state(s, rows) for s in state)
    raise TypeError(f"unsupported prediction state type {type(state).__name__}")


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
