"""Ranking points that share a score row (mf: a user's): the row sort, and the crossover
against dense score rows by points per user.

Usage: python scripts/bench_shared_rows.py [--items 445369 10677] [--rows 1 6 64]
           [--points 1 2 4 6 8 16 32 128] [--ranked 20000] [--threads 2] [--repeats 3]
           [--out bench_shared_rows.json]

1. Sorts. The evaluator sorts each shared row once (seqexp.engine.ranks.sort_rows: numpy's
   vectorised sort on a CPU). For each --items and --rows (rows sorted at once), float32
   normal scores are sorted along the rows by sort_rows and by torch.sort: the best of
   --repeats after an untimed call, in milliseconds per row.
2. Crossover. An untrained `mf` (Table 1's 20 factors) at each --items; users with 20
   training events and --points test events each, as many users as make about --ranked test
   events; the test pass (Evaluator.rank_counts) timed with the shared rows (one sorted row per
   user, docs/evaluation.md) and with dense score rows (the path the evaluator takes below
   SHARED_ROW_POINTS points per user), the best of --repeats, in events a second; the counts
   of the two are compared.

Prints a line per measurement and writes JSON. Exits 0: a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from seqexp.data.sequences import SequenceData
from seqexp.engine import evaluator as evaluation
from seqexp.engine.ranks import sort_rows
from seqexp.run import presets

TRAIN_EVENTS = 20


def best_seconds(work, repeats: int) -> float:
    work()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def sorts(items: int, rows: int, repeats: int) -> dict:
    scores = torch.randn(rows, items, generator=torch.Generator().manual_seed(0))
    numpy_ms = 1e3 * best_seconds(lambda: sort_rows(scores), repeats) / rows
    torch_ms = 1e3 * best_seconds(lambda: torch.sort(scores, dim=-1), repeats) / rows
    print(f"sort  {items:>9,} items x {rows:>3} rows: sort_rows {numpy_ms:8.3f} ms a row, "
          f"torch.sort {torch_ms:8.3f} ms a row ({torch_ms / numpy_ms:.1f}x)", flush=True)
    return {"items": items, "rows": rows, "sort_rows_ms_per_row": numpy_ms,
            "torch_sort_ms_per_row": torch_ms, "ratio": torch_ms / numpy_ms}


def users_with(points: int, users: int, items: int) -> SequenceData:
    """`users` users of TRAIN_EVENTS training and `points` test events each, random items."""
    per_user = TRAIN_EVENTS + points
    rng = np.random.default_rng(0)
    offsets = np.arange(0, users * per_user + 1, per_user, dtype=np.int64)
    return SequenceData(items=rng.integers(0, items, users * per_user).astype(np.int32),
                        timestamps=np.arange(users * per_user, dtype=np.int64) * 60,
                        offsets=offsets, train_end=offsets[:-1] + TRAIN_EVENTS,
                        val_end=offsets[:-1] + TRAIN_EVENTS, n_items=items)


def crossover(items: int, points: int, ranked: int, repeats: int) -> dict:
    users = max(1, ranked // points)
    data = users_with(points, users, items)
    model = presets.model("mf", items, users)
    evaluator = presets.evaluator(progress=False)
    shared_rows, threshold = evaluation.shared_rows, evaluation.SHARED_ROW_POINTS
    counts, rates = {}, {}
    for path in ("shared_rows", "dense"):
        evaluation.shared_rows = (shared_rows if path == "shared_rows"
                                  else lambda model, batch: None)
        evaluation.SHARED_ROW_POINTS = 1  # shared rows at any count, to see the crossover
        try:
            seconds = best_seconds(lambda path=path: counts.__setitem__(
                path, evaluator.rank_counts(model, data, "test")), repeats)
        finally:
            evaluation.shared_rows, evaluation.SHARED_ROW_POINTS = shared_rows, threshold
        rates[path] = users * points / seconds
    same = all(np.array_equal(getattr(counts["dense"], k), getattr(counts["shared_rows"], k))
               for k in ("greater", "equal"))
    print(f"rank  {items:>9,} items, {points:>4} points a user x {users:,} users: shared rows "
          f"{rates['shared_rows']:>11,.0f} ev/s, dense {rates['dense']:>11,.0f} ev/s "
          f"({rates['shared_rows'] / rates['dense']:.2f}x; counts equal: {same})", flush=True)
    return {"items": items, "points_per_user": points, "users": users,
            "shared_rows_events_per_s": rates["shared_rows"],
            "dense_events_per_s": rates["dense"], "counts_equal": same}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[445_369, 10_677])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 6, 64])
    parser.add_argument("--points", type=int, nargs="+", default=[1, 2, 4, 6, 8, 16, 32, 128])
    parser.add_argument("--ranked", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_shared_rows.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "shared_row_points": evaluation.SHARED_ROW_POINTS,
              "sorts": [sorts(items, rows, args.repeats)
                        for items in args.items for rows in args.rows],
              "crossover": [crossover(items, points, args.ranked, args.repeats)
                            for items in args.items for points in args.points]}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
