"""Matrix-product rates (GFLOP/s) of the shapes that bound the RNNs' CPU training and evaluation,
in float32 and bfloat16.

Usage: python scripts/bench_matmul.py [--repeats 5] [--out bench_matmul.json]

Shapes (hidden 100, 256 lanes x 20 steps, 2048 sampled negatives, ML-10M's 10,677 items):
- softmax_logits     [256 x 100] . [100 x 2049]   one row block of SampledSoftmaxCE, forward
- softmax_grad_hidden [256 x 2049] . [2049 x 100] its gradient with respect to the hidden states
- softmax_grad_weight [2049 x 256] . [256 x 100]  its gradient with respect to the negatives
- recurrence_step    [256 x 100] . [100 x 300]    one GRU step's hidden-state product
- eval_scores        [280 x 100] . [100 x 10677]  one evaluation score block, whole rows
- eval_score_tile    [280 x 100] . [100 x 1024]   a 1,024-item tile of that block (1.1 MB of scores)

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
}
CALLS = 20
# torch's own kernels, MKL's and oneDNN's: what to set to emulate an AVX2 machine
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def best_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(CALLS):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - started) / CALLS)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_matmul.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict[str, dict] = {}
    for name, (m, k, n) in SHAPES.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        row = {}
        for dtype in (torch.float32, torch.bfloat16):
            seconds = best_seconds(a.to(dtype), b.to(dtype), args.repeats)
            row[f"{str(dtype).removeprefix('torch.')}_gflops"] = 2 * m * k * n / seconds / 1e9
        row["bf16_speedup"] = row["bfloat16_gflops"] / row["float32_gflops"]
        results[name] = row
        print(f"{name:>20} [{m} x {k}] . [{k} x {n}]: float32 {row['float32_gflops']:,.0f} "
              f"GFLOP/s, bfloat16 {row['bfloat16_gflops']:,.0f} GFLOP/s "
              f"({row['bf16_speedup']:.1f}x)", flush=True)
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
