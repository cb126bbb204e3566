"""`train.optimizer=lazy_adam`: Adam that updates, for a row-sparse gradient, only the rows it
holds (the rows a batch touched), and leaves every other row and its moments as they are.

A BPR step of `mf` touches some 2,000 of LastFM-1K's 445,369 item rows, yet dense Adam reads
and writes every row's parameter, gradient and two moments at every step (docs/benchmarks.md):
the step is bound by moving those bytes. With row-sparse gradients (models that give them for
their item tables: Recommender.set_sparse_gradients) this optimiser moves the touched rows
alone. It is "lazy Adam" (as torch.optim.SparseAdam and TensorFlow Addons' LazyAdam): a row's
moments decay only at the steps that touch it, so its results differ from Adam's, which moves
every row a little at every step by the momentum it has. Dense gradients get Adam's update
(torch.optim.Adam's formula, without amsgrad); weight_decay is Adam's coupled L2, added to the
touched rows' gradients only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


class LazyAdam(torch.optim.Optimizer):
    """Adam on dense gradients; on a sparse COO gradient, Adam on the rows it holds alone."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self._update(parameter, group)
        return loss

    def _update(self, parameter: torch.nn.Parameter, group: dict) -> None:
        state = self.state[parameter]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(parameter)
            state["exp_avg_sq"] = torch.zeros_like(parameter)
        state["step"] += 1
        step = state["step"].item()
        beta1, beta2 = group["betas"]
        step_size = group["lr"] / (1 - beta1 ** step)
        root_correction = math.sqrt(1 - beta2 ** step)
        grad = parameter.grad
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
            if group["weight_decay"]:
                values = values + group["weight_decay"] * parameter.index_select(0, rows)
            moments = (state["exp_avg"].index_select(0, rows),
                       state["exp_avg_sq"].index_select(0, rows))
        else:
            rows, values = None, grad
            if group["weight_decay"]:
                values = values + group["weight_decay"] * parameter
            moments = state["exp_avg"], state["exp_avg_sq"]
        exp_avg, exp_avg_sq = moments
        exp_avg.mul_(beta1).add_(values, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(values, values, value=1 - beta2)
        change = exp_avg / (exp_avg_sq.sqrt() / root_correction).add_(group["eps"])
        if rows is None:
            parameter.add_(change, alpha=-step_size)
            return
        # the rows are distinct (coalesced): gathers and copies, several times index_add_'s speed
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        parameter.index_copy_(0, rows, parameter.index_select(0, rows).sub_(change,
                                                                             alpha=step_size))


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ (the gradients scaled so that their joint norm is at most
    `max_norm`), also where some gradients are sparse COO tensors (coalesced first: a row a
    batch touched twice counts once, with its summed gradient), which torch's refuses."""
    parameters = [p for p in parameters if p.grad is not None]
    if not any(p.grad.is_sparse for p in parameters):
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return
    for parameter in parameters:
        if parameter.grad.is_sparse:
            parameter.grad = parameter.grad.coalesce()
    values = [p.grad.values() if p.grad.is_sparse else p.grad for p in parameters]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in values]))
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ formula
    for value in values:
        value.mul_(scale)
