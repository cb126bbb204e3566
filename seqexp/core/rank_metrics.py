"""The per-event value of each ranking metric, from ranks (1 = first): the one definition that
the evaluator's means (seqexp/engine/metrics.py) and the report's per-event significance tests
(seqexp/analysis/table.py) share. NumPy only, so that the report loads no torch."""

from __future__ import annotations

import numpy as np


def hits(ranks: np.ndarray, k: int) -> np.ndarray:
    """Recall@k per event: whether the target is in the top k (bool)."""
    return ranks <= k


def reciprocal_ranks(ranks: np.ndarray, k: int) -> np.ndarray:
    """MRR@k per event: 1 / rank within the top k, else 0."""
    return np.where(hits(ranks, k), 1.0 / np.maximum(ranks, 1), 0.0)


def discounted_gains(ranks: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k per event (one relevant item, so the ideal DCG is 1): 1 / log2(1 + rank) within
    the top k, else 0."""
    return np.where(hits(ranks, k), 1.0 / np.log2(1.0 + np.minimum(ranks, k)), 0.0)


PER_EVENT = {"mrr": reciprocal_ranks, "recall": hits, "ndcg": discounted_gains}


def event_values(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-event values (float64) of `metric` (mrr_at_k, recall_at_k, ndcg_at_k)."""
    name, k = metric.rsplit("_at_", 1)
    if name not in PER_EVENT:
        raise ValueError(f"no per-event form for {metric}")
    return PER_EVENT[name](ranks, int(k)).astype(np.float64)
