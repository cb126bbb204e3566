"""Model equations, batching and the itemknn similarities on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import make_evaluator, recurrent, sequences, train_settings
from seqexp.data.batching import prediction_batches, window_batches
from seqexp.models.cells import GRUCell
from seqexp.models.knn import cosine_neighbours
from seqexp.models.recurrent import RecurrentRecommender
from seqexp.run import presets

# every test with the CPU kernels and with the shared (CUDA) code path on the CPU
pytestmark = pytest.mark.usefixtures("cpu_kernels_switch")


def _sigmoid(a):
    return 1.0 / (1.0 + math.exp(-a))


def test_gru_cell_matches_an_elementwise_transcription_of_the_spec():
    torch.manual_seed(0)
    n = 3
    cell = GRUCell(n).double()
    x = torch.randn(1, 2, n, dtype=torch.float64)
    h0 = torch.randn(1, n, dtype=torch.float64)
    out, h_last = cell(x, h0)
    W = cell.input_proj.weight.detach().numpy()  # rows: W_z, W_r, W
    b = cell.input_proj.bias.detach().numpy()
    U_zr = cell.hidden_gates.weight.detach().numpy()
    U = cell.hidden_candidate.weight.detach().numpy()
    h = h0[0].numpy().tolist()
    for t in range(2):
        xt = x[0, t].numpy()
        z = [_sigmoid(sum(W[i, j] * xt[j] for j in range(n)) + b[i]
                      + sum(U_zr[i, j] * h[j] for j in range(n))) for i in range(n)]
        r = [_sigmoid(sum(W[n + i, j] * xt[j] for j in range(n)) + b[n + i]
                      + sum(U_zr[n + i, j] * h[j] for j in range(n))) for i in range(n)]
        rh = [r[j] * h[j] for j in range(n)]
        k = [math.tanh(sum(W[2 * n + i, j] * xt[j] for j in range(n)) + b[2 * n + i]
                       + sum(U[i, j] * rh[j] for j in range(n))) for i in range(n)]
        h = [(1 - z[i]) * h[i] + z[i] * k[i] for i in range(n)]
        assert out[0, t].tolist() == pytest.approx(h, abs=1e-12)
    assert h_last[0].tolist() == pytest.approx(h, abs=1e-12)


def test_window_batches_cover_each_training_pair_once_and_reset_only_at_user_starts():
    data = sequences([list(range(10)), [3, 4, 5], [7, 8], [1]], n_items=10,
                     n_test=[2, 1, 1, 0])
    # training pairs: user0 positions 0..7 -> 7 pairs, user1 1 pair, user2 0, user3 0
    seen, resets = [], []
    for batch in window_batches(data, lanes=2, window=3, rng=np.random.default_rng(0)):
        assert batch.n_events == int(batch.mask.sum())
        for row in range(len(batch.lanes)):
            m = batch.mask[row]
            inputs, targets = batch.inputs[row][m].tolist(), batch.targets[row][m].tolist()
            pairs = list(zip(inputs, targets, strict=True))
            seen.extend((int(batch.users[row]), p) for p in pairs)
            resets.append((int(batch.users[row]), bool(batch.reset[row]), pairs[:1]))
    assert sorted(seen) == sorted([(0, (i, i + 1)) for i in range(7)] + [(1, (3, 4))])
    # a reset exactly where a user's first pair is
    assert {(u, p[0]) for u, flag, p in resets if flag} == {(0, (0, 1)), (1, (3, 4))}
    assert all(not flag for u, flag, p in resets if p and p[0] not in [(0, 1), (3, 4)])


def test_hidden_state_carries_across_windows_of_a_user_and_resets_between_users():
    torch.manual_seed(0)
    data = sequences([list(range(9)), [5, 6, 7, 8, 1]], n_items=10, n_test=[1, 1])
    model = recurrent(10, 2, hidden_size=4, window=3, dropout=0.0,
                                 dropout_is_keep_prob=False)
    model.eval()
    # Lanes of one: user 1 follows user 0 in the same lane. The carried state after each full
    # window equals replaying the user's events from a zero state, so it carries across the
    # user's windows and starts from zero for the next user.
    carried = []
    for batch in model.training_batches(data, 1, np.random.default_rng(0)):
        model.training_loss(batch)
        if bool(batch.mask.all()):
            carried.append((int(batch.users[0]), batch.inputs[0].tolist(),
                            batch.carry.states[0].clone()))
    starts = {0: 0, 1: 9}
    replayed = set()
    for user, inputs, state in carried:
        prefix_end = data.items.tolist().index(inputs[-1], starts[user]) + 1
        x = model.embedding(torch.from_numpy(
            data.items[starts[user]:prefix_end].astype(np.int64)))[None]
        _, h = model.cell(x, torch.zeros(1, 4))
        assert torch.allclose(state, h[0], atol=1e-6)
        replayed.add((user, prefix_end - starts[user]))
    assert replayed == {(0, 3), (0, 6), (1, 3)}  # a second window of user 0 was checked



def test_the_carried_state_travels_with_the_batches_of_its_epoch():
    """Two epochs' batch iterators taken in turns: each batch's loss is the one it has when
    its epoch runs alone, so no batch reads a state another iterator's batch left."""
    torch.manual_seed(0)
    data = sequences([list(range(9)), [5, 6, 7, 8, 1], [2, 3, 4, 5, 6, 7, 8]], n_items=10)
    model = recurrent(10, 3, hidden_size=4, window=2, dropout=0.0,
                                 dropout_is_keep_prob=False)
    model.eval()
    with torch.no_grad():
        alone = [[float(model.training_loss(batch)) for batch in
                  model.training_batches(data, 2, np.random.default_rng(seed))]
                 for seed in (0, 1)]
        first = model.training_batches(data, 2, np.random.default_rng(0))
        second = model.training_batches(data, 2, np.random.default_rng(1))
        turns: list[list[float]] = [[], []]
        for a, b in zip(first, second, strict=False):
            turns[0].append(float(model.training_loss(a)))
            turns[1].append(float(model.training_loss(b)))
        turns[0] += [float(model.training_loss(a)) for a in first]
        turns[1] += [float(model.training_loss(b)) for b in second]
    assert len(alone[0]) >= 4
    assert turns == alone

def test_prediction_states_do_not_depend_on_eval_chunking():
    torch.manual_seed(0)
    data = sequences([list(range(9)), [5, 6, 7, 8, 1], [2, 3]], n_items=10, n_test=[3, 2, 1])
    model = recurrent(10, 3, hidden_size=4, window=3, eval_chunk=100)
    model.eval()
    batch = next(prediction_batches(data, "test", batch_users=8))
    whole = model.prediction_states(batch)
    model.eval_chunk = 2
    chunked = model.prediction_states(batch)
    assert torch.allclose(whole, chunked, atol=1e-6)
    # the state of user 0's first test target equals a direct replay of its 6 training events
    x = model.embedding(torch.arange(6))[None]
    _, h = model.cell(x, torch.zeros(1, 4))
    row = int(np.flatnonzero(batch.users.numpy() == 0)[0])
    first = int(np.flatnonzero(batch.target_rows.numpy() == row)[0])
    assert torch.allclose(whole[first], h[0], atol=1e-6)


def test_itemknn_cosine_by_hand_with_self_excluded():
    # users' training items: u0 {0,1,2}, u1 {0,1}, u2 {2,3}; last event of each is test
    data = sequences([[0, 1, 2, 9], [0, 1, 9], [2, 3, 9]], n_items=10)
    ids, sims = cosine_neighbours(data, k=3, device=torch.device("cpu"))
    dense = np.zeros((10, 10))
    for i in range(10):
        for j, s in zip(ids[i].tolist(), sims[i].tolist(), strict=True):
            dense[i, j] += s
    assert dense[0, 1] == pytest.approx(1.0)  # {u0,u1} vs {u0,u1}
    assert dense[0, 2] == pytest.approx(0.5)  # 1 / sqrt(2*2)
    assert dense[2, 3] == pytest.approx(1 / math.sqrt(2))
    assert dense[0, 3] == 0.0 and np.all(np.diag(dense) == 0.0)
    model = presets.model("itemknn", 10, 3, neighbours=1, popularity_tiebreak=False)
    model.fit(data)
    # top-1 only: item 2's best neighbour is item 3 (0.707 > 0.5)
    scores = model.score_items(torch.tensor([2]), 0, 10)[0]
    assert scores.tolist() == pytest.approx([0, 0, 0, 1 / math.sqrt(2)] + [0] * 6)


def test_itemknn_ranks_by_hand_from_the_last_context_item_with_popularity_tiebreak():
    # training items: u0 {0,1,2}, u1 {0,1}, u2 {2,3}; counts 2, 2, 2, 1, 0, 0 for items 0..5
    # cosines: s(0,1) = 1, s(0,2) = s(1,2) = 0.5, s(2,3) = 1/sqrt(2), the rest 0
    data = sequences([[0, 1, 2, 3], [0, 1, 2], [2, 3, 0]], n_items=6)
    model = presets.model("itemknn", 6, 3)
    model.fit(data)
    counts = make_evaluator([1]).rank_counts(model, data, "test")
    # points in user order (all sequences have length 3 or 4; stable by length: u1, u2, u0)
    # u1, last item 1 -> target 2: s = 0.5 behind item 0 (s = 1): rank 2
    # u2, last item 3 -> target 0: item 2 (s = 0.71) above; items 0 and 1 both s = 0 with the
    #   same popularity 2, above item 3 (count 1) and items 4, 5 (count 0): rank 3, ties kept
    # u0, last item 2 -> target 3: s = 0.71, the best: rank 1 (from the first item 0: rank 4)
    assert counts.rank_pessimistic().tolist() == [2, 3, 1]
    assert counts.rank_optimistic().tolist() == [2, 2, 1]
    # without the tie-break the target 0 of u2 ties with every item of similarity 0
    model = presets.model("itemknn", 6, 3, popularity_tiebreak=False)
    model.fit(data)
    counts = make_evaluator([1]).rank_counts(model, data, "test")
    assert counts.rank_pessimistic().tolist() == [2, 6, 1]


def test_window_batch_pairs_index_the_masked_pairs_in_row_major_order():
    data = sequences([[1, 2, 3, 4, 5, 6, 7], [3, 4, 2], [5, 6, 7, 8]], n_items=9)
    for batch in window_batches(data, 2, 3, np.random.default_rng(1)):
        flat_targets = batch.targets.reshape(-1)[batch.pairs]
        assert torch.equal(flat_targets, batch.targets[batch.mask])
        assert len(batch.pairs) == batch.n_events


def test_a_non_finite_training_loss_stops_training_with_a_clear_error():
    from seqexp.core.errors import SeqexpError
    from seqexp.engine.trainer import Trainer

    data = sequences([[1, 2, 3, 4, 5], [2, 3, 4, 5, 6]], n_items=8)
    model = recurrent(8, 2, hidden_size=4, window=2)
    model.output.bias.data[3] = float("nan")  # every softmax over the catalogue turns NaN
    trainer = Trainer(make_evaluator([1]), train_settings(epochs=1, batch_size=2, progress=False),
                      seed=0)
    optimizer = trainer.make_optimizer(model)
    with pytest.raises(SeqexpError, match="training loss became nan in epoch 1; lower train.lr"):
        trainer.train_epoch(model, data, optimizer, np.random.default_rng(0), 1)


class AutocastSpy(RecurrentRecommender):
    """Records whether each training forward pass ran under CPU autocast."""

    def training_loss(self, batch):
        self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return super().training_loss(batch)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_amp_on_a_cpu_autocasts_only_where_it_has_native_bf16(monkeypatch, caplog,
                                                                native_bf16):
    import logging

    from seqexp.engine.trainer import Trainer, amp_unavailable

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native_bf16, raising=False)
    data = sequences([[1, 2, 3, 4, 5], [2, 3, 4, 5, 6]], n_items=8)
    model = AutocastSpy(8, 2, **(presets.options("gru") | {"hidden_size": 4, "window": 2}))
    model.autocast_seen = []
    trainer = Trainer(make_evaluator([1]),
                      train_settings(epochs=1, batch_size=2, progress=False, amp=True), seed=0)
    with caplog.at_level(logging.WARNING, logger="seqexp.engine.trainer"):
        stats = trainer.train_epoch(model, data, trainer.make_optimizer(model),
                                    np.random.default_rng(0), 1)
    assert math.isfinite(stats["train_loss"])
    assert model.autocast_seen and set(model.autocast_seen) == {native_bf16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float32 master weights
    warned = "train.amp: this CPU has no native bfloat16 products" in caplog.text
    assert warned is not native_bf16
    assert (amp_unavailable(torch.device("cpu")) is None) is native_bf16


def test_progress_bars_stay_off_when_stderr_is_not_a_terminal_and_each_epoch_logs_a_line(
        capfd, caplog):
    from seqexp.engine.trainer import Trainer

    data = sequences([[1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7]], n_items=8, n_val=[1, 1])
    model = recurrent(8, 2, hidden_size=4, window=2)
    trainer = Trainer(make_evaluator([1]), train_settings(epochs=2, batch_size=2, progress=True,
                                                    monitor="mrr_at_1"), seed=0)
    with caplog.at_level("INFO", logger="seqexp.engine.trainer"):
        trainer.fit(model, data)
    written = capfd.readouterr().err  # a pipe here, as in a redirected log
    assert "epoch 1/2" not in written and "ev/s" not in written and "\r" not in written
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1", "epoch 1", "epoch 2", "epoch 2"]
