"""What a run, or a model read from a checkpoint, will allocate: estimated before anything is,
from the model built on the meta device (shapes without storage, the same for every
registered model) and the sizes of the data, and checked against the memory of the device.

A run's estimate (docs/long-runs.md, "Memory estimate") counts, at float32:
- the model's tensors: its parameters and buffers (a closed-form model's fitted tables are
  buffers made by its constructor);
- their gradients and the optimiser's state (seqexp.engine.trainer.OPTIMIZER_STATES);
- a closed-form fit's scratch: the model's `fit_elements` (item-kNN's neighbour keys);
- one training step: the model's `step_elements` (activations, logits or scores);
- one evaluation score block (the evaluator's points x items block and its comparison).
The fit, a training step and an evaluation never hold their memory at once: the peak is the
model's part plus the largest of the three. A run that cannot fit names the key whose part is
largest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch.overrides import TorchFunctionMode

from seqexp.core.errors import SeqexpError
from seqexp.engine.evaluator import Evaluator
from seqexp.engine.trainer import OPTIMIZER_STATES
from seqexp.models.base import Recommender

FLOAT_BYTES = 4
# A model built with these keyword arguments beside n_items and n_users (a partial of the
# model's class with its config, or the class itself).
ModelBuild = Callable[..., Recommender]
_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB")


def human(size: float) -> str:
    """An estimate in bytes as people read it (decimal units): ~1.5 GB, ~800 TB; inf (a
    tensor too large to address) as such."""
    if math.isinf(size):
        return "over 9.2 EB (more than torch can address)"
    return f"~{_units(size)}"


def _units(size: float) -> str:
    if math.isinf(size):
        return "over 9.2 EB"
    for unit in _UNITS:
        if size < 1000 or unit == _UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" or size >= 100 else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Part:
    """One part of an estimate: what it is, its bytes (inf: beyond what a tensor can address),
    the config key that lowers it and when it is held (model, fit, train or eval)."""

    what: str
    size: float
    key: str
    phase: str = "model"


@dataclass(frozen=True)
class Estimate:
    """The parts of what a run or a model allocates and the memory of its device."""

    parts: tuple[Part, ...]
    available: int | None  # bytes free on the device now; None where it cannot be read
    where: str  # "the machine" (CPU RAM) or the CUDA device

    @property
    def peak(self) -> float:
        """The model's part, plus the largest of the fit, one training step and one evaluation
        block (one after the other, never at once)."""
        held = {phase: sum(p.size for p in self.parts if p.phase == phase)
                for phase in ("model", "fit", "train", "eval")}
        return held["model"] + max(held["fit"], held["train"], held["eval"])

    def breakdown(self) -> str:
        return ", ".join(f"{p.what} {_units(p.size)}" for p in self.parts if p.size)

    def line(self) -> str:
        """The log line of every run: the estimate, its parts and the memory available."""
        free = "an unknown amount" if self.available is None else _units(self.available)
        return f"memory estimate: {human(self.peak)} ({self.breakdown()}); {self.where} has " \
               f"{free} available"

    def refusal(self, values: Mapping[str, Any], subject: str = "this run",
                advice: str = "lower {key}") -> SeqexpError | None:
        """None when the peak fits the available memory, else the one line naming the key of
        the largest part (its value from `values`, the flattened config), what it makes
        `subject` need, and `advice` (`{key}`: that key)."""
        if self.available is None or self.peak <= self.available:
            return None
        largest = max(self.parts, key=lambda p: p.size)
        value = values.get(largest.key, "?")
        return SeqexpError(f"{largest.key}={value} makes {subject} need {human(self.peak)} "
                           f"({self.breakdown()}) but {self.where} has "
                           f"{_units(self.available)} available; "
                           f"{advice.format(key=largest.key)}")


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes free now, what the device is called in a message): the free memory of a CUDA
    device, else the machine's available RAM (what it can give without swapping)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), str(device)
    if device.type != "cpu":
        return None, str(device)
    return int(psutil.virtual_memory().available), "the machine"


class _NoRandomFill(TorchFunctionMode):
    """Random draws made shapes only: on the meta device there is nothing to fill, and the
    meta kernels of normal_ and randn are Python decompositions whose first call imports
    torch's reference ops (seconds, in every process that loads or runs a model)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "normal_":  # Tensor.normal_ and torch.nn.init.normal_(tensor=...)
            return args[0] if args else kwargs["tensor"]
        if name == "randn":
            kwargs.pop("generator", None)
            return torch.empty(*args, **kwargs)
        return func(*args, **kwargs)


def meta_model(build: ModelBuild, sizes: Mapping[str, int],
               changes: Mapping[str, Any] | None = None) -> Recommender | None:
    """The model `build` makes, on the meta device: every tensor's shape, no storage; None
    when a tensor's size is beyond what torch can address. `changes`: keyword arguments that
    replace the build's own."""
    try:
        with torch.device("meta"), _NoRandomFill():
            return build(**sizes, **(changes or {}))
    except RuntimeError as exc:
        if "overflow" in str(exc):  # "Storage size calculation overflowed with sizes=..."
            return None
        raise


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model: Recommender | None) -> float:
    """Bytes of a (meta) model's parameters and buffers; inf for a model beyond addressing."""
    if model is None:
        return math.inf
    return tensor_bytes([*model.parameters(), *model.buffers()])


def size_key(build: ModelBuild, sizes: Mapping[str, int], options: Mapping[str, Any]) -> str:
    """The model key that makes the model large: the integer option above 1 whose setting to 1
    shrinks the model most (a model of any registered class, built on the meta device);
    `model.*` when none does."""
    current = model_bytes(meta_model(build, sizes))
    best, best_bytes = "model.*", current
    for key, value in options.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 1:
            continue
        try:
            smaller = model_bytes(meta_model(build, sizes, {key: 1}))
        except Exception:  # a value the class refuses (n_heads must divide ...)
            continue
        if smaller < best_bytes:
            best, best_bytes = f"model.{key}", smaller
    return best


def model_parts(build: ModelBuild, sizes: Mapping[str, int], options: Mapping[str, Any]
                ) -> tuple[Recommender | None, list[Part]]:
    """The meta model and its tensors as parts: parameters and buffers, each with the model
    key that makes them large (found only when they are: it takes a build per key)."""
    model = meta_model(build, sizes)
    if model is None:
        return None, [Part("parameters", math.inf, size_key(build, sizes, options))]
    parameters = tensor_bytes(model.parameters())
    buffers = tensor_bytes(model.buffers())
    key = size_key(build, sizes, options) if parameters + buffers > 1 << 30 else "model.*"
    return model, [Part("parameters", parameters, key), Part("buffers", buffers, key)]


def run_estimate(build: ModelBuild, sizes: Mapping[str, int], options: Mapping[str, Any],
                 training: tuple[str, int, int], evaluator: Evaluator,
                 device: torch.device) -> Estimate:
    """What a run allocates: the model's tensors (`options`: its config's values), their
    gradients and optimiser state, one training step of `training` = (optimiser, batch size,
    training events) and one evaluation block, against the memory of `device`."""
    optimizer, batch_size, n_events = training
    model, parts = model_parts(build, sizes, options)
    if model is not None:  # else its parameters alone are beyond any memory
        trained = tensor_bytes(p for p in model.parameters() if p.requires_grad)
        key = parts[0].key
        parts += [Part("gradients", trained, key),
                  Part("optimiser state", OPTIMIZER_STATES.get(optimizer, 2) * trained, key)]
        parts += [Part(what, FLOAT_BYTES * elements, bound, "train")
                  for what, (elements, bound) in model.step_elements(batch_size, n_events).items()]
        parts += [Part(what, FLOAT_BYTES * elements, bound, "fit")
                  for what, (elements, bound) in model.fit_elements(n_events).items()]
    n_items = sizes["n_items"]
    block = min(evaluator.block_elements(device, n_items), max(n_events, 1) * n_items)
    # the scores and the comparison with each target's score
    parts.append(Part("evaluation block", 2 * FLOAT_BYTES * block, "eval.max_block_elements",
                      "eval"))
    return Estimate(tuple(parts), *available_memory(device))


def model_estimate(build: ModelBuild, sizes: Mapping[str, int], options: Mapping[str, Any],
                   device: torch.device) -> tuple[Recommender | None, Estimate]:
    """The meta model and what building it allocates (its parameters and buffers), against
    the memory of `device`: a loaded checkpoint's check before its model is built."""
    model, parts = model_parts(build, sizes, options)
    return model, Estimate(tuple(parts), *available_memory(device))
