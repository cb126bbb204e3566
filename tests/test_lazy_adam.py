"""train.optimizer=lazy_adam: Adam's update on dense gradients, the touched rows alone on
row-sparse ones (by hand), gradient clipping over sparse and dense gradients, mf's sparse
gradients through the trainer, and a stopped run that resumes bit for bit."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import conformance
from helpers import make_evaluator, sequences, train_settings
from seqexp.engine.lazy_adam import LazyAdam, clip_gradients
from seqexp.engine.trainer import Trainer
from seqexp.run import presets


def test_dense_gradients_get_adams_update_with_its_weight_decay():
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(5, 3))
    adam = torch.nn.Parameter(ours.detach().clone())
    optimizers = (LazyAdam([ours], lr=0.01, weight_decay=0.1),
                  torch.optim.Adam([adam], lr=0.01, weight_decay=0.1))
    for _ in range(4):
        gradient = torch.randn(5, 3)
        for parameter, optimizer in zip((ours, adam), optimizers, strict=True):
            parameter.grad = gradient.clone()
            optimizer.step()
    torch.testing.assert_close(ours, adam, rtol=0, atol=1e-7)


def _sparse_step(table: torch.nn.Parameter, optimizer: LazyAdam, rows: list[int],
                 weights: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    (F.embedding(torch.tensor(rows), table, sparse=True) * weights).sum().backward()
    assert table.grad.is_sparse
    optimizer.step()


def test_a_sparse_gradient_moves_the_rows_it_holds_and_nothing_else():
    table = torch.nn.Parameter(torch.zeros(4, 2))
    optimizer = LazyAdam([table], lr=0.1)
    # row 1 twice (gradients 1 and 2 summed: 3, -1), row 3 once (-2, 0.5)
    weights = torch.tensor([[1.0, 0.0], [2.0, -1.0], [-2.0, 0.5]])
    _sparse_step(table, optimizer, [1, 1, 3], weights)
    # Adam's first step: m / (1 - b1) = g, sqrt(v / (1 - b2)) = |g|: lr * g / (|g| + eps)
    expected = torch.zeros(4, 2)
    expected[1] = -0.1 * torch.tensor([3.0, -1.0]) / (torch.tensor([3.0, 1.0]) + 1e-8)
    expected[3] = -0.1 * torch.tensor([-2.0, 0.5]) / (torch.tensor([2.0, 0.5]) + 1e-8)
    torch.testing.assert_close(table.detach(), expected, rtol=0, atol=1e-7)
    after_first = table.detach().clone()
    moments = optimizer.state[table]["exp_avg"].clone(), optimizer.state[table]["exp_avg_sq"]
    kept = moments[1].clone()
    _sparse_step(table, optimizer, [0], torch.tensor([[1.0, 1.0]]))
    # rows 1 and 3 untouched: their values and moments stay, where Adam would move them on
    assert torch.equal(table.detach()[[1, 3]], after_first[[1, 3]])
    assert torch.equal(optimizer.state[table]["exp_avg"][[1, 3]], moments[0][[1, 3]])
    assert torch.equal(optimizer.state[table]["exp_avg_sq"][[1, 3]], kept[[1, 3]])
    # row 0 at the second step: bias corrections of step 2 on its first gradient
    m, v = 0.1 * 1.0, 0.001 * 1.0
    step = 0.1 / (1 - 0.9**2) * m / (np.sqrt(v) / np.sqrt(1 - 0.999**2) + 1e-8)
    torch.testing.assert_close(table.detach()[0], torch.full((2,), -step, dtype=torch.float32))


def test_rows_touched_at_every_step_follow_adam_and_the_others_stay_put():
    """Rows 1 and 3 have a gradient at every step: their moments and values are Adam's (with
    its weight decay); rows 0 and 2, whose gradients are zero, do not move, where Adam's
    weight decay and momentum move them."""
    torch.manual_seed(1)
    ours = torch.nn.Parameter(torch.randn(4, 2))
    adam = torch.nn.Parameter(ours.detach().clone())
    lazy, dense = (LazyAdam([ours], lr=0.05, weight_decay=0.1),
                   torch.optim.Adam([adam], lr=0.05, weight_decay=0.1))
    start = ours.detach().clone()
    for _ in range(3):
        weights = torch.randn(2, 2)
        _sparse_step(ours, lazy, [1, 3], weights)
        adam.grad = torch.zeros(4, 2).index_add_(0, torch.tensor([1, 3]), weights)
        dense.step()
    torch.testing.assert_close(ours.detach()[[1, 3]], adam.detach()[[1, 3]], rtol=0, atol=1e-6)
    assert torch.equal(ours.detach()[[0, 2]], start[[0, 2]])
    assert not torch.allclose(adam.detach()[[0, 2]], start[[0, 2]])


def test_clipping_scales_sparse_and_dense_gradients_by_their_joint_norm():
    table, vector = torch.nn.Parameter(torch.zeros(5, 2)), torch.nn.Parameter(torch.zeros(3))
    loss = (F.embedding(torch.tensor([0, 4, 0]), table, sparse=True)
            * torch.tensor([[3.0, 0.0], [0.0, 4.0], [3.0, 0.0]])).sum()
    (loss + (vector * torch.tensor([0.0, 12.0, 0.0])).sum()).backward()
    dense = [table.grad.to_dense(), vector.grad.clone()]  # norm sqrt(6² + 4² + 12²) = 14
    clip_gradients([table, vector], 7.0)
    assert table.grad.is_sparse
    torch.testing.assert_close(table.grad.to_dense(), dense[0] / 2, rtol=1e-5, atol=0)
    torch.testing.assert_close(vector.grad, dense[1] / 2, rtol=1e-5, atol=0)
    clip_gradients([table, vector], 100.0)  # within the bound now: unchanged
    torch.testing.assert_close(vector.grad, dense[1] / 2, rtol=1e-5, atol=0)


def test_mf_gives_sparse_item_gradients_when_the_optimiser_takes_them_and_learns():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    users = [list(rng.permutation(30)[:12]) * 2 for _ in range(20)]  # each user replays
    data = sequences(users, n_items=30, n_test=[4] * 20)
    model = presets.model("mf", 30, 20, factors=4)
    trainer = Trainer(make_evaluator([10]), train_settings(optimizer="lazy_adam", epochs=20,
                                                           batch_size=16), seed=0)
    assert isinstance(trainer.make_optimizer(model), LazyAdam)
    batch = next(model.training_batches(data, 16, np.random.default_rng(0)))
    model.training_loss(batch).backward()
    assert model.item_factors.grad.is_sparse and model.user_factors.grad.is_sparse
    assert model.item_bias.grad.is_sparse  # SparseGather
    model.zero_grad(set_to_none=True)
    untrained = make_evaluator([10]).evaluate(model, data, "test")["recall_at_10"]
    trainer.fit(model, data)
    assert make_evaluator([10]).evaluate(model, data, "test")["recall_at_10"] > untrained + 0.15
    Trainer(make_evaluator([10]), train_settings(optimizer="adam"), seed=0).make_optimizer(
        model)
    model.training_loss(batch).backward()
    assert not model.item_factors.grad.is_sparse  # dense again for Adam


def test_a_lazy_adam_run_stopped_mid_epoch_resumes_bit_identically(tmp_path,
                                                                    tmp_path_factory):
    for name in ("mf", "seqmf"):
        conformance.check_resume_mid_epoch(name, tmp_path_factory.getbasetemp() / "data",
                                           tmp_path / name, ("train.optimizer=lazy_adam",))
