"""Training and evaluation throughput of seqexp models on MovieLens-10M-shaped synthetic data.

Usage: python scripts/bench_models.py --models gru itemknn [--scale 0.05] [--epochs 1]
           [--device auto] [--out bench_models.json] [-o model.hidden_size=100 ...]

The data has 69,878 x scale users, 10,677 items and about 143 events per user (the shape of
ML-10M), from the embedded synthetic generator, split with user_tail. For each model (composed
from its conf/model YAML plus the -o overrides) it times the closed-form fit, `--epochs` training
epochs through the shared Trainer (events/s = training (input, target) pairs per second) and a
full-catalogue evaluation of the test events through the shared Evaluator (events/s = test
events ranked per second). Prints a table and writes JSON
{name: {"train_events_per_s": .., "eval_events_per_s": .., ...}}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from seqexp.data.preprocess import build_sequences
from seqexp.data.synthetic import generate_synthetic
from seqexp.evaluation import Evaluator
from seqexp.experiment import build_model, resolve_device, seed_everything
from seqexp.resources import config_dir
from seqexp.training import Trainer

ML10M_USERS, ML10M_ITEMS = 69_878, 10_677


def ml10m_shaped(scale: float, seed: int = 0):
    raw = generate_synthetic(
        n_users=max(2, round(ML10M_USERS * scale)), n_items=ML10M_ITEMS, n_clusters=100,
        min_events=20, max_events=266, generator_seed=seed,
    )
    return build_sequences(raw, {"name": "user_tail", "test_frac": 0.2, "val_frac": 0.1})


def bench_model(name: str, overrides: list[str], data, epochs: int, device: torch.device
                ) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={name}", *overrides])
    seed_everything(cfg.seed)
    model = build_model(cfg.model, data).to(device)
    evaluator = Evaluator(list(cfg.eval.cutoffs), cfg.eval.batch_users,
                          int(cfg.eval.max_block_elements))
    trainer = Trainer(evaluator, epochs=epochs, batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                      weight_decay=cfg.train.weight_decay, optimizer=cfg.train.optimizer,
                      grad_clip=cfg.train.grad_clip,
                      progress=False, seed=cfg.seed)
    row: dict[str, float] = {}
    started = time.perf_counter()
    model.fit(data)
    _sync(device)
    row["fit_s"] = time.perf_counter() - started
    if model.trainable and epochs > 0:
        optimizer = trainer.make_optimizer(model)
        rng = np.random.default_rng(cfg.seed)
        events = seconds = 0.0
        for epoch in range(1, epochs + 1):
            stats = trainer.train_epoch(model, data, optimizer, rng, epoch)
            _sync(device)
            events += stats["train_events_per_s"] * stats["train_epoch_seconds"]
            seconds += stats["train_epoch_seconds"]
        row["train_events_per_s"] = events / seconds
        row["train_s"] = seconds
    started = time.perf_counter()
    counts = evaluator.rank_counts(model, data, "test")
    _sync(device)
    row["eval_s"] = time.perf_counter() - started
    row["eval_events_per_s"] = len(counts) / row["eval_s"]
    metrics = counts.metrics([20])
    row["test_mrr_at_20"], row["test_recall_at_20"] = metrics["mrr_at_20"], metrics[
        "recall_at_20"]
    return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gru", "itemknn", "pop"])
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench_models.json")
    parser.add_argument("-o", "--override", nargs="*", default=[],
                        help="Hydra overrides for every model, e.g. model.hidden_size=100")
    args = parser.parse_args()
    device = resolve_device(args.device)
    started = time.perf_counter()
    data = ml10m_shaped(args.scale)
    print(f"data: {data.n_users:,} users, {data.n_items:,} items, {data.n_events:,} events "
          f"({data.stats['train_events']:,} train, {data.stats['test_events']:,} test), "
          f"built in {time.perf_counter() - started:.1f} s; device {device}", flush=True)
    results: dict[str, dict] = {}
    for name in args.models:
        overrides = [o for o in args.override
                     if not o.startswith("model.") or _accepts(name, o)]
        results[name] = bench_model(name, overrides, data, args.epochs, device)
        print(f"{name:>18}: " + ", ".join(f"{k}={v:,.4g}" for k, v in results[name].items()),
              flush=True)
    report = {
        **results,
        "_meta": {"scale": args.scale, "epochs": args.epochs, "device": str(device),
                  "overrides": args.override, "n_users": data.n_users,
                  "n_items": data.n_items, "n_events": data.n_events,
                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "machine": platform.platform(), "python": sys.version.split()[0]},
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def _accepts(model: str, override: str) -> bool:
    """Whether `model.key=...` applies to this model (its YAML has the key)."""
    key = override.split("=", 1)[0].split(".", 1)[1]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}"])
    return key in cfg.model


if __name__ == "__main__":
    main()
