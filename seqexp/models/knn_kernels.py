"""The compiled (numba) kernels of item-kNN: the similarity fit and expdecay_knn's sparse
entries (`seqexp/models/knn.py`). A module of their own because numba takes about 0.6 s to
import: knn.py loads it on first use, so that building or checking a kNN model's config
never pays for it."""

from __future__ import annotations

import numba
import numpy as np

# The low 32 bits of a fit key: ID_MASK - item id (a lower id makes a larger key).
ID_MASK = 0xFFFFFFFF


def thread_count(wanted: int) -> int:
    """The threads a parallel kernel uses: `wanted` (torch's), within numba's pool."""
    return max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))


@numba.njit(parallel=True, cache=True)
def top_cosines(lo: int, hi: int, item_ptr: np.ndarray, item_users: np.ndarray,
                 user_ptr: np.ndarray, user_items: np.ndarray, norms: np.ndarray,
                 counts: np.ndarray, keys: np.ndarray) -> None:
    """keys[i] for the items lo <= i < hi: the top keys of i's nonzero cosines with every other
    item, descending (-1 past the last). Thread t (of T = len(counts)) takes every T-th item
    and counts its co-occurrences in its row of `counts` (zeros on entry and on return; uint16
    where every count fits, half the cache of int32): work in proportion to the pairs of items
    a user shares, never items x items. An item whose users hold fewer items than the
    catalogue remembers which entries it touched; a heavier one reads its whole row instead
    (cheaper than a branch per count). A key is the cosine's float32 bits above ID_MASK - j (a
    larger key: a higher similarity, then a lower item id); the cosine is
    count / max(|U_i|^1/2 |U_j|^1/2, 1e-12) in float32."""
    n_items, k, threads = norms.shape[0], keys.shape[1], counts.shape[0]
    for thread in numba.prange(threads):
        row = counts[thread]
        touched = np.empty(n_items, dtype=np.int32)
        heap = np.empty(k, dtype=np.int64)
        cosine = np.empty(1, dtype=np.float32)
        bits = cosine.view(np.int32)
        for i in range(lo + thread, hi, threads):
            work = 0
            for p in range(item_ptr[i], item_ptr[i + 1]):
                work += user_ptr[item_users[p] + 1] - user_ptr[item_users[p]]
            width = 0
            for p in range(item_ptr[i], item_ptr[i + 1]):
                for q in range(user_ptr[item_users[p]], user_ptr[item_users[p] + 1]):
                    j = user_items[q]
                    if work < n_items and row[j] == 0:
                        touched[width] = j
                        width += 1
                    row[j] += 1
            if work >= n_items:  # the whole row, in item order
                width = 0
                for j in range(n_items):
                    if row[j]:
                        touched[width] = j
                        width += 1
            size = 0
            for r in range(width):
                j = touched[r]
                count = row[j]
                row[j] = 0
                if j == i:
                    continue
                cosine[0] = np.float32(count) / max(norms[i] * norms[j], np.float32(1e-12))
                size = _push(heap, size, (np.int64(bits[0]) << 32) | (ID_MASK - j))
            keys[i, :size] = np.sort(heap[:size])[::-1]
            keys[i, size:] = -1


@numba.njit(cache=True)
def _push(heap: np.ndarray, size: int, key: int) -> int:
    """Offer `key` to the min-heap heap[:size] of at most len(heap) keys; the new size."""
    if size < len(heap):
        heap[size] = key
        _sift_up(heap, size)
        return size + 1
    if key > heap[0]:
        heap[0] = key
        _sift_down(heap, size)
    return size


@numba.njit(cache=True)
def _sift_up(heap: np.ndarray, at: int) -> None:
    """Restore the min-heap after heap[at] was appended."""
    while at > 0:
        parent = (at - 1) // 2
        if heap[parent] <= heap[at]:
            return
        heap[parent], heap[at] = heap[at], heap[parent]
        at = parent


@numba.njit(cache=True)
def _sift_down(heap: np.ndarray, size: int) -> None:
    """Restore the min-heap of heap[:size] after its root was replaced."""
    at = 0
    while True:
        child = 2 * at + 1
        if child >= size:
            return
        if child + 1 < size and heap[child + 1] < heap[child]:
            child += 1
        if heap[at] <= heap[child]:
            return
        heap[at], heap[child] = heap[child], heap[at]
        at = child


@numba.njit(parallel=True, cache=True)
def history_entries(anchors: np.ndarray, weights: np.ndarray, neighbours: np.ndarray,
                    similarity: np.ndarray, prior: np.ndarray, slots: np.ndarray,
                    ids: np.ndarray, scores: np.ndarray) -> int:
    """ExpDecayKNN.sparse_scores on a CPU: for each point, prior + the sum over anchors a, then
    neighbours j, of similarity * weight, added in that order (score_items' order), for every
    item named, each once (at its first mention), in the first columns of its row. Returns
    the most items a row names; ids -1 pad each row up to that width (later columns are left
    as they were). Thread t (of T = len(slots)) takes every T-th point: a point's sums depend
    on its own row only, so they are the same for any T. An item's sum is kept in its entry
    of the point's output row, found through the thread's row of `slots` (the catalogue's
    width: -1, or the item's entry; all -1 on entry and on return; int16 where a row's
    entries fit)."""
    threads, n_points = slots.shape[0], anchors.shape[0]
    named = np.zeros(n_points, dtype=np.int64)
    for thread in numba.prange(threads):
        for p in range(thread, n_points, threads):
            named[p] = _point_entries(p, anchors, weights, neighbours, similarity, prior,
                                      slots[thread], ids, scores)
    widest = named.max() if n_points else 0
    for p in numba.prange(n_points):
        ids[p, named[p]:widest] = -1
        scores[p, named[p]:widest] = 0.0
    return widest


@numba.njit(inline="always", cache=True)
def _point_entries(p: int, anchors: np.ndarray, weights: np.ndarray, neighbours: np.ndarray,
                   similarity: np.ndarray, prior: np.ndarray, slots: np.ndarray,
                   ids: np.ndarray, scores: np.ndarray) -> int:
    """history_entries for point p, with one row of slots: how many items it names."""
    named = 0
    for a in range(anchors.shape[1]):
        anchor, weight = anchors[p, a], weights[p, a]
        for j in range(neighbours.shape[1]):
            item = neighbours[anchor, j]
            slot = slots[item]
            if slot < 0:
                slot = slots[item] = named
                ids[p, named] = item
                scores[p, named] = prior[item]
                named += 1
            scores[p, slot] += similarity[anchor, j] * weight
    for r in range(named):
        slots[ids[p, r]] = -1
    return named
