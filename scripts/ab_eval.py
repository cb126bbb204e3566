"""Evaluation time of one trained model under several variants, taking turns in one process.

Usage: python scripts/ab_eval.py [--model gru] [--scale 0.05] [--train-batches 300]
           [--train-seed S] [--rounds 5] [--baseline DIR] [--tile-columns N ...]
           [--batch-users N ...]
           [--out ab_eval.json] [-o model.hidden_size=100 model.loss=sampled_softmax ...]

On a shared machine the same code runs 10-20 % faster or slower from one minute to the next,
more than most single changes move it, so two separate runs say little about a change. This
script builds the data of scripts/bench_models.py, trains one model for `--train-batches`
batches, then ranks the test events with the shared Evaluator once per variant per round, the
variants taking turns after one untimed round, and reports each variant's best and median
seconds, its ratio of medians to the first variant, and whether its counts equal the first
variant's exactly in every round.

Variants, the first being the reference:
- `current`: the working tree's evaluator with the model's settings;
- `--baseline DIR`: the evaluator module (seqexp/engine/evaluator.py) of another checkout, e.g. one
  made with `git worktree add DIR HEAD~1`, on the same model (it must fit the current
  package's interfaces);
- `--tile-columns N`: the current evaluator scoring N items per CPU tile;
- `--batch-users N`: the current evaluator with eval.batch_users=N.
Prints one line per variant and writes JSON {variant: {"best_s", "median_s", "ratio",
"identical"}, "_meta": {...}}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

import seqexp.engine.evaluator as evaluation
from seqexp.core.resources import config_dir
from seqexp.run.experiment import (
    build_evaluator,
    build_model,
    build_trainer,
    configure_torch,
    seed_everything,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import ml10m_shaped  # noqa: E402


def load_baseline(checkout: Path):
    """The evaluation module of another checkout, imported under its own name."""
    path = checkout / "seqexp" / "engine" / "evaluator.py"
    if not path.is_file():  # a checkout from before the layers: seqexp/evaluation.py
        path = checkout / "seqexp" / "evaluation.py"
    if not path.is_file():
        raise SystemExit(f"--baseline {checkout}: no seqexp/engine/evaluator.py there")
    spec = importlib.util.spec_from_file_location("baseline_evaluation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variants(args, evaluator) -> dict:
    """name -> (evaluator, TILE_COLUMNS["cpu"] to set for it)."""
    tile = evaluation.TILE_COLUMNS["cpu"]
    settings = {"cutoffs": evaluator.cutoffs, "batch_users": evaluator.batch_users,
                "max_block_elements": evaluator.max_block_elements,
                "exclude_seen": evaluator.exclude_seen}
    out = {"current": (evaluator, tile)}
    if args.baseline is not None:
        out[f"baseline {args.baseline}"] = (load_baseline(args.baseline).Evaluator(**settings),
                                            tile)
    for columns in args.tile_columns:
        out[f"tile_columns={columns}"] = (evaluator, columns)
    for users in args.batch_users:
        out[f"batch_users={users}"] = (
            evaluation.Evaluator(**(settings | {"batch_users": users})), tile)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gru")
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--train-batches", type=int, default=300)
    parser.add_argument("--train-seed", type=int, default=None,
                        help="seed of the training batches' order (default: the config's seed)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--tile-columns", type=int, nargs="*", default=[])
    parser.add_argument("--batch-users", type=int, nargs="*", default=[])
    parser.add_argument("--out", default="ab_eval.json")
    parser.add_argument("-o", "--override", nargs="*", default=[])
    args = parser.parse_args()
    data = ml10m_shaped(args.scale)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model={args.model}", "train.progress=false", *args.override])
    seed_everything(cfg.seed)
    configure_torch(cfg.train)
    model = build_model(cfg.model, data)
    model.fit(data)
    evaluator = build_evaluator(cfg)
    if model.trainable:
        trainer = build_trainer(cfg, evaluator)
        trainer.train_epoch(model, data, trainer.make_optimizer(model),
                            np.random.default_rng(cfg.seed if args.train_seed is None
                                                  else args.train_seed),
                            1, max_batches=args.train_batches)
    runs = variants(args, evaluator)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    reference = next(iter(runs))
    first = None  # the reference's counts in the warm-up round
    same = dict.fromkeys(runs, True)
    default_tile = evaluation.TILE_COLUMNS["cpu"]
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms every variant up, untimed
            for name, (variant, tile) in runs.items():
                evaluation.TILE_COLUMNS["cpu"] = tile
                started = time.perf_counter()
                counts = variant.rank_counts(model, data, "test")
                if round_:
                    seconds[name].append(time.perf_counter() - started)
                if first is None:
                    first = counts
                same[name] &= all(np.array_equal(getattr(counts, field), getattr(first, field))
                                  for field in ("greater", "equal", "users", "positions",
                                                "targets"))
    finally:
        evaluation.TILE_COLUMNS["cpu"] = default_tile
    report = {}
    for name, times in seconds.items():
        report[name] = {"best_s": min(times), "median_s": statistics.median(times),
                        "ratio": statistics.median(seconds[reference]) / statistics.median(times),
                        "identical": same[name], "seconds": times}
        print(f"{name:>28}: best {min(times):.2f} s, median {statistics.median(times):.2f} s, "
              f"{report[name]['ratio']:.3f}x the speed of {reference}, "
              f"{'identical counts' if same[name] else 'DIFFERENT counts'}", flush=True)
    report["_meta"] = {"model": args.model, "scale": args.scale, "rounds": args.rounds,
                       "train_batches": args.train_batches, "train_seed": args.train_seed,
                       "overrides": args.override,
                       "events": len(first), "threads": torch.get_num_threads(),
                       "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
