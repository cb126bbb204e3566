"""The full softmax's cross-entropy without its logit matrix: rows × items logits are computed a
block at a time, so memory grows with the block, not with the catalogue."""

from __future__ import annotations

import torch

# Fewest items per block: narrower blocks would make thin, slow products; rows are cut instead.
MIN_BLOCK_ITEMS = 512


def block_shape(n_rows: int, n_items: int, block_elements: int) -> tuple[int, int]:
    """(rows, items) of a block of at most `block_elements` logits (more only where a single
    row of MIN_BLOCK_ITEMS items exceeds it): all rows at once where that leaves blocks of at
    least MIN_BLOCK_ITEMS items, so each block's item matrix slice is read once per pass."""
    items = min(n_items, max(MIN_BLOCK_ITEMS, block_elements // max(n_rows, 1)))
    rows = min(n_rows, max(1, block_elements // items))
    return rows, items


def _block_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  mm_dtype: torch.dtype) -> torch.Tensor:
    """hidden · weightᵀ + bias, in float32 (`hidden` already in `mm_dtype`)."""
    if mm_dtype == bias.dtype:
        return torch.addmm(bias, hidden, weight.T)
    return torch.mm(hidden, weight.to(mm_dtype).T).to(bias.dtype).add_(bias)


class FullSoftmaxCE(torch.autograd.Function):
    """mean_p [log Σ_j e^{h_p·w_j + b_j} − (h_p·w_t + b_t)] over every item j, t being p's
    target: the dense cross-entropy, in blocks of `block_shape`. Forward keeps a running maximum
    and sum per row (online log-sum-exp) and saves only the rows' log-sum-exp; backward
    recomputes each block's logits, turns them into probabilities with it and adds that block's
    share of the three gradients (the target's −1 is added once, by index). Peak memory beyond
    the inputs and their gradients: one block of logits.

    `matmul_dtype` bfloat16 (under train.amp) runs the products in bfloat16, one block of the
    item matrix converted at a time; logits, sums and gradients stay in float32.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                targets: torch.Tensor, block_elements: int,
                matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
        n_rows, n_items = len(hidden), len(weight)
        rows, items = block_shape(n_rows, n_items, block_elements)
        mm_dtype = matmul_dtype or hidden.dtype
        hidden_mm = hidden.to(mm_dtype)
        log_total = torch.empty(n_rows, dtype=hidden.dtype, device=hidden.device)
        for r in range(0, n_rows, rows):
            h = hidden_mm[r:r + rows]
            top = torch.full((len(h),), float("-inf"), dtype=hidden.dtype, device=hidden.device)
            total = torch.zeros_like(top)
            for lo in range(0, n_items, items):
                logits = _block_logits(h, weight[lo:lo + items], bias[lo:lo + items], mm_dtype)
                new_top = torch.maximum(top, logits.amax(1))
                total.mul_((top - new_top).exp_())
                total += logits.sub_(new_top[:, None]).exp_().sum(1)
                top = new_top
            log_total[r:r + rows] = total.log_().add_(top)
        target_logits = ((hidden * weight.index_select(0, targets)).sum(1)
                         + bias.index_select(0, targets))
        ctx.save_for_backward(hidden, weight, bias, targets, log_total)
        ctx.block = (rows, items, mm_dtype)
        return (log_total - target_logits).mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, bias, targets, log_total = ctx.saved_tensors
        rows, items, mm_dtype = ctx.block
        n_rows, n_items = len(hidden), len(weight)
        scale = grad_loss / n_rows
        hidden_mm = hidden.to(mm_dtype)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight)
        grad_bias = torch.zeros_like(bias)
        for r in range(0, n_rows, rows):
            h = hidden_mm[r:r + rows]
            for lo in range(0, n_items, items):
                w = weight[lo:lo + items].to(mm_dtype)
                logits = _block_logits(h, w, bias[lo:lo + items], mm_dtype)
                # softmax probabilities × d loss / d logit's common factor
                probs = logits.sub_(log_total[r:r + rows, None]).exp_().mul_(scale)
                grad_bias[lo:lo + items] += probs.sum(0)
                probs_mm = probs.to(mm_dtype)
                if mm_dtype == hidden.dtype:
                    grad_hidden[r:r + rows].addmm_(probs_mm, w)
                    grad_weight[lo:lo + items].addmm_(probs_mm.T, h)
                else:  # bf16 products, summed over blocks in float32
                    grad_hidden[r:r + rows] += torch.mm(probs_mm, w).to(hidden.dtype)
                    grad_weight[lo:lo + items] += torch.mm(probs_mm.T, h).to(weight.dtype)
        # the one-hot target term: −scale at each row's target
        minus = (-scale).expand(n_rows).contiguous()
        grad_hidden.sub_(weight.index_select(0, targets) * scale)
        grad_weight.index_add_(0, targets, hidden * minus[:, None])
        grad_bias.index_add_(0, targets, minus)
        return grad_hidden, grad_weight, grad_bias, None, None, None
