"""The optimiser step of `mf` at LastFM-1K's catalogue: the bound of a BPR epoch on a CPU.

Usage: python scripts/bench_optimizer.py [--items 445942] [--users 992] [--factors 20]
           [--steps 15] [--threads 2] [--out bench_optimizer.json]

Adam updates every parameter at every step, so a step of `mf` (item factors and biases, user
factors: 9.38M floats at LastFM-1K's 445,942 items and Table 1's 20 factors) moves at least
28 bytes a parameter (read the parameter, its gradient and two moments, write three of them),
whatever the batch. This times the update alone, torch's fused Adam (what the trainer uses) and
the multi-tensor one, against the machine's copy rate in the same process, and prints the
epoch's lower bound: steps per epoch x the fused step. Prints JSON and writes it. Exits 0: a
benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

BYTES_PER_PARAMETER = 28  # read p, g, m, v; write p, m, v (float32)


def step_seconds(params: list[torch.nn.Parameter], steps: int, **options) -> float:
    """Seconds per Adam step over `params` (an untimed step first)."""
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.Adam(params, lr=0.01, **options)
    optimizer.step()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - started) / steps


def copy_rate(elements: int = 64 * 2**20, rounds: int = 10) -> float:
    """Bytes a second of a float32 copy (read and write) of `elements`."""
    source, target = torch.randn(elements), torch.empty(elements)
    target.copy_(source)
    started = time.perf_counter()
    for _ in range(rounds):
        target.copy_(source)
    return rounds * 2 * 4 * elements / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=445_942)
    parser.add_argument("--users", type=int, default=992)
    parser.add_argument("--factors", type=int, default=20)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-events", type=int, default=12_460_228,
                        help="training events of an epoch (LastFM-1K's shape)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench_optimizer.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = [torch.nn.Parameter(torch.randn(args.items, args.factors) * 0.1),
              torch.nn.Parameter(torch.zeros(args.items)),
              torch.nn.Parameter(torch.randn(args.users, args.factors) * 0.1)]
    elements = sum(p.numel() for p in params)
    fused = step_seconds(params, args.steps, fused=True)
    foreach = step_seconds(params, args.steps, foreach=True)
    steps = -(-args.train_events // args.batch_size)
    report = {"parameters": elements, "bytes_per_step": BYTES_PER_PARAMETER * elements,
              "copy_GB_per_s": copy_rate() / 1e9,
              "fused_s_per_step": fused, "foreach_s_per_step": foreach,
              "fused_GB_per_s": BYTES_PER_PARAMETER * elements / fused / 1e9,
              "foreach_GB_per_s": BYTES_PER_PARAMETER * elements / foreach / 1e9,
              "steps_per_epoch": steps, "epoch_bound_s": steps * fused}
    print(json.dumps(report, indent=1))
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
