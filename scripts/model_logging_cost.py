"""What logging the MLflow Model costs a tiny run: the same tiny runs with mlflow.log_model=true
and false, interleaved in one process, each timed from start to end.

    python scripts/model_logging_cost.py [--pairs 5] [--model gru]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from seqexp.core.resources import config_dir
from seqexp.run.experiment import run_experiment

TINY = ["dataset.n_users=40", "dataset.n_items=50", "dataset.min_events=10",
        "dataset.max_events=20", "train.epochs=2", "train.batch_size=16",
        "train.progress=false", "train.num_threads=1"]


def timed_run(root: Path, model: str, log_model: bool, number: int) -> float:
    overrides = [f"model={model}", *TINY, f"paths.data_dir={root / 'data'}",
                 f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
                 f"mlflow.log_model={str(log_model).lower()}", f"seed={number}"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    started = time.perf_counter()
    run_experiment(cfg, launch_dir=root, output_dir=root / f"run-{number}-{log_model}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--model", default="gru")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="seqexp-cost-") as scratch:
        root = Path(scratch)
        timed_run(root, args.model, True, 0)  # warm: imports, data cache, store creation
        times: dict[bool, list[float]] = {True: [], False: []}
        for number in range(1, args.pairs + 1):
            for log_model in ((True, False) if number % 2 else (False, True)):
                times[log_model].append(timed_run(root, args.model, log_model, number))
    with_model, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"model={args.model}, {args.pairs} pairs, median seconds per run: "
          f"log_model=true {with_model:.2f}, false {without:.2f}, "
          f"difference {with_model - without:.2f}", file=sys.stdout)


if __name__ == "__main__":
    main()
