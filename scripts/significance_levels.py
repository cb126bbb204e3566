"""The report's paired tests at both levels on one experiment's runs: resampling and permuting
test events (as if independent) and users (all of a user's events together, what the report's
† uses), side by side for every model against the baseline.

Usage: python scripts/significance_levels.py --experiment NAME [--baseline gru]
       [--tracking-uri URI] [--resamples 5000] [--out levels.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from seqexp.analysis.significance import (
    paired_bootstrap_ci,
    paired_randomisation_p,
    user_bootstrap_ci,
    user_randomisation_p,
)
from seqexp.analysis.table import METRICS, build_table, load_paper
from seqexp.apps.report import collect
from seqexp.run.tracking import Tracker, default_tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--baseline", default="gru")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--resamples", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path("significance_levels.json"))
    args = parser.parse_args()
    tracker = Tracker(args.tracking_uri or default_tracking_uri(Path.cwd()), args.experiment,
                      create=False)
    runs, *_ = collect(tracker, args.experiment, None)
    table = build_table(runs, load_paper(), baseline=args.baseline, resamples=200)
    base = next(r for r in table.rows if r.model == args.baseline)
    results = []
    print(f"{'model':<18} {'metric':<10} {'diff':>10}  {'level':<7} {'95 % CI':>24} {'p':>9}")
    for row in table.rows:
        if row is base:
            continue
        for dataset in table.datasets:
            for metric, _ in METRICS:
                cell, reference = row.cells[(dataset, metric)], base.cells[(dataset, metric)]
                values, base_values = cell.per_event(metric), reference.per_event(metric)
                users = cell.event_users()
                if values is None or base_values is None or users is None \
                        or cell.runs[0].events != reference.runs[0].events:
                    continue
                diff = values - base_values
                rng = np.random.default_rng(0)
                levels = {
                    "events": (paired_bootstrap_ci(diff, args.resamples // 5, rng=rng),
                               paired_randomisation_p(diff, args.resamples, rng)),
                    "users": (user_bootstrap_ci(diff, users, args.resamples // 5, rng=rng),
                              user_randomisation_p(diff, users, args.resamples, rng)),
                }
                for level, ((low, high), p) in levels.items():
                    print(f"{row.label:<18} {metric:<10} {diff.mean():>10.5f}  {level:<7} "
                          f"[{low:>10.5f}, {high:>10.5f}] {p:>9.5f}")
                    results.append({"model": row.label, "dataset": dataset, "metric": metric,
                                    "diff": float(diff.mean()), "level": level,
                                    "ci_low": low, "ci_high": high, "p": p,
                                    "events": len(diff), "users": len(np.unique(users)),
                                    "seeds": [len(cell.runs), len(reference.runs)]})
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
