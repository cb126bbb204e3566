"""The CPU-only kernels, in one place behind one switch (`train.cpu_kernels`).

Each is a faster way, on a CPU, to compute what the shared code path (the one CUDA takes)
computes; with the switch off, or on any other device, the CPU runs that shared path line for
line. `active(kernel, device)` is the only question the model and evaluator code asks.
Each kernel is here because it makes the default run or the CPU benchmark command at least
1.15x as fast; its measured ratios: docs/benchmarks.md "CPU kernels" (scripts/ab_eval.py
--kernels).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

# name -> what it does on a CPU
KERNELS = {
    "item_inputs": "a replay without dropout makes the cell's input-only products once per item "
                   "and looks them up per event (ItemInputs)",
    "replay_steps": f"the evaluation replay re-selects its running rows every {8} steps",
    "eval_blocks": "the evaluator's score blocks hold 3,000,000 scores (50,000,000 otherwise); "
                   "above 46,875 items, tiles of 256 points x 1,024 items, one per core",
    "dropout": "dropout masks drawn as uniform < keep, in place (not bernoulli_)",
    "sparse_negatives": "repeated sampled negatives merged into one column each, accidental hits "
                        "found by sorting",
    "sparse_entries": "a point's sparse score entries (expdecay_knn's) summed and counted in "
                      "compiled code (numba), each point on one of the cores",
    "dense_counts": "a dense score block's items above and level with each target, and its NaN "
                    "check, counted in one compiled pass (numba) that adds the item bias of "
                    "a product plus a bias (score_factors), not six whole-tensor passes over "
                    "scores made whole first",
    "key_rows": "where the first columns of a model's queries belong to the point's user (seqmf's "
                "user factors) and the CPU counts in tiles, points are scored in blocks of one "
                "user, that part made once per user as a row added while counting",
}
REPLAY_STEPS = 8
EVAL_BLOCK_ELEMENTS = 3_000_000

_enabled: set[str] = set(KERNELS)


def set_enabled(kernels: bool | Iterable[str]) -> None:
    """True: every kernel; False: none (the shared path); or the names of those to use."""
    chosen = set(KERNELS) if kernels is True else set() if kernels is False else set(kernels)
    unknown = chosen - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown CPU kernel(s) {sorted(unknown)}; known: {list(KERNELS)}")
    _enabled.clear()
    _enabled.update(chosen)


def enabled() -> frozenset[str]:
    return frozenset(_enabled)


def active(kernel: str, device: torch.device) -> bool:
    """Whether `kernel` replaces the shared code on `device`."""
    return device.type == "cpu" and kernel in _enabled


class ItemInputs:
    """Item inputs as ids into the embedding table, for a replay without dropout: a cell's
    products of the input alone (W x, ...) are then made once per item of the catalogue and
    looked up per event. The same values (each row of a product is computed alone), at a
    fraction of the cost when the replayed events far outnumber the items. `tables` holds the
    products made so far and is shared by every chunk of one replay."""

    def __init__(self, items: torch.Tensor, embedding: torch.Tensor,
                 tables: dict[nn.Module, torch.Tensor]) -> None:
        self.items = items
        self.embedding = embedding
        self.tables = tables

    def project(self, layer: nn.Module) -> torch.Tensor:
        if layer not in self.tables:
            self.tables[layer] = layer(self.embedding)
        return F.embedding(self.items, self.tables[layer])

    def dense(self) -> torch.Tensor:
        return F.embedding(self.items, self.embedding)


def project(layer: nn.Module, x: torch.Tensor | ItemInputs) -> torch.Tensor:
    """layer(x), through the per-item table when x is given as ItemInputs."""
    return x.project(layer) if isinstance(x, ItemInputs) else layer(x)


def dense(x: torch.Tensor | ItemInputs) -> torch.Tensor:
    return x.dense() if isinstance(x, ItemInputs) else x


class Dropout(nn.Dropout):
    """nn.Dropout (inverted: kept values scaled by 1/(1 − p)); with the `dropout` kernel the
    mask is drawn as uniform < 1 − p, faster on a CPU than the bernoulli_ that F.dropout uses
    (other random numbers, so other masks than the shared path's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not active("dropout", x.device) or self.p in (0.0, 1.0):
            return super().forward(x)
        keep = 1.0 - self.p
        scale = torch.rand(x.shape).lt_(keep)  # 1.0 where kept, in place: no bool mask
        return x * scale.to(x.dtype).mul_(1.0 / keep)
