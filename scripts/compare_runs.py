"""Whether two sets of seqexp run directories hold identical results (timings aside).

Usage: python scripts/compare_runs.py BEFORE_DIR AFTER_DIR

Each directory holds one run directory per name (e.g. BEFORE_DIR/gru, written by
`seqexp model=gru hydra.run.dir=BEFORE_DIR/gru ...`). For every name present in both, compares
metrics.json key by key (keys naming seconds or events per second are skipped) and
test_ranks.parquet row by row, prints one line per run and exits 1 if anything differs. Used to
check that a speed change leaves every metric and every rank bit-identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TIMING_WORDS = ("seconds", "per_s", "_time")


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def compare(before: Path, after: Path) -> list[str]:
    """The differences between two run directories (empty when identical)."""
    import pyarrow.parquet as pq

    left = flat(json.loads((before / "metrics.json").read_text()))
    right = flat(json.loads((after / "metrics.json").read_text()))
    differences = [f"metrics.json {key}: {left.get(key)!r} != {right.get(key)!r}"
                   for key in sorted(set(left) | set(right))
                   if not any(word in key for word in TIMING_WORDS)
                   and left.get(key) != right.get(key)]
    ranks = [run / "test_ranks.parquet" for run in (before, after)]
    if all(path.exists() for path in ranks):
        if not pq.read_table(ranks[0]).equals(pq.read_table(ranks[1])):
            differences.append("test_ranks.parquet differs")
    elif any(path.exists() for path in ranks):
        differences.append("test_ranks.parquet exists in only one run")
    return differences


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    before, after = Path(sys.argv[1]), Path(sys.argv[2])
    names = sorted(run.name for run in before.iterdir() if (run / "metrics.json").exists()
                   and (after / run.name / "metrics.json").exists())
    if not names:
        sys.exit("compare_runs: no run directory with a metrics.json in both")
    failed = False
    for name in names:
        differences = compare(before / name, after / name)
        failed |= bool(differences)
        print(f"{name}: " + ("identical" if not differences else "; ".join(differences[:5])))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
