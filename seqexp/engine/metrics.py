"""Metrics from rank counts: Recall@k, MRR@k and NDCG@k under the pessimistic, optimistic and
expected (random tie-breaking) policies, overall and per history-length quartile. The counts
come from seqexp.engine.ranks; the definitions are in seqexp.engine.evaluator's docstring and
docs/evaluation.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from seqexp.core.errors import SeqexpError
from seqexp.core.history import history_quartiles
from seqexp.core.rank_metrics import discounted_gains, hits, reciprocal_ranks


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
                out[f"recall_at_{k}{suffix}"] = float(hits(rank, k).mean())
                out[f"mrr_at_{k}{suffix}"] = float(reciprocal_ranks(rank, k).sum() / n)
                out[f"ndcg_at_{k}{suffix}"] = float(discounted_gains(rank, k).sum() / n)
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


def _harmonic(k: int) -> np.ndarray:
    """H[j] = sum_{r=1..j} 1/r for j = 0..k."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, k + 1))])


def _discounts(k: int) -> np.ndarray:
    """D[j] = sum_{r=1..j} 1/log2(1 + r) for j = 0..k."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])
