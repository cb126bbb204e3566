"""Matrix-product rates (GFLOP/s) of the shapes that bound the RNNs' CPU training and evaluation,
in float32 and bfloat16.

Usage: python scripts/bench_matmul.py [--repeats 5] [--out bench_matmul.json]
           [--shapes eval_lastfm_h100 ...] [--float32-only]

Shapes (hidden 100, 256 lanes x 20 steps, 2048 sampled negatives, ML-10M's 10,677 items):
- softmax_logits     [256 x 100] . [100 x 2049]   one row block of SampledSoftmaxCE, forward
- softmax_grad_hidden [256 x 2049] . [2049 x 100] its gradient with respect to the hidden states
- softmax_grad_weight [2049 x 256] . [256 x 100]  its gradient with respect to the negatives
- recurrence_step    [256 x 100] . [100 x 300]    one GRU step's hidden-state product
- eval_scores        [280 x 100] . [100 x 10677]  one evaluation score block, whole rows
- eval_score_tile    [280 x 100] . [100 x 1024]   a 1,024-item tile of that block (1.1 MB of scores)
- eval_lastfm_h<H>_p<P> [P x H] . [H x 445369]   an evaluation score block at LastFM-1K's
  catalogue (hidden H = 100 or 1000): P = 6 points is what a 3,000,000-element block holds,
  P = 64 the evaluator's former whole-row blocks at large catalogues (scripts/bench_dense_eval.py)
- eval_lastfm_h<H>_tile [128 x H] . [H x 2048]   the evaluator's CPU tile at such catalogues

Each product is timed on fresh random operands after two untimed calls; the best of `--repeats`
rounds of 20 calls is reported. Prints a table and writes JSON
{shape: {"float32_gflops": .., "bfloat16_gflops": .., "bf16_speedup": ..}, "_meta": {...}};
`_meta` records torch's CPU capability and the instruction-set caps set in the environment
(ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), so that a run meant to
emulate an AVX2 machine on an AVX-512 one shows whether the caps took.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

SHAPES = {  # name: (m, k, n) for [m x k] . [k x n]
    "softmax_logits": (256, 100, 2049),
    "softmax_grad_hidden": (256, 2049, 100),
    "softmax_grad_weight": (2049, 256, 100),
    "recurrence_step": (256, 100, 300),
    "eval_scores": (280, 100, 10677),
    "eval_score_tile": (280, 100, 1024),
    "eval_lastfm_h100_p6": (6, 100, 445_369),
    "eval_lastfm_h100_p64": (64, 100, 445_369),
    "eval_lastfm_h1000_p6": (6, 1000, 445_369),
    "eval_lastfm_h1000_p64": (64, 1000, 445_369),
    "eval_lastfm_h100_tile": (256, 100, 1024),
    "eval_lastfm_h1000_tile": (256, 1000, 1024),
}
CALLS = 20
# Calls per round shrink for large products: a round of about this many FLOP at least.
ROUND_FLOP = 2e10
# torch's own kernels, MKL's and oneDNN's: what to set to emulate an AVX2 machine
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def best_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
    calls = max(1, min(CALLS, round(ROUND_FLOP / (2 * a.shape[0] * a.shape[1] * b.shape[1]))))
    for _ in range(2):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_matmul.json")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--float32-only", action="store_true")
    args = parser.parse_args()
    dtypes = (torch.float32,) if args.float32_only else (torch.float32, torch.bfloat16)
    torch.manual_seed(0)
    results: dict[str, dict] = {}
    for name in args.shapes:
        m, k, n = SHAPES[name]
        a, b = torch.randn(m, k), torch.randn(k, n)
        row = {}
        for dtype in dtypes:
            seconds = best_seconds(a.to(dtype), b.to(dtype), args.repeats)
            row[f"{str(dtype).removeprefix('torch.')}_gflops"] = 2 * m * k * n / seconds / 1e9
        line = f"{name:>20} [{m} x {k}] . [{k} x {n}]: float32 {row['float32_gflops']:,.0f} GFLOP/s"
        if "bfloat16_gflops" in row:
            row["bf16_speedup"] = row["bfloat16_gflops"] / row["float32_gflops"]
            line += (f", bfloat16 {row['bfloat16_gflops']:,.0f} GFLOP/s "
                     f"({row['bf16_speedup']:.1f}x)")
        results[name] = row
        print(line, flush=True)
    results["_meta"] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "calls_per_round": CALLS, "repeats": args.repeats,
        # instruction-set caps that make an AVX-512 machine run AVX2 kernels (unset: none)
        "isa_caps": {name: os.environ.get(name) for name in ISA_CAPS},
    }
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
