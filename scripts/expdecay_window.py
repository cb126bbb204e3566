"""What `expdecay_knn`'s `model.window` cut costs: ranks against the whole-history sum.

Usage: python scripts/expdecay_window.py [--scale 0.05] [--windows 20 40] [--unit position]
           [--out expdecay_window.json]

On the ML-10M-shaped synthetic data of scripts/bench_models.py it fits the similarities once,
then ranks every test event with each window and with the whole history (window=null), and
reports per window: evaluation seconds, MRR@20 / Recall@20, how many pessimistic ranks differ
from the whole-history ranks, and the best whole-history rank among those that differ.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_models import ml10m_shaped

from seqexp.run import presets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--windows", type=int, nargs="+", default=[20, 40])
    parser.add_argument("--unit", default="position", choices=["position", "time"])
    parser.add_argument("--out", default="expdecay_window.json")
    args = parser.parse_args()
    data = ml10m_shaped(args.scale)
    evaluator = presets.evaluator(cutoffs=[20], progress=False)
    fitted = presets.model("expdecay_knn", data.n_items, data.n_users)
    fitted.fit(data)
    ranks, report = {}, {}
    for window in [*args.windows, None]:
        model = presets.model("expdecay_knn", data.n_items, data.n_users, decay_unit=args.unit,
                              window=window)
        model.load_state_dict(fitted.state_dict())
        started = time.perf_counter()
        counts = evaluator.rank_counts(model, data, "test")
        metrics = counts.metrics([20])
        ranks[window] = counts.rank_pessimistic()
        report[str(window)] = {"eval_s": time.perf_counter() - started,
                               "mrr_at_20": metrics["mrr_at_20"],
                               "recall_at_20": metrics["recall_at_20"]}
    full = ranks[None]
    for window in args.windows:
        differ = ranks[window] != full
        report[str(window)] |= {
            "ranks_differing": int(differ.sum()),
            "best_full_rank_among_differing": int(full[differ].min()) if differ.any() else None,
        }
    report["_meta"] = {"scale": args.scale, "unit": args.unit, "test_events": len(full)}
    for name, row in report.items():
        print(f"window {name:>5}: " + ", ".join(f"{k}={v}" for k, v in row.items()))
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
