"""Where item-kNN's fit spends its time: the co-occurrence kernel on ranges of items, one and two
threads, on the LastFM-shaped file of scripts/make_paper_shapes.py.

Usage: python scripts/bench_knn_fit.py --data DIR [--ranges 0:2000 100000:104000 300000:310000]
           [--out bench_knn_fit.json]

Loads DIR's LastFM-shaped file as `seqexp model=itemknn dataset=lastfm` does (from the cache
that scripts/bench_paper_shapes.py writes), then times `knn_kernels.top_cosines` on each range
of item ids (item ids follow first appearance, so low ids are the popular items) with one
thread and with two, and prints the co-occurrences counted a second (an item costs the sum over
its users of their distinct items) and the whole fit's count. Prints JSON and writes it. Exits
0: a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paper_shapes import compose

from seqexp.data.loading import load_dataset
from seqexp.models import knn, knn_kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ranges", nargs="+", default=["0:2000", "100000:104000",
                                                        "300000:310000"])
    parser.add_argument("--out", type=Path, default=Path("bench_knn_fit.json"))
    args = parser.parse_args(argv)
    cfg = compose("lastfm", args.data, "itemknn", [])
    data = load_dataset(cfg.dataset, cfg.split, Path(cfg.paths.raw_dir),
                        Path(cfg.paths.cache_dir), progress=False)
    by_user, by_item = knn.user_item_matrices(data)
    norms = np.sqrt(np.asarray(by_item.sum(axis=1)).ravel()).astype(np.float32)
    work = by_item @ np.diff(by_user.indptr).astype(np.float64)
    keys = np.empty((data.n_items, cfg.model.neighbours), dtype=np.int64)
    report = {"items": data.n_items, "user_item_pairs": int(by_user.nnz),
              "co_occurrences": float(work.sum()), "ranges": []}
    for text in args.ranges:
        lo, hi = (int(part) for part in text.split(":"))
        for threads in (1, 2):
            counts = np.zeros((threads, data.n_items), dtype=np.uint16)
            fit = (lo, hi, by_item.indptr, by_item.indices, by_user.indptr, by_user.indices,
                   norms, counts, keys)
            knn_kernels.top_cosines(lo, lo + 10, *fit[2:])  # compiled, warm
            started = time.perf_counter()
            knn_kernels.top_cosines(*fit)
            seconds = time.perf_counter() - started
            rate = float(work[lo:hi].sum()) / seconds
            report["ranges"].append({"items": text, "threads": threads, "seconds": seconds,
                                     "co_occurrences_per_s": rate})
            print(f"items {text:>15s}  {threads} thread(s)  {seconds:6.2f} s  "
                  f"{rate:.3g} co-occurrences/s", flush=True)
    print(f"whole fit: {report['co_occurrences']:.3g} co-occurrences, {data.n_items:,} items")
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
