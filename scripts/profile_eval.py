"""Where evaluation (and a training step) of an RNN spends its time, on ML-10M-shaped data.

Usage: python scripts/profile_eval.py [--scale 0.05] [--train-batches 20] [--out profile.json]
           [-o model.hidden_size=100 model.loss=sampled_softmax train.batch_size=256 ...]

Builds the data of scripts/bench_models.py, composes model=gru (plus the -o overrides), trains
`--train-batches` batches (so that the scores are not those of an untrained model) and ranks the
test events with the shared Evaluator twice: once timed by phase, once under torch.profiler.
Evaluation phases: history replay (the model's prediction_states), score products (its
score_items), rank counting (the rest of count_ranks) and everything else (batch building,
copies, metrics). Python overhead = wall time not spent inside any torch operator (the
profiler's operator self times summed). Minor page faults = those of the timed evaluation
(memory the allocator had to get from the system again). Training: the profiler's operator
self times of the `--train-batches` batches, grouped into matrix products, the optimizer step
and the rest. Prints both breakdowns and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torch.profiler import ProfilerActivity, profile

import seqexp.engine.evaluator as evaluation
from seqexp.core.resources import config_dir
from seqexp.run.experiment import build_evaluator, build_model, build_trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import ml10m_shaped

PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def operator_self_seconds(prof) -> dict[str, float]:
    """Self CPU seconds per operator name (top-level events only, so nothing counts twice)."""
    return {event.key: event.self_cpu_time_total / 1e6 for event in prof.key_averages()}


def timed(function, bucket: dict[str, float], key: str):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            bucket[key] += time.perf_counter() - started
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--train-batches", type=int, default=20)
    parser.add_argument("--out", default="profile_eval.json")
    parser.add_argument("-o", "--override", nargs="*", default=[])
    args = parser.parse_args()
    data = ml10m_shaped(args.scale)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=["model=gru", "train.progress=false", *args.override])
    seed_everything(cfg.seed)
    model = build_model(cfg.model, data)
    model.fit(data)
    evaluator = build_evaluator(cfg)
    trainer = build_trainer(cfg, evaluator)
    optimizer = trainer.make_optimizer(model)
    rng = np.random.default_rng(cfg.seed)
    trainer.train_epoch(model, data, optimizer, rng, 0, max_batches=3)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        trainer.train_epoch(model, data, optimizer, rng, 1, max_batches=args.train_batches)
        train_wall = time.perf_counter() - started
    ops = operator_self_seconds(prof)
    products = sum(ops.get(name, 0.0) for name in PRODUCTS)
    adam = sum(v for k, v in ops.items() if "adam" in k.lower())
    inside = sum(ops.values())
    train = {"wall_s": train_wall, "matrix_products_s": products, "optimizer_s": adam,
             "other_operators_s": inside - products - adam,
             "python_overhead_s": max(train_wall - inside, 0.0)}

    bucket = {"replay": 0.0, "scores": 0.0, "count": 0.0}
    model.prediction_states = timed(model.prediction_states, bucket, "replay")
    model.score_items = timed(model.score_items, bucket, "scores")
    original_count = evaluation.count_ranks
    evaluation.count_ranks = timed(original_count, bucket, "count")
    try:
        evaluator.rank_counts(model, data, "test")  # warm-up
        bucket.update(replay=0.0, scores=0.0, count=0.0)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        counts = evaluator.rank_counts(model, data, "test")
        eval_wall = time.perf_counter() - started
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        phases = dict(bucket)
    finally:
        evaluation.count_ranks = original_count
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        evaluator.rank_counts(model, data, "test")
        profiled_wall = time.perf_counter() - started
    inside = sum(operator_self_seconds(prof).values())
    evaluate = {"events": len(counts), "wall_s": eval_wall,
                "events_per_s": len(counts) / eval_wall,
                "history_replay_s": phases["replay"], "score_products_s": phases["scores"],
                "rank_counting_s": phases["count"] - phases["scores"],
                "other_s": eval_wall - phases["replay"] - phases["count"],
                "minor_page_faults": faults,
                "python_overhead_share": max(profiled_wall - inside, 0.0) / profiled_wall}
    for name, part in (("training", train), ("evaluation", evaluate)):
        print(f"{name}: " + ", ".join(f"{k}={v:,.3g}" for k, v in part.items()), flush=True)
    report = {"training": train, "evaluation": evaluate,
              "_meta": {"scale": args.scale, "train_batches": args.train_batches,
                        "overrides": args.override, "threads": torch.get_num_threads(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "torch": torch.__version__}}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
