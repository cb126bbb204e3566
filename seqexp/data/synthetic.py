"""The embedded synthetic dataset: deterministic, no download, with three signals.

Items fall into clusters. Each user prefers a few clusters (a Dirichlet draw) and keeps a few
personal favourite items. Each next event is, with probability
- `p_successor`: the fixed successor of the current item (a permutation inside its cluster),
  a sequential signal that only an order-aware model sees;
- `p_favourite`: one of the user's favourites, a per-user signal that a user embedding can hold
  directly while a sequence model must carry it in its state;
- otherwise: an item of one of the user's preferred clusters, popularity-weighted (Zipf), a
  taste signal that co-occurrence (item-kNN) and matrix factorisation capture.
Timestamps form sessions (gaps of seconds to minutes) separated by long gaps (days); a share of
gaps is zero, so equal timestamps occur as they do in MovieLens.

The embedded dataset's settings are in conf/dataset/synthetic.yaml, their rules in the config
schema (seqexp/core/schema.py); the generator has no defaults of its own, so every caller says
every setting (scripts/bench_models.py: its ML-10M-shaped data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seqexp.data.interactions import Interactions


def generate_synthetic(
    *,
    n_users: int,
    n_items: int,
    n_clusters: int,
    min_events: int,
    max_events: int,
    p_successor: float,
    p_favourite: float,
    n_favourites: int,
    generator_seed: int,
) -> Interactions:
    rng = np.random.default_rng(generator_seed)
    clusters = _Clusters.draw(rng, n_items, n_clusters)
    taste = rng.dirichlet(np.full(n_clusters, 0.15), n_users)
    clusters.taste_cum = np.cumsum(taste, axis=1)
    lengths = rng.integers(min_events, max_events + 1, n_users)
    horizon = int(lengths.max())
    items = _item_sequences(rng, clusters, horizon, p_successor, p_favourite, n_favourites)
    stamps = _timestamps(rng, n_users, horizon)
    keep = np.arange(horizon)[None, :] < lengths[:, None]
    users = np.broadcast_to(np.arange(n_users)[:, None], keep.shape)[keep]
    return Interactions(
        user=users.astype(np.int64),
        item=items[keep],
        timestamp=stamps[keep],
        source="synthetic",
    )


@dataclass
class _Clusters:
    """Items in clusters: each item's successor (the next item of its cluster in a random
    cyclic order), Zipf popularity inside each cluster, and the users' cluster tastes."""

    rng: np.random.Generator
    n_clusters: int
    successor: np.ndarray
    by_cluster: np.ndarray  # items ordered by cluster
    cluster_start: np.ndarray
    cum: np.ndarray  # cumulative weights, aligned with by_cluster
    cluster_total_before: np.ndarray
    cluster_total: np.ndarray
    taste_cum: np.ndarray | None = None  # [users, clusters]

    @classmethod
    def draw(cls, rng: np.random.Generator, n_items: int, n_clusters: int) -> _Clusters:
        cluster_of = rng.integers(0, n_clusters, n_items)
        cluster_order = np.argsort(cluster_of, kind="stable")
        cluster_start = np.searchsorted(cluster_of[cluster_order], np.arange(n_clusters + 1))
        cluster_size = np.diff(cluster_start)
        successor = np.empty(n_items, dtype=np.int64)
        shuffled = cluster_order[rng.permutation(n_items)]
        by_cluster = shuffled[np.argsort(cluster_of[shuffled], kind="stable")]
        position = np.arange(n_items) - cluster_start[cluster_of[by_cluster]]
        nxt = cluster_start[cluster_of[by_cluster]] + (position + 1) % cluster_size[
            cluster_of[by_cluster]
        ]
        successor[by_cluster] = by_cluster[nxt]
        # Zipf popularity inside each cluster; cumulative weights per cluster for inverse
        # sampling.
        cum = np.cumsum(1.0 / (1.0 + position) ** 0.8)
        before = np.concatenate([[0.0], cum])[cluster_start[:-1]]
        total = np.concatenate([[0.0], cum])[cluster_start[1:]] - before
        return cls(rng, n_clusters, successor, by_cluster, cluster_start, cum, before, total)

    def popular_item(self, users: np.ndarray) -> np.ndarray:
        """One item per user: a cluster by the user's taste, an item by popularity in it."""
        u = self.rng.random(len(users))[:, None]
        cluster = np.minimum((self.taste_cum[users] < u).sum(axis=1), self.n_clusters - 1)
        target = (self.cluster_total_before[cluster]
                  + self.rng.random(len(users)) * self.cluster_total[cluster])
        idx = np.searchsorted(self.cum, target, side="right")
        idx = np.clip(idx, self.cluster_start[cluster], self.cluster_start[cluster + 1] - 1)
        return self.by_cluster[idx]


def _item_sequences(rng: np.random.Generator, clusters: _Clusters, horizon: int,
                    p_successor: float, p_favourite: float, n_favourites: int) -> np.ndarray:
    """[users, horizon] items: each the successor of the previous one, one of the user's
    favourites, or a popular item of a cluster the user likes."""
    all_users = np.arange(len(clusters.taste_cum))
    n_users = len(all_users)
    favourites = np.stack([clusters.popular_item(all_users) for _ in range(n_favourites)],
                          axis=1)
    items = np.empty((n_users, horizon), dtype=np.int64)
    items[:, 0] = clusters.popular_item(all_users)
    for t in range(1, horizon):  # a loop over positions, vectorised over users
        kind = rng.random(n_users)
        nxt = clusters.popular_item(all_users)
        fav = favourites[all_users, rng.integers(0, n_favourites, n_users)]
        nxt = np.where(kind < p_successor + p_favourite, fav, nxt)
        nxt = np.where(kind < p_successor, clusters.successor[items[:, t - 1]], nxt)
        items[:, t] = nxt
    return items


def _timestamps(rng: np.random.Generator, n_users: int, horizon: int) -> np.ndarray:
    """[users, horizon] seconds: gaps of about two minutes inside a session, one to five days
    between sessions."""
    in_session = rng.exponential(120.0, (n_users, horizon)).astype(np.int64)
    in_session[rng.random((n_users, horizon)) < 0.1] = 0
    new_session = rng.random((n_users, horizon)) < 0.15
    gaps = np.where(new_session, rng.integers(86_400, 5 * 86_400, (n_users, horizon)), in_session)
    start = 1_200_000_000 + rng.integers(0, 30 * 86_400, n_users)
    return start[:, None] + np.cumsum(gaps, axis=1)
