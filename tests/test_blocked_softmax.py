"""The blocked full softmax (seqexp/models/blocked_softmax.py): the dense cross-entropy's loss and
gradients, without a rows x items tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import recurrent, sequences
from seqexp.models.blocked_softmax import MIN_BLOCK_ITEMS, FullSoftmaxCE, block_shape


def test_block_shape_keeps_every_row_when_blocks_stay_wide_and_cuts_rows_otherwise():
    assert block_shape(20_000, 445_369, 1 << 26) == (20_000, 3355)
    assert block_shape(10, 300, 1 << 26) == (10, 300)  # the whole matrix is one block
    # 40 rows x 512 items > 10,000: rows are cut, items stay MIN_BLOCK_ITEMS wide
    assert block_shape(40, 5000, 10_000) == (19, MIN_BLOCK_ITEMS)
    assert block_shape(40, 5000, 100) == (1, MIN_BLOCK_ITEMS)


def _inputs(n_rows: int, n_items: int, hidden: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(n_rows, hidden, dtype=dtype, generator=generator).requires_grad_()
    # spread logits: the online maximum moves from block to block
    w = (3 * torch.randn(n_items, hidden, dtype=dtype, generator=generator)).requires_grad_()
    b = torch.randn(n_items, dtype=dtype, generator=generator).requires_grad_()
    targets = torch.randint(0, n_items, (n_rows,), generator=generator)
    targets[1] = targets[0]  # a target shared by two rows: its one-hot terms add up
    targets[2] = n_items - 1  # in the last, ragged block
    return h, w, b, targets


# (rows, items, block elements): one block; item blocks with a ragged last one; row and item
# blocks both (rows cut because a row of MIN_BLOCK_ITEMS items fills a block)
SHAPES = [(9, 700, 1 << 20), (9, 1300, 9 * 600), (9, 1300, 1200)]


@pytest.mark.parametrize(("n_rows", "n_items", "block"), SHAPES)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_loss_and_gradients_are_the_dense_cross_entropys(n_rows, n_items, block, dtype,
                                                         tolerance):
    h, w, b, targets = _inputs(n_rows, n_items, 6, dtype)
    loss = FullSoftmaxCE.apply(h, w, b, targets, block, None)
    grads = torch.autograd.grad(2.5 * loss, (h, w, b))  # an upstream factor reaches each
    dense = F.cross_entropy(F.linear(h, w, b), targets)
    wanted = torch.autograd.grad(2.5 * dense, (h, w, b))
    assert loss.item() == pytest.approx(dense.item(), rel=tolerance)
    for got, want in zip(grads, wanted, strict=True):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_bfloat16_products_stay_near_the_float32_loss_and_gradients():
    h, w, b, targets = _inputs(9, 1300, 6, torch.float32)
    w.data /= 3
    loss = FullSoftmaxCE.apply(h, w, b, targets, 9 * 600, torch.bfloat16)
    grads = torch.autograd.grad(loss, (h, w, b))
    dense = F.cross_entropy(F.linear(h, w, b), targets)
    wanted = torch.autograd.grad(dense, (h, w, b))
    assert loss.item() == pytest.approx(dense.item(), rel=2e-2)
    for got, want in zip(grads, wanted, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.0, atol=2e-2)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation returns while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_no_tensor_grows_with_rows_times_items_in_forward_or_backward():
    n_rows, n_items, hidden, block = 64, 4000, 4, 64 * 600
    h, w, b, targets = _inputs(n_rows, n_items, hidden, torch.float32)
    with LargestTensor() as seen:
        loss = FullSoftmaxCE.apply(h, w, b, targets, block, None)
        loss.backward()
    # the largest are one block of logits and the item matrix's gradient
    assert seen.largest <= max(block, n_items * hidden)
    assert seen.largest < n_rows * n_items // 4
    with LargestTensor() as dense:
        F.cross_entropy(F.linear(h, w, b), targets).backward()
    assert dense.largest == n_rows * n_items  # what the check would catch


def _loss_and_gradients(softmax_block: int) -> tuple[float, list[torch.Tensor]]:
    torch.manual_seed(3)
    users = [list(np.random.default_rng(u).integers(0, 700, size=30)) for u in range(4)]
    data = sequences(users, n_items=700)
    model = recurrent(700, 4, cell="attentional_ugru", hidden_size=8, window=5,
                                 softmax_block=softmax_block)
    batch = next(model.training_batches(data, 4, np.random.default_rng(0)))
    loss = model.training_loss(batch)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def test_the_model_trains_with_the_same_loss_and_gradients_blocked_or_whole():
    whole_loss, whole = _loss_and_gradients(1 << 30)  # 20 rows x 700 items: one dense block
    blocked_loss, blocked = _loss_and_gradients(20 * 600)  # blocks of 600 + 100 items
    assert blocked_loss == pytest.approx(whole_loss, rel=1e-6)
    for got, want in zip(blocked, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
