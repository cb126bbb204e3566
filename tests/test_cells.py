"""The user-based GRU cells against direct element-wise transcriptions of their equations
(docs/models.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import recurrent, sequences, switch_cpu_kernel
from seqexp.core.errors import SeqexpError
from seqexp.models.cells import (
    CELLS,
    AttentionalUserGRUCell,
    CudnnGRU,
    GRUCell,
    LinearUserGRUCell,
    RectifiedUserGRUCell,
    rectify,
)
from seqexp.models.cpu_kernels import Dropout
from seqexp.models.recurrent import SampledSoftmaxCE

# every test with the CPU kernels and with the shared (CUDA) code path on the CPU
pytestmark = pytest.mark.usefixtures("cpu_kernels_switch")

N = 3


def sig(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a))


def matvec(w: np.ndarray, v: list[float], rows: range) -> list[float]:
    return [sum(w[i, j] * v[j] for j in range(len(v))) for i in rows]


def w(layer: torch.nn.Linear) -> np.ndarray:
    return layer.weight.detach().numpy()


def b(layer: torch.nn.Linear) -> np.ndarray:
    return layer.bias.detach().numpy()


def gru_step_reference(h, gate_in, cand_in, U_zr, U):
    """Given the non-recurrent parts of [z; r] (2n) and of k (n): the shared GRU update."""
    n = len(h)
    gates = [gate_in[i] + sum(U_zr[i, j] * h[j] for j in range(n)) for i in range(2 * n)]
    z, r = [sig(g) for g in gates[:n]], [sig(g) for g in gates[n:]]
    rh = [r[j] * h[j] for j in range(n)]
    k = [math.tanh(cand_in[i] + sum(U[i, j] * rh[j] for j in range(n))) for i in range(n)]
    return [(1 - z[i]) * h[i] + z[i] * k[i] for i in range(n)]


def inputs(seed: int = 0, steps: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, steps, N, generator=g, dtype=torch.float64)
    h0 = torch.randn(1, N, generator=g, dtype=torch.float64)
    v = torch.randn(1, N, generator=g, dtype=torch.float64)
    return x, h0, v


def check(out, h_last, expected):
    for t, h in enumerate(expected):
        assert out[0, t].tolist() == pytest.approx(h, abs=1e-12)
    assert h_last[0].tolist() == pytest.approx(expected[-1], abs=1e-12)


def test_linear_ugru_gates_see_h_x_and_v_as_written():
    torch.manual_seed(1)
    cell = LinearUserGRUCell(N).double()
    x, h0, v = inputs()
    out, h_last = cell(x, h0, v)
    W, bias, Wv = w(cell.input_proj), b(cell.input_proj), w(cell.user_proj)
    vv = v[0].tolist()
    h, expected = h0[0].tolist(), []
    for t in range(x.shape[1]):
        xt = x[0, t].tolist()
        # [z; r] = σ(T_{3n,2n} [h; x; v]) and k = tanh(T(r ⊙ h) + T x + T v)
        pre = [a + c + d for a, c, d in zip(matvec(W, xt, range(3 * N)), matvec(Wv, vv,
                                            range(3 * N)), bias, strict=True)]
        h = gru_step_reference(h, pre[: 2 * N], pre[2 * N:], w(cell.hidden_gates),
                               w(cell.hidden_candidate))
        expected.append(h)
    check(out, h_last, expected)


def test_linear_ugru_user_changes_the_output_and_gru_ignores_it():
    x, h0, v = inputs()
    lin = LinearUserGRUCell(N).double()
    assert not torch.allclose(lin(x, h0, v)[0], lin(x, h0, -v)[0])
    gru = GRUCell(N).double()
    assert torch.equal(gru(x, h0, v)[0], gru(x, h0, -v)[0])


@pytest.mark.parametrize("omega", [0.3, 0.8])
def test_rectify_hard_rule_by_components(omega):
    v = torch.tensor([[-1.0, 0.5, 2.0, 1.0, 0.0]])
    kappa1 = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.5]])
    kappa2 = torch.tensor([[1.0, 1.0, 1.0, 2.0, 1.0]])
    # below κ1 -> 0; between κ1 and κ2 -> ω v (κ1 itself included); above κ2 -> v
    expected = [0.0, omega * 0.5, 2.0, omega * 1.0, 0.0]
    got = rectify(v, kappa1, kappa2, torch.tensor(omega))
    assert got[0].tolist() == pytest.approx(expected)
    # the soft relaxation tends to the hard rule away from the thresholds
    soft = rectify(v, kappa1, kappa2, torch.tensor(omega), temperature=1e-3)
    assert soft[0, [0, 1, 2]].tolist() == pytest.approx([expected[i] for i in (0, 1, 2)],
                                                        abs=1e-6)


@pytest.mark.parametrize("threshold", ["hard", "soft"])
def test_rectified_ugru_matches_transcription(threshold):
    torch.manual_seed(2)
    cell = RectifiedUserGRUCell(N, threshold=threshold, temperature=0.5, omega=None).double()
    x, h0, v = inputs(3)
    out, h_last = cell(x, h0, v)
    W, bias, Wv = w(cell.input_proj), b(cell.input_proj), w(cell.user_proj)
    Wk, bk, Wkv = w(cell.kappa_input), b(cell.kappa_input), w(cell.kappa_user)
    Wh = w(cell.hidden_gates)  # rows 0..2n-1: gates, 2n..4n-1: κ
    omega = float(cell.omega.detach())
    vv = v[0].tolist()
    h, expected = h0[0].tolist(), []
    for t in range(x.shape[1]):
        xt = x[0, t].tolist()
        kappa = [sum(Wh[2 * N + i, j] * h[j] for j in range(N))
                 + sum(Wk[i, j] * xt[j] for j in range(N)) + bk[i]
                 + sum(Wkv[i, j] * vv[j] for j in range(N)) for i in range(2 * N)]
        k1, k2 = kappa[:N], kappa[N:]
        if threshold == "hard":
            vr = [0.0 if vv[i] < k1[i] else omega * vv[i] if vv[i] < k2[i] else vv[i]
                  for i in range(N)]
        else:
            vr = [vv[i] * sig((vv[i] - k1[i]) / 0.5)
                  * (omega + (1 - omega) * sig((vv[i] - k2[i]) / 0.5)) for i in range(N)]
        pre = [a + c + d for a, c, d in zip(matvec(W, xt, range(3 * N)),
                                            matvec(Wv, vr, range(3 * N)), bias, strict=True)]
        h = gru_step_reference(h, pre[: 2 * N], pre[2 * N:], Wh[: 2 * N],
                               w(cell.hidden_candidate))
        expected.append(h)
    check(out, h_last, expected)


def test_rectified_fixed_omega_is_used():
    cell = RectifiedUserGRUCell(N, threshold="soft", temperature=0.1, omega=0.25)
    assert float(cell.omega) == 0.25
    assert "omega_logit" not in dict(cell.named_parameters())


def test_attentional_ugru_matches_transcription():
    torch.manual_seed(4)
    cell = AttentionalUserGRUCell(N).double()
    x, h0, v = inputs(5)
    out, h_last = cell(x, h0, v)
    W, bias = w(cell.input_proj), b(cell.input_proj)  # columns: [x̃ (n); ṽ (n)]
    Wxi, bxi, Wxv, Wh = w(cell.xi_input), b(cell.xi_input), w(cell.xi_user), w(cell.hidden_gates)
    vv = v[0].tolist()
    h, expected = h0[0].tolist(), []
    for t in range(x.shape[1]):
        xt = x[0, t].tolist()
        xi = [sig(sum(Wh[2 * N + i, j] * h[j] for j in range(N))
                  + sum(Wxi[i, j] * xt[j] for j in range(N)) + bxi[i]
                  + sum(Wxv[i, j] * vv[j] for j in range(N))) for i in range(N)]
        x_t = [(1 - xi[i]) * xt[i] for i in range(N)]
        v_t = [xi[i] * vv[i] for i in range(N)]
        pre = [a + c for a, c in zip(matvec(W, x_t + v_t, range(3 * N)), bias, strict=True)]
        h = gru_step_reference(h, pre[: 2 * N], pre[2 * N:], Wh[: 2 * N],
                               w(cell.hidden_candidate))
        expected.append(h)
    check(out, h_last, expected)


def _saturate_xi(cell: AttentionalUserGRUCell, value: float) -> None:
    with torch.no_grad():
        cell.xi_input.weight.zero_()
        cell.xi_user.weight.zero_()
        cell.hidden_gates.weight[2 * N:].zero_()
        cell.xi_input.bias.fill_(value)  # σ(±1e4) is exactly 1 or 0 in float64


def test_attentional_xi_to_zero_is_an_item_only_gru():
    torch.manual_seed(6)
    cell = AttentionalUserGRUCell(N).double()
    _saturate_xi(cell, -1e4)
    gru = GRUCell(N).double()
    with torch.no_grad():
        gru.input_proj.weight.copy_(cell.input_proj.weight[:, :N])
        gru.input_proj.bias.copy_(cell.input_proj.bias)
        gru.hidden_gates.weight.copy_(cell.hidden_gates.weight[: 2 * N])
        gru.hidden_candidate.weight.copy_(cell.hidden_candidate.weight)
    x, h0, v = inputs(7)
    assert torch.allclose(cell(x, h0, v)[0], gru(x, h0)[0], atol=1e-12)
    assert torch.allclose(cell(x, h0, v)[0], cell(x, h0, 5 * v)[0], atol=1e-12)


def test_attentional_xi_to_one_drops_the_item_input():
    torch.manual_seed(8)
    cell = AttentionalUserGRUCell(N).double()
    _saturate_xi(cell, 1e4)
    x, h0, v = inputs(9)
    other_items = torch.randn_like(x)
    assert torch.allclose(cell(x, h0, v)[0], cell(other_items, h0, v)[0], atol=1e-12)
    assert not torch.allclose(cell(x, h0, v)[0], cell(x, h0, -v)[0])


@pytest.mark.parametrize("cell", ["gru", "linear_ugru", "rectified_ugru", "attentional_ugru"])
def test_gradients_reach_every_parameter(cell):
    torch.manual_seed(0)
    data = sequences([list(range(8)), [3, 4, 5, 6, 2]], n_items=9)
    model = recurrent(9, 2, cell=cell, hidden_size=4, window=3, dropout=0.0,
                                 dropout_is_keep_prob=False, user_dropout=0.0)
    model.fit(data)
    batch = next(model.training_batches(data, 2, np.random.default_rng(0)))
    model.training_loss(batch).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_hard_threshold_leaves_kappa_without_gradient():
    torch.manual_seed(0)
    data = sequences([list(range(8)), [3, 4, 5, 6, 2]], n_items=9)
    model = recurrent(9, 2, cell="rectified_ugru", hidden_size=4, window=3,
                                 threshold="hard")
    batch = next(model.training_batches(data, 2, np.random.default_rng(0)))
    model.training_loss(batch).backward()
    grad = model.cell.kappa_input.weight.grad
    assert grad is None or not grad.any()


def test_user_vector_is_constant_along_a_sequence_and_dropout_applies_to_it():
    torch.manual_seed(0)
    model = recurrent(9, 3, cell="linear_ugru", hidden_size=64, user_dropout=0.5)
    users = torch.tensor([0, 1, 2])
    model.train()
    dropped = model._user_vectors(users)
    assert 0.3 < (dropped == 0).float().mean() < 0.7  # about half the components
    model.eval()
    assert torch.equal(model._user_vectors(users), model.user_embedding(users))


def test_sampled_softmax_is_cross_entropy_against_shared_negatives_with_logq(monkeypatch):
    torch.manual_seed(0)
    data = sequences([[0, 1, 1, 2, 3], [1, 1, 4, 0]], n_items=5)
    model = recurrent(5, 2, hidden_size=3, loss="sampled_softmax", n_negatives=3)
    model.fit(data)
    counts = np.bincount([0, 1, 1, 2, 1, 1], minlength=5).clip(min=1)  # training events
    q = counts / counts.sum()
    assert model.negative_log_q.tolist() == pytest.approx(np.log(3 * q).tolist(), rel=1e-5)
    negatives = torch.tensor([4, 1, 2])
    monkeypatch.setattr(torch, "multinomial", lambda *args, **kwargs: negatives)
    hidden = torch.randn(2, 3)
    targets = torch.tensor([1, 3])  # target 1 is also negative #2: an accidental hit
    loss = model.sampled_softmax_loss(hidden, targets)
    W, bias = model.output.weight.detach(), model.output.bias.detach()
    logq = model.negative_log_q
    expected = 0.0
    for row, target in enumerate(targets.tolist()):
        items = [target] + [n for n in negatives.tolist() if n != target]
        logits = [float(hidden[row] @ W[i] + bias[i] - logq[i]) for i in items]
        expected += -logits[0] + math.log(sum(math.exp(v) for v in logits))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)


@pytest.mark.parametrize("merge_repeats", [True, False])
def test_repeated_negatives_count_once_per_draw_merged_or_not(monkeypatch, merge_repeats):
    switch_cpu_kernel(monkeypatch, "sparse_negatives", merge_repeats)
    torch.manual_seed(0)
    model = recurrent(6, 2, hidden_size=3, loss="sampled_softmax", n_negatives=7)
    model.negative_log_q.copy_(torch.randn(6))
    draws = torch.tensor([4, 1, 4, 2, 1, 4, 5])  # 4 three times, 1 twice
    monkeypatch.setattr(torch, "multinomial", lambda *args, **kwargs: draws)
    hidden = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 3, 4])  # 1 and 4 are also drawn: accidental hits
    model.double()
    loss = model.sampled_softmax_loss(hidden, targets)
    grads = torch.autograd.grad(loss, (hidden, model.output.weight, model.output.bias))
    W, bias, logq = model.output.weight, model.output.bias, model.negative_log_q
    expected = 0.0
    for row, target in enumerate(targets.tolist()):
        items = [target] + [n for n in draws.tolist() if n != target]  # every draw counts
        logits = torch.stack([hidden[row] @ W[i] + bias[i] - logq[i] for i in items])
        expected = expected + torch.logsumexp(logits, 0) - logits[0]
    expected = expected / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # float32 inside
    want = torch.autograd.grad(expected, (hidden, model.output.weight, model.output.bias))
    for got, wanted in zip(grads, want, strict=True):
        assert torch.allclose(got, wanted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparse_hits", [True, False])
def test_blocked_sampled_softmax_gradients_equal_autograd_of_the_plain_formula(
        monkeypatch, sparse_hits):
    switch_cpu_kernel(monkeypatch, "sparse_negatives", sparse_hits)
    torch.manual_seed(1)
    n_rows, n, n_neg = 7, 4, 5
    hidden = torch.randn(n_rows, n, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(n_neg, n, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n_neg, dtype=torch.float64, requires_grad=True)
    positive = torch.randn(n_rows, dtype=torch.float64, requires_grad=True)
    negatives = torch.tensor([3, 0, 6, 3, 2])
    targets = torch.tensor([3, 1, 2, 0, 5, 6, 3])  # rows 0, 2, 3, 5, 6 have accidental hits
    # 2 rows per block: four blocks, the last one short
    monkeypatch.setattr(SampledSoftmaxCE, "BLOCK_ELEMENTS", 2 * n_neg)
    blocked = SampledSoftmaxCE.apply(hidden, weight, bias, positive, targets, negatives)
    blocked_grads = torch.autograd.grad(3.0 * blocked, (hidden, weight, bias, positive))
    logits = hidden @ weight.T + bias
    logits = logits.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    plain = torch.nn.functional.cross_entropy(
        torch.cat([positive[:, None], logits], dim=1), torch.zeros(n_rows, dtype=torch.long))
    plain_grads = torch.autograd.grad(3.0 * plain, (hidden, weight, bias, positive))
    assert blocked.item() == pytest.approx(plain.item(), rel=1e-12)
    for got, want in zip(blocked_grads, plain_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_accidental_hits_are_the_pairs_of_the_dense_comparison_block_by_block():
    from seqexp.models.recurrent import accidental_hits

    generator = torch.Generator().manual_seed(3)
    negatives = torch.randint(0, 6, (9,), generator=generator)  # repeats: several hits a row
    targets = torch.randint(0, 8, (11,), generator=generator)  # 6, 7: never a negative
    for rows_per_block in (1, 3, 4, 11, 20):
        blocks = accidental_hits(targets, negatives, rows_per_block)
        assert len(blocks) == math.ceil(11 / rows_per_block)
        for index, (rows, slots) in enumerate(blocks):
            lo = index * rows_per_block
            dense = negatives[None, :] == targets[lo:lo + rows_per_block, None]
            sparse = torch.zeros_like(dense)
            sparse[rows, slots] = True
            assert torch.equal(sparse, dense)
            assert len(rows) == int(dense.sum())  # each pair once


def test_bf16_products_in_the_sampled_softmax_stay_close_to_float64():
    from seqexp.models.recurrent import SampledSoftmaxCE

    torch.manual_seed(2)
    n_rows, n, n_neg = 300, 16, 700
    inputs = [torch.randn(n_rows, n), torch.randn(n_neg, n) / 4, torch.randn(n_neg),
              torch.randn(n_rows)]
    negatives = torch.randint(0, 50, (n_neg,))
    targets = torch.randint(0, 60, (n_rows,))

    def loss_and_grads(dtype, matmul_dtype):
        leaves = [x.to(dtype).requires_grad_() for x in inputs]
        loss = SampledSoftmaxCE.apply(*leaves, targets, negatives, matmul_dtype)
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    exact = loss_and_grads(torch.float64, None)
    bf16 = loss_and_grads(torch.float32, torch.bfloat16)
    assert all(got.dtype == torch.float32 for got in bf16)  # gradients for float32 leaves
    errors = [float((got.double() - want).abs().max() / want.abs().max())
              for got, want in zip(bf16, exact, strict=True)]
    assert max(errors) < 2e-2  # loss, hidden, weight, bias and positive gradients
    assert max(errors[1:3]) > 1e-3  # the products did run in bf16 (float32 errs by ~3e-7)


def test_under_autocast_only_the_sampled_softmax_products_change_dtype(monkeypatch):
    from seqexp.models import recurrent as recurrent_module

    seen = {}

    def spy(*args):
        seen["dtypes"] = [a.dtype for a in args[:4]]
        seen["matmul_dtype"] = args[-1]
        return args[0].sum() * 0

    monkeypatch.setattr(recurrent_module.SampledSoftmaxCE, "apply", spy)
    model = recurrent(20, 2, hidden_size=4, loss="sampled_softmax", n_negatives=5)
    hidden, targets = torch.randn(3, 4), torch.tensor([1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.sampled_softmax_loss(hidden, targets)
    assert seen == {"dtypes": [torch.float32] * 4, "matmul_dtype": torch.bfloat16}
    model.sampled_softmax_loss(hidden, targets)
    assert seen["matmul_dtype"] is None


def test_dropout_drops_a_share_p_and_scales_the_rest_by_one_over_keep():
    torch.manual_seed(0)
    dropout = Dropout(0.2)
    x = torch.full((400, 500), 3.0, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert abs(1.0 - kept.float().mean().item() - 0.2) < 0.005  # 200,000 draws: sd 0.0009
    assert torch.equal(y[kept], torch.full((int(kept.sum()),), 3.0 / 0.8))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.8)  # the gradient goes through the same mask
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)  # drawn from torch's seeded generator
    dropout.eval()
    assert dropout(x) is x




@pytest.mark.parametrize("cell", ["gru", "linear_ugru", "rectified_ugru", "attentional_ugru"])
def test_a_zero_in_carry_mask_ends_the_state_and_the_next_step_starts_from_h0(cell):
    torch.manual_seed(0)
    options = {"threshold": "soft", "temperature": 0.1, "omega": None}
    model = CELLS[cell](N, **(options if cell == "rectified_ugru" else {})).double()
    x, h0, v = inputs(seed=3, steps=5)
    x, h0, v = x.repeat(2, 1, 1), h0.repeat(2, 1), v.repeat(2, 1)
    mask = torch.ones(2, 5, dtype=torch.float64)
    mask[0, 2] = 0.0  # row 0: a session ends after step 2; row 1 runs through
    out, h_last = model(x, h0, v, carry_mask=mask)
    plain, plain_last = model(x, h0, v)
    assert torch.equal(out[1], plain[1]) and torch.equal(h_last[1], plain_last[1])
    assert torch.equal(out[0, :2], plain[0, :2])
    assert not out[0, 2].any()
    fresh, fresh_last = model(x[:1, 3:], torch.zeros(1, N, dtype=torch.float64), v[:1])
    assert torch.allclose(out[0, 3:], fresh[0], atol=1e-12)
    assert torch.allclose(h_last[0], fresh_last[0], atol=1e-12)
    assert not torch.allclose(out[0, 3:], plain[0, 3:])


def test_without_carry_mask_the_outputs_are_those_of_an_all_ones_mask():
    torch.manual_seed(0)
    model = GRUCell(N).double()
    x, h0, _ = inputs(seed=4, steps=4)
    out, _ = model(x, h0)
    assert torch.equal(model(x, h0, carry_mask=torch.ones(1, 4, dtype=torch.float64))[0], out)


def test_cudnn_gru_refuses_a_carry_mask_in_one_line():
    model = CudnnGRU(N)
    x, h0 = torch.randn(1, 2, N), torch.zeros(1, N)
    with pytest.raises(SeqexpError, match="cudnn_gru cannot reset") as error:
        model(x, h0, carry_mask=torch.ones(1, 2))
    assert "\n" not in str(error.value)
