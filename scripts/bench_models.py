"""Training and evaluation throughput of seqexp models on MovieLens-10M-shaped synthetic data.

Usage: python scripts/bench_models.py --models gru itemknn [--scale 0.05] [--epochs 1]
           [--device auto] [--out bench_models.json] [-o model.hidden_size=100 ...]
           [--peer-dir DIR]

The data has 69,878 x scale users, 10,677 items and about 143 events per user (the shape of
ML-10M), from the embedded synthetic generator, split with user_tail. For each model (composed
from its conf/model YAML plus the -o overrides) it times the closed-form fit, `--epochs` training
epochs through the shared Trainer (events/s = training (input, target) pairs per second) and a
full-catalogue evaluation of the test events through the shared Evaluator (events/s = test
events ranked per second). Prints a table and writes JSON
{name: {"train_events_per_s": .., "eval_events_per_s": .., ...}}.

--peer-dir points at a checkout of GRU4Rec's official PyTorch code
(hidasib/GRU4Rec_PyTorch_Official, kept outside this repository: it is measured against, never
copied). The peer is run on the same data, device, hidden size (model.hidden_size) and batch
size (train.batch_size) with cross-entropy over sampled negatives (n_sample=2048, its own
sampling, otherwise its defaults) for the same number of epochs, and reported under the key
`gru4rec_official`: training events/s as its own per-epoch line prints them, evaluation events/s
of its batch_eval over each user's test events (one session per user, as it evaluates).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from seqexp.core.resources import config_dir
from seqexp.data.preprocess import build_sequences
from seqexp.data.synthetic import generate_synthetic
from seqexp.run import presets
from seqexp.run.experiment import (
    build_evaluator,
    build_model,
    build_trainer,
    configure_torch,
    resolve_device,
    seed_everything,
)

ML10M_USERS, ML10M_ITEMS = 69_878, 10_677


def ml10m_shaped(scale: float, seed: int = 0):
    raw = generate_synthetic(
        n_users=max(2, round(ML10M_USERS * scale)), n_items=ML10M_ITEMS, n_clusters=100,
        min_events=20, max_events=266, p_successor=0.45, p_favourite=0.2, n_favourites=6,
        generator_seed=seed,
    )
    cfg = presets.config()  # the default split and dataset filters
    return build_sequences(raw, cfg["split"], min_item_support=cfg["dataset"]["min_item_support"],
                           drop_repeats=cfg["dataset"]["drop_repeats"])


def bench_model(name: str, overrides: list[str], data, epochs: int, device: torch.device,
                warmup_batches: int = 0) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=[f"model={name}", "train.progress=false", *overrides])
    seed_everything(cfg.seed)
    configure_torch(cfg.train)
    model = build_model(cfg.model, data).to(device)
    evaluator = build_evaluator(cfg)
    trainer = build_trainer(cfg, evaluator)
    row: dict[str, float] = {}
    started = time.perf_counter()
    model.fit(data)
    _sync(device)
    row["fit_s"] = time.perf_counter() - started
    if model.trainable and epochs > 0:
        optimizer = trainer.make_optimizer(model)
        rng = np.random.default_rng(cfg.seed)
        if warmup_batches:  # kernel selection, allocator growth, compilation: not timed
            trainer.train_epoch(model, data, optimizer, rng, 0, max_batches=warmup_batches)
        events = seconds = 0.0
        for epoch in range(1, epochs + 1):
            stats = trainer.train_epoch(model, data, optimizer, rng, epoch)
            _sync(device)
            events += stats["train_events_per_s"] * stats["train_epoch_seconds"]
            seconds += stats["train_epoch_seconds"]
        row["train_events_per_s"] = events / seconds
        row["train_s"] = seconds
    if warmup_batches:
        evaluator.rank_counts(model, data, "val")
    _sync(device)
    started = time.perf_counter()
    counts = evaluator.rank_counts(model, data, "test")
    _sync(device)
    row["eval_s"] = time.perf_counter() - started
    row["eval_events_per_s"] = len(counts) / row["eval_s"]
    if device.type == "cuda":
        row["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    metrics = counts.metrics([20])
    row["test_mrr_at_20"], row["test_recall_at_20"] = metrics["mrr_at_20"], metrics[
        "recall_at_20"]
    return row


def bench_gru4rec_official(peer_dir: Path, data, hidden_size: int, batch_size: int,
                           epochs: int, device: torch.device) -> dict[str, float]:
    import pandas as pd

    sys.path.insert(0, str(peer_dir))
    from evaluation import batch_eval  # the peer's modules
    from gru4rec_pytorch import GRU4Rec

    users = data.event_users()
    position = np.arange(data.n_events)
    train = position < data.train_end[users]
    test = position >= data.val_end[users]

    def frame(mask: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({"SessionId": users[mask], "ItemId": data.items[mask],
                             "Time": data.timestamps[mask]})

    model = GRU4Rec(layers=[hidden_size], loss="cross-entropy", batch_size=batch_size,
                    n_sample=2048, n_epochs=epochs, device=device)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        started = time.perf_counter()
        # compatibility_mode=True (its default) fails with numpy 2 (float64 weight copies)
        model.fit(frame(train), compatibility_mode=False)
        _sync(device)
        fit_s = time.perf_counter() - started
    rates = [float(r) for r in re.findall(r"\|\s*([0-9.]+) e/s\]", printed.getvalue())]
    test_frame = frame(test)
    sessions = test_frame.groupby("SessionId").size()
    n_eval = int((sessions - 1).clip(lower=0).sum())
    with contextlib.redirect_stdout(io.StringIO()):
        started = time.perf_counter()
        recall, mrr = batch_eval(model, test_frame, cutoff=[20], batch_size=512)
        _sync(device)
        eval_s = time.perf_counter() - started
    return {"train_events_per_s": float(np.mean(rates)) if rates else float("nan"),
            "fit_s": fit_s, "eval_s": eval_s, "eval_events_per_s": n_eval / eval_s,
            "test_mrr_at_20_sessions": float(mrr[20]),
            "test_recall_at_20_sessions": float(recall[20])}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gru", "itemknn", "pop"])
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup-batches", type=int, default=None,
                        help="untimed training batches (and one untimed validation pass) "
                             "before timing; default 20 on CUDA, 0 on a CPU")
    parser.add_argument("--out", default="bench_models.json")
    parser.add_argument("--peer-dir", type=Path, default=None,
                        help="checkout of hidasib/GRU4Rec_PyTorch_Official to measure against")
    parser.add_argument("-o", "--override", nargs="*", default=[],
                        help="Hydra overrides for every model, e.g. model.hidden_size=100")
    args = parser.parse_args()
    device = resolve_device(args.device)
    warmup = args.warmup_batches
    if warmup is None:
        warmup = 20 if device.type == "cuda" else 0
    started = time.perf_counter()
    data = ml10m_shaped(args.scale)
    print(f"data: {data.n_users:,} users, {data.n_items:,} items, {data.n_events:,} events "
          f"({data.stats['train_events']:,} train, {data.stats['test_events']:,} test), "
          f"built in {time.perf_counter() - started:.1f} s; device {device}", flush=True)
    results: dict[str, dict] = {}
    for name in args.models:
        overrides = [o for o in args.override
                     if not o.startswith("model.") or _accepts(name, o)]
        results[name] = bench_model(name, overrides, data, args.epochs, device, warmup)
        print(f"{name:>18}: " + ", ".join(f"{k}={v:,.4g}" for k, v in results[name].items()),
              flush=True)
    if args.peer_dir is not None:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["model=gru", *args.override])
        results["gru4rec_official"] = bench_gru4rec_official(
            args.peer_dir, data, cfg.model.hidden_size, cfg.train.batch_size, args.epochs,
            device)
        print(f"{'gru4rec_official':>18}: " + ", ".join(
            f"{k}={v:,.4g}" for k, v in results["gru4rec_official"].items()), flush=True)
    report = {
        **results,
        "_meta": {"scale": args.scale, "epochs": args.epochs, "device": str(device),
                  "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                  else platform.processor(), "warmup_batches": warmup,
                  "overrides": args.override, "n_users": data.n_users,
                  "n_items": data.n_items, "n_events": data.n_events,
                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(),
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
