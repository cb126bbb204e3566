"""Evaluation time of one trained model under several variants, taking turns in one process.

Usage: python scripts/ab_eval.py [--data bench|default] [--model M] [--scale 0.05]
           [--train-batches 300] [--train-seed S] [--rounds 5] [--baseline DIR]
           [--batch-users N ...] [--kernels [--kernel-batches 30]]
           [--out ab_eval.json] [-o model.hidden_size=100 model.loss=sampled_softmax ...]

On a shared machine the same code runs 10-20 % faster or slower from one minute to the next,
more than most single changes move it, so two separate runs say little about a change. This
script loads the data (`--data bench`, the default: the ML-10M-shaped data of
scripts/bench_models.py at `--scale`; `--data default`: the dataset and split of the composed
configuration, loaded as a run loads it, i.e. the embedded synthetic data of the default
`seqexp` run unless -o overrides it), composes the model (`--model`, else the configuration's
default, gru), trains it for `--train-batches` batches, then ranks the test events with the
shared Evaluator once per variant per round, the variants taking turns after one untimed round,
and reports each variant's best and median seconds, its ratio of medians to the first variant,
and whether its counts equal the first variant's exactly in every round.

Variants, the first being the reference:
- `current`: the working tree's evaluator with the model's settings;
- `--baseline DIR`: the evaluator module (seqexp/engine/evaluator.py) of another checkout, e.g. one
  made with `git worktree add DIR HEAD~1`, on the same model (it must fit the current
  package's interfaces);
- `--batch-users N`: the current evaluator with eval.batch_users=N.
Prints one line per variant and writes JSON {variant: {"best_s", "median_s", "ratio",
"identical"}, "_meta": {...}}.

`--kernels` measures instead each CPU kernel of seqexp/models/cpu_kernels.py against the
shared code path: per round, the variants `all` (every kernel) and `without K` (every kernel
but K) take turns, each timing what K speeds up: `--kernel-batches` training steps from a copy
of the trained model and its optimiser, the same batches for every variant (training kernels),
or the ranking of the test events (evaluation kernels). A kernel's ratio = median seconds
without it / median seconds with all. Writes {"train"|"eval": {variant: {...}}, "_meta"}.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from seqexp.core.resources import config_dir
from seqexp.data.loading import load_dataset
from seqexp.models import cpu_kernels
from seqexp.run.experiment import (
    build_evaluator,
    build_model,
    build_trainer,
    configure_torch,
    seed_everything,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import ml10m_shaped


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
    """name -> evaluator."""
    settings = {key: getattr(evaluator, key) for key in (
        "cutoffs", "batch_users", "max_block_elements", "exclude_seen", "progress",
        "val_max_scores", "seed")}
    out = {"current": evaluator}
    if args.baseline is not None:
        out[f"baseline {args.baseline}"] = load_baseline(args.baseline).Evaluator(**settings)
    for users in args.batch_users:
        out[f"batch_users={users}"] = copy.copy(evaluator)
        out[f"batch_users={users}"].batch_users = users
    return out


TRAIN_KERNELS = ("dropout", "sparse_negatives")
EVAL_KERNELS = ("item_inputs", "replay_steps", "eval_blocks", "dense_counts")


def time_training(model, trainer, data, seed: int, batches: int) -> float:
    """Seconds of `batches` training steps of a copy of `model` (fresh optimiser)."""
    model = copy.deepcopy(model)
    optimizer = trainer.make_optimizer(model)
    use_amp, loss_function = trainer._uses_amp(model.device, 1), trainer._loss_function(model)
    model.train()
    chosen = list(itertools.islice(
        model.training_batches(data, trainer.settings.batch_size, np.random.default_rng(seed)),
        batches))
    torch.manual_seed(seed)
    started = time.perf_counter()
    for batch in chosen:
        trainer._step(model, optimizer, loss_function, batch, use_amp)
    return time.perf_counter() - started


def measure_kernels(args, model, trainer, evaluator, data, seed: int) -> dict:
    """{"train"|"eval": {variant: {"median_s", "best_s", "ratio", "seconds"}}}."""
    groups = {"train": TRAIN_KERNELS, "eval": EVAL_KERNELS}
    seconds = {group: {name: [] for name in ["all", *(f"without {k}" for k in kernels)]}
               for group, kernels in groups.items()}
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms every variant up, untimed
            for group in groups:
                for name in seconds[group]:
                    off = name.removeprefix("without ")
                    cpu_kernels.set_enabled(set(cpu_kernels.KERNELS) - {off})
                    if group == "train":
                        took = time_training(model, trainer, data, seed, args.kernel_batches)
                    else:
                        started = time.perf_counter()
                        evaluator.rank_counts(model, data, "test")
                        took = time.perf_counter() - started
                    if round_:
                        seconds[group][name].append(took)
                        print(f"round {round_} {group} {name}: {took:.2f} s", flush=True)
    finally:
        cpu_kernels.set_enabled(True)
    report: dict = {}
    for group, variants_ in seconds.items():
        reference = statistics.median(variants_["all"])
        report[group] = {}
        for name, times in variants_.items():
            median = statistics.median(times)
            report[group][name] = {"best_s": min(times), "median_s": median,
                                   "ratio": median / reference, "seconds": times}
            print(f"{group:>5} {name:>26}: median {median:.2f} s, best {min(times):.2f} s; "
                  f"all kernels run {median / reference:.3f}x as fast", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["bench", "default"], default="bench",
                        help="bench: bench_models.py's ML-10M-shaped data at --scale; default: "
                             "the configuration's dataset, as `seqexp` loads it")
    parser.add_argument("--model", default=None,
                        help="a conf/model name (default: the configuration's, gru)")
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--train-batches", type=int, default=300)
    parser.add_argument("--train-seed", type=int, default=None,
                        help="seed of the training batches' order (default: the config's seed)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--batch-users", type=int, nargs="*", default=[])
    parser.add_argument("--kernels", action="store_true",
                        help="measure each CPU kernel against the shared path")
    parser.add_argument("--kernel-batches", type=int, default=30)
    parser.add_argument("--out", default="ab_eval.json")
    parser.add_argument("-o", "--override", nargs="*", default=[])
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            *([] if args.model is None else [f"model={args.model}"]), "train.progress=false",
            *args.override])
    data = (ml10m_shaped(args.scale) if args.data == "bench" else
            load_dataset(cfg.dataset, cfg.split, Path(cfg.paths.raw_dir),
                         Path(cfg.paths.cache_dir), progress=False))
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
    if args.kernels:
        report = measure_kernels(args, model, trainer, evaluator, data, cfg.seed)
        report["_meta"] = {"data": args.data, "model": str(cfg.model.name),
                           "scale": args.scale if args.data == "bench" else None,
                           "rounds": args.rounds, "train_batches": args.train_batches,
                           "kernel_batches": args.kernel_batches, "overrides": args.override,
                           "threads": torch.get_num_threads(),
                           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "torch": torch.__version__}
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
        return
    runs = variants(args, evaluator)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    reference = next(iter(runs))
    first = None  # the reference's counts in the warm-up round
    same = dict.fromkeys(runs, True)
    for round_ in range(args.rounds + 1):  # round 0 warms every variant up, untimed
        for name, variant in runs.items():
            started = time.perf_counter()
            counts = variant.rank_counts(model, data, "test")
            if round_:
                seconds[name].append(time.perf_counter() - started)
            if first is None:
                first = counts
            same[name] &= all(np.array_equal(getattr(counts, field), getattr(first, field))
                              for field in ("greater", "equal", "users", "positions",
                                            "targets"))
    report = {}
    for name, times in seconds.items():
        report[name] = {"best_s": min(times), "median_s": statistics.median(times),
                        "ratio": statistics.median(seconds[reference]) / statistics.median(times),
                        "identical": same[name], "seconds": times}
        print(f"{name:>28}: best {min(times):.2f} s, median {statistics.median(times):.2f} s, "
              f"{report[name]['ratio']:.3f}x the speed of {reference}, "
              f"{'identical counts' if same[name] else 'DIFFERENT counts'}", flush=True)
    report["_meta"] = {"data": args.data, "model": str(cfg.model.name),
                       "scale": args.scale if args.data == "bench" else None,
                       "rounds": args.rounds,
                       "train_batches": args.train_batches, "train_seed": args.train_seed,
                       "overrides": args.override,
                       "events": len(first), "threads": torch.get_num_threads(),
                       "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
