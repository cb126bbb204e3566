"""Memory and speed of full-softmax training at a large catalogue: Table 1's RNN (conf/model/ +
conf/rnn/table1.yaml: hidden 1000, batch 1000, window 20, loss full_softmax, Adam) at the LastFM
shape's 445,369 items, trained for `--steps` steps through the shared Trainer.

Usage: python scripts/bench_softmax.py [--model attentional_ugru] [--items 445369]
           [--users 992] [--steps 2] [--device cpu] [--out bench_softmax.json]
           [-o model.hidden_size=100 ...]

The data are synthetic: `--users` users (LastFM-1K has 992) with `--steps` x window + 1 events
each, so that every lane of every step is full, items drawn from a Zipf-like popularity over
`--items` items (every event a training event; no evaluation). Peak RSS is the process's
(ru_maxrss, data generation included). Prints the breakdown and writes JSON: parameters,
gradients and Adam's two moments in bytes, their sum (the model's own state), peak RSS and its
ratio to that sum, the RSS before the model was built, events/s and seconds per step; on CUDA
also the peak GPU memory torch allocated (`peak_gpu_bytes`, torch.cuda.max_memory_allocated)
and its ratio to the model's state.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from seqexp.core.resources import config_dir
from seqexp.data.sequences import SequenceData
from seqexp.run.experiment import (
    build_evaluator,
    build_model,
    build_trainer,
    configure_torch,
    resolve_device,
)

GB = 1e9


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def lastfm_like(n_users: int, n_items: int, events_per_user: int, seed: int = 0) -> SequenceData:
    """Every user `events_per_user` training events over Zipf(1.1)-popular items."""
    rng = np.random.default_rng(seed)
    n_events = n_users * events_per_user
    ranks = rng.zipf(1.1, size=n_events) - 1
    items = rng.permutation(n_items)[ranks % n_items].astype(np.int32)
    offsets = np.arange(0, n_events + 1, events_per_user, dtype=np.int64)
    timestamps = np.arange(n_events, dtype=np.int64) * 180
    return SequenceData(items=items, timestamps=timestamps, offsets=offsets,
                        train_end=offsets[1:].copy(), val_end=offsets[1:].copy(),
                        n_items=n_items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="attentional_ugru")
    parser.add_argument("--items", type=int, default=445_369)
    parser.add_argument("--users", type=int, default=992)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--out", default="bench_softmax.json")
    parser.add_argument("-o", "--override", action="append", default=[],
                        help="a config override, e.g. -o model.hidden_size=100")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={args.model}",
                                                       "train.progress=false", *args.override])
    configure_torch(cfg.train)
    torch.manual_seed(cfg.seed)
    data = lastfm_like(args.users, args.items, args.steps * cfg.model.window + 1)
    rss_before_model = current_rss_bytes()
    device = resolve_device(args.device)
    model = build_model(cfg.model, data).to(device)
    trainer = build_trainer(cfg, build_evaluator(cfg))
    optimizer = trainer.make_optimizer(model)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    started = time.perf_counter()
    stats = trainer.train_epoch(model, data, optimizer, np.random.default_rng(cfg.seed), 1,
                                max_batches=args.steps)
    seconds = time.perf_counter() - started
    adam = sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    state = 3 * parameters if adam == 0 else 2 * parameters + adam
    result = {
        "model": args.model, "items": args.items, "users": args.users, "steps": args.steps,
        "hidden_size": cfg.model.hidden_size, "batch_size": cfg.train.batch_size,
        "window": cfg.model.window, "softmax_block": cfg.model.softmax_block,
        "parameters_bytes": parameters, "gradients_bytes": parameters, "adam_bytes": adam,
        "model_state_bytes": state, "rss_before_model_bytes": rss_before_model,
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_over_model_state":
            peak_rss_bytes() / state, "seconds": seconds, "seconds_per_step":
            seconds / args.steps, "events_per_s": stats["train_events_per_s"], "train_loss":
            stats.get("train_loss"), "overrides": args.override,
        "device": str(device),
        "_meta": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "cpu": platform.processor() or platform.machine()},
    }
    if device.type == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_gpu_over_model_state"] = result["peak_gpu_bytes"] / state
        print(f"peak GPU memory: {result['peak_gpu_bytes'] / GB:.2f} GB "
              f"({result['peak_gpu_over_model_state']:.3f} x the model's state)")
    for key in ("parameters", "gradients", "adam", "model_state", "rss_before_model",
                "peak_rss"):
        print(f"{key:>18}: {result[key + '_bytes'] / GB:8.2f} GB")
    print(f"peak RSS / model state: {result['peak_rss_over_model_state']:.3f}; "
          f"{result['seconds_per_step']:.1f} s/step, {result['events_per_s']:.1f} events/s")
    with open(args.out, "w") as out:
        json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
