"""Size and write time of test_ranks.parquet for an ML-10M-shaped test set.

Usage: python scripts/bench_ranks.py [--users 69878] [--items 10677] [--events 10000054]
                                     [--seed 0] [--repeats 3] [--out bench_ranks.json]

Builds the split of an ML-10M-shaped dataset without training a model: per-user event counts as
scripts/bench_data.py draws them (every user >= 20, heavy-tailed, 10,000,054 events in all), the
user_tail split (last 20 % of each user's events test, 10 % of the rest validation), items drawn
with Zipf-like popularity. Per-event ranks are drawn from a heavy-headed distribution (rank =
floor(10677 ** U ** 0.63), U uniform: about a sixth of the events in the top 20; 2 % of the
events get 1-4 tied items on top); they only matter through how well they compress. Then times the
step a run adds after ranking: `write_ranks` (sort by user and position, narrow the integer
types, write zstd Parquet) and prints the file size. Exits 0: a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_paper_shapes import user_counts

from seqexp.core.ranks_file import read_ranks
from seqexp.data.sequences import SequenceData
from seqexp.engine.metrics import RankCounts
from seqexp.run.artifacts import write_ranks


def ml10m_split(users: int, items: int, events: int, seed: int) -> SequenceData:
    rng = np.random.default_rng(seed)
    counts = user_counts(rng, events, users)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n_test = np.floor(counts * 0.2).astype(np.int64)
    n_val = np.floor((counts - n_test) * 0.1).astype(np.int64)
    val_end = offsets[1:] - n_test
    popularity = 1.0 / (np.arange(items) + 10.0) ** 1.1
    item = rng.choice(items, size=events, p=popularity / popularity.sum()).astype(np.int32)
    return SequenceData(items=item, timestamps=np.arange(events, dtype=np.int64),
                        offsets=offsets, train_end=val_end - n_val, val_end=val_end,
                        n_items=items)


def test_counts(data: SequenceData, seed: int) -> RankCounts:
    """RankCounts in the evaluator's order (users by length, row-major) with drawn ranks."""
    rng = np.random.default_rng(seed + 1)
    first, stop = data.phase_bounds("test")
    lengths = stop - first
    order = np.argsort(data.offsets[1:] - data.offsets[:-1], kind="stable")
    users = np.repeat(order, lengths[order])
    run_start = np.repeat(np.cumsum(lengths[order]) - lengths[order], lengths[order])
    positions = (first - data.offsets[:-1])[users] + np.arange(len(users)) - run_start
    targets = data.items[data.offsets[:-1][users] + positions]
    greater = np.floor(data.n_items ** (rng.random(len(users)) ** 0.63)).astype(np.int64) - 1
    equal = np.where(rng.random(len(users)) < 0.02, rng.integers(1, 5, len(users)), 0)
    greater = np.minimum(greater, data.n_items - 1 - equal)
    return RankCounts(greater, equal, users, positions, targets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=69_878)
    parser.add_argument("--items", type=int, default=10_677)
    parser.add_argument("--events", type=int, default=10_000_054)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_ranks.json"))
    args = parser.parse_args(argv)
    data = ml10m_split(args.users, args.items, args.events, args.seed)
    counts = test_counts(data, args.seed)
    n = len(counts)
    times = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "test_ranks.parquet"
        for _ in range(args.repeats):
            started = time.perf_counter()
            write_ranks(counts, data, path, {"exclude_seen": False})
            times.append(time.perf_counter() - started)
        size = path.stat().st_size
        started = time.perf_counter()
        columns, _ = read_ranks(path)
        read_s = time.perf_counter() - started
        assert len(columns["user"]) == n
        assert (np.sort(columns["rank_pessimistic"]) == np.sort(counts.rank_pessimistic())).all()
    top20 = float((counts.rank_pessimistic() <= 20).mean())
    report = {"test_events": n, "file_bytes": size, "bytes_per_event": size / n,
              "write_s_best": min(times), "write_s_all": times, "read_s": read_s,
              "share_rank_le_20": top20}
    print(f"test events            {n:>14,}")
    print(f"share with rank <= 20  {top20:>14.3f}")
    print(f"test_ranks.parquet     {size / 2**20:>11.1f} MiB ({size / n:.2f} bytes/event)")
    print(f"write (best of {args.repeats})      {min(times):>12.2f} s "
          f"({', '.join(f'{t:.2f}' for t in times)})")
    print(f"read back              {read_s:>12.2f} s")
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
