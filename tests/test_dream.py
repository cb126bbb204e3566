"""DREAM: pooling, the sigmoid recurrence, BPR pairs and negatives, the state carried across a
user's training windows, prediction states, the L2 penalty, and a win over popularity."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from helpers import (
    compose_config,
    make_evaluator,
    preprocess,
    split_preset,
    timed_sequences,
    tiny_overrides,
    train_settings,
)
from seqexp.data.batching import prediction_batches
from seqexp.data.synthetic import generate_synthetic
from seqexp.engine.trainer import Trainer
from seqexp.models.dream import DREAM
from seqexp.models.popularity import Popularity
from seqexp.run import presets
from seqexp.run.experiment import run_experiment

GAP = 1800


def reference_states(model: DREAM, baskets: list[list[int]]) -> list[list[float]]:
    """h_1..h_K of one user by plain loops: max-pooling and h = σ(X b + R h + c)."""
    N = model.item_matrix.detach().double().numpy()
    X, R, c = (t.detach().double().numpy() for t in model.sigmoid_rnn_parameters())
    h = model.initial_state().detach().double().numpy()
    out = []
    for basket in baskets:
        b = [max(N[i, d] for i in basket) for d in range(N.shape[1])]
        h = [1 / (1 + math.exp(-(sum(X[r, j] * b[j] for j in range(len(b)))
                                 + sum(R[r, j] * h[j] for j in range(len(h))) + c[r])))
             for r in range(len(h))]
        out.append(h)
    return out


def tiny_model(n_items: int, n_users: int = 2, l2: float = 0.0, **kwargs) -> DREAM:
    """No L2 unless asked: most tests check the recurrence and the BPR term alone."""
    torch.manual_seed(0)
    model = presets.model("dream", n_items, n_users, hidden_size=3, init_std=0.5, l2=l2,
                          **kwargs).double()
    with torch.no_grad():
        model.initial.uniform_(-1, 1)  # a non-trivial h_0
    return model


@pytest.mark.parametrize("pooling", ["max", "mean"])


def test_basket_vectors_equal_a_loop_over_items(pooling):
    model = tiny_model(6, pooling=pooling)
    baskets = [[3], [0, 5, 5, 2], [1, 4]]
    items = torch.tensor([i for b in baskets for i in b])
    pooled = model.basket_vectors(items, torch.tensor([0, 1, 5])).detach()
    N = model.item_matrix.detach()
    for row, basket in zip(pooled, baskets, strict=True):
        for d in range(3):
            values = [float(N[i, d]) for i in basket]
            expected = max(values) if pooling == "max" else sum(values) / len(values)
            assert float(row[d]) == pytest.approx(expected, abs=1e-12)


def test_rnn_states_follow_the_sigmoid_recurrence_and_scores_use_the_input_matrix():
    model = tiny_model(6)
    data = timed_sequences([[3, 0, 5, 2, 1, 4, 0]], [[0, 5000, 5010, 5020, 9000, 9060, 20000]], 6,
                 n_test=[1])
    batch = next(model.training_batches(data, 8, np.random.default_rng(0)))
    states = model.basket_states(batch.sequences)[0].detach()
    expected = reference_states(model, [[3], [0, 5, 2], [1, 4]])
    np.testing.assert_allclose(states.numpy(), np.array(expected), rtol=0, atol=1e-12)
    assert torch.allclose(model.score_items(states, 1, 5), states @ model.item_matrix[1:5].T)


def test_training_pairs_and_bpr_loss_match_a_hand_reference():
    model = tiny_model(6)
    # user 0 baskets {3} {0,5,2} {1,4}; user 1 baskets {2,2} {5}; last events are test
    data = timed_sequences([[3, 0, 5, 2, 1, 4, 0], [2, 2, 5, 1]],
                 [[0, 5000, 5010, 5020, 9000, 9060, 20000], [0, 100, 4000, 9000]], 6,
                 n_test=[1, 1])
    batch = next(model.training_batches(data, 8, np.random.default_rng(0)))
    assert batch.n_events == 9 == len(batch.positives)
    per_row = torch.bincount(batch.sequences.basket_rows).tolist()
    row_of = {row: 0 if count == 3 else 1 for row, count in enumerate(per_row)}
    steps = batch.sequences.n_steps
    baskets = {0: [[3], [0, 5, 2], [1, 4]], 1: [[2, 2], [5]]}
    states = {u: reference_states(model, b) for u, b in baskets.items()}
    losses, pairs = [], []
    for s, pos, neg in zip(batch.pair_states.tolist(), batch.positives.tolist(),
                           batch.negatives.tolist(), strict=True):
        if s >= batch.sequences.n_rows * steps:  # the state a row enters with: h_0 here
            user = None
            h, basket = model.initial_state().detach().double().numpy(), None
        else:
            user, step = row_of[s // steps], s % steps
            h, basket = states[user][step], baskets[user][step + 1]
        pairs.append((user, None if basket is None else tuple(basket), pos))
        N = model.item_matrix.detach().double().numpy()
        diff = sum(h[d] * (N[pos, d] - N[neg, d]) for d in range(3))
        losses.append(-math.log(1 / (1 + math.exp(-diff))))
    # each event of a later basket is a positive scored with the previous basket's state; the
    # first baskets (items 3 and 2, 2) are scored with h_0
    assert sorted(pairs, key=str) == sorted(
        [(None, None, 3), (None, None, 2), (None, None, 2),
         (0, (0, 5, 2), 0), (0, (0, 5, 2), 5), (0, (0, 5, 2), 2), (0, (1, 4), 1),
         (0, (1, 4), 4), (1, (5,), 5)], key=str)
    assert model.training_loss(batch).item() == pytest.approx(sum(losses) / len(losses),
                                                              abs=1e-12)


def test_sampled_negatives_never_fall_in_the_positive_basket():
    raw = generate_synthetic(n_users=60, n_items=60, n_clusters=16, min_events=20,
                             max_events=60, p_successor=0.45, p_favourite=0.2, n_favourites=6,
                             generator_seed=7)
    data = preprocess(raw, split_preset())
    model = presets.model("dream", data.n_items, data.n_users, hidden_size=4, max_baskets=3)
    seq_items = []
    for batch in model.training_batches(data, 7, np.random.default_rng(1)):
        seq = batch.sequences
        bounds = seq.bag_offsets.tolist() + [len(seq.items)]
        # the predicted basket of a pair: the one after its state's step (or the row's first)
        basket_at = {(int(r), int(s)): set(seq.items[a:b].tolist()) for r, s, a, b in zip(
            seq.basket_rows, seq.basket_steps, bounds[:-1], bounds[1:], strict=True)}
        inner = seq.n_rows * seq.n_steps
        for state, pos, neg in zip(batch.pair_states.tolist(), batch.positives.tolist(),
                                   batch.negatives.tolist(), strict=True):
            row, step = (state // seq.n_steps, state % seq.n_steps + 1) if state < inner else (
                state - inner, 0)
            basket = basket_at[(row, step)]
            assert pos in basket and neg not in basket
            assert 0 <= neg < data.n_items
        seq_items.append(batch.n_events)
        model.training_loss(batch)  # carries the states on, as the trainer's step does
    # windows of 3 baskets that do not overlap: every training event is a positive once
    assert sum(seq_items) == data.stats["train_events"]


def test_prediction_states_use_the_last_basket_before_the_targets_basket():
    model = tiny_model(8)
    data = timed_sequences([[3, 0, 5, 2, 1, 4, 7]], [[0, 5000, 5010, 5020, 9000, 9060, 9070]], 8,
                 n_test=[6])  # targets: every event after the first
    batch = next(prediction_batches(data, "test", 8))
    states = model.prediction_states(batch).detach()
    h = reference_states(model, [[3], [0, 5, 2], [1, 4, 7]])
    expected = [h[0], h[0], h[0], h[1], h[1], h[1]]  # targets at columns 1..6
    np.testing.assert_allclose(states.numpy(), np.array(expected), rtol=0, atol=1e-12)
    # a target inside the first basket gets h_0
    first = timed_sequences([[3, 0, 5]], [[0, 10, 20]], 8, n_test=[2])
    states = model.prediction_states(next(prediction_batches(first, "test", 8))).detach()
    assert torch.allclose(states, model.initial_state().detach().expand(2, -1))


def test_a_later_training_window_starts_where_the_users_previous_window_ended():
    """Users with 7, 4 and 2 training baskets in windows of 2, run on 2 lanes: every state the
    training recurrence reaches equals the whole-history replay from h_0 (the evaluation's),
    each later window enters with the detached state at the end of the previous one, and the
    test prediction state after the whole history is the state training ended the user at."""
    gaps = {7: [0, 5000, 9000, 13000, 17000, 21000, 25000, 29000],
            4: [0, 4000, 8000, 12000, 16000], 2: [0, 4000, 4010, 8000]}
    histories = [[3, 0, 5, 2, 1, 4, 6, 7], [2, 5, 1, 0, 3], [4, 4, 6, 1]]
    times = [gaps[7], gaps[4], gaps[2]]
    data = timed_sequences(histories, times, 8, n_test=[1, 1, 1])
    training_baskets = {0: [[3], [0], [5], [2], [1], [4], [6]], 1: [[2], [5], [1], [0]],
                        2: [[4], [4, 6]]}
    model = tiny_model(8, n_users=3, max_baskets=2)
    replay = {u: reference_states(model, b) for u, b in training_baskets.items()}
    h0 = model.initial_state().detach().numpy()
    reached: dict[int, list] = {u: [] for u in training_baskets}  # states training produced
    later_windows = 0
    for batch in model.training_batches(data, 2, np.random.default_rng(0)):
        entering, states = (t.detach().numpy() for t in model.window_states(batch))
        for row, user in enumerate(batch.users.tolist()):
            expected = h0 if bool(batch.fresh[row]) else reached[user][-1]
            later_windows += not bool(batch.fresh[row])
            np.testing.assert_allclose(entering[row], expected, rtol=0, atol=1e-12)
            reached[user].extend(states[row, :int(batch.last_steps[row]) + 1])
        model.training_loss(batch)  # moves the carried states on, as the trainer's step does
        assert not batch.carry.states.requires_grad  # detached at the border
    assert later_windows == 3 + 1  # users 0 and 1 have 4 and 2 windows
    for user, states in reached.items():
        np.testing.assert_allclose(np.array(states), np.array(replay[user]), rtol=0, atol=1e-12)
    test_batch = next(prediction_batches(data, "test", 8))
    test_states = model.prediction_states(test_batch).detach().numpy()
    target_users = test_batch.users[test_batch.target_rows].tolist()
    assert sorted(target_users) == [0, 1, 2]
    np.testing.assert_allclose(test_states, np.array([reached[u][-1] for u in target_users]),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_l2_penalty_is_on_x_r_and_n_not_on_the_fused_kernels_weights(cell):
    cfg = compose_config(["model=dream"])
    assert cfg.train.weight_decay == 0 and cfg.model.l2 > 0  # one L2, the model's
    lam = 0.3
    model = tiny_model(5, cell=cell, l2=lam)
    plain = copy.deepcopy(model)
    plain.l2 = 0.0
    rnn = model.recurrent
    w_ih, w_hh = (w.detach().double().numpy() for w in (rnn.weight_ih_l0, rnn.weight_hh_l0))
    # cell=rnn: X = 2 W_ih and R = 4 W_hh (the sigmoid recurrence's matrices)
    x_scale, r_scale = (2.0, 4.0) if cell == "rnn" else (1.0, 1.0)
    squares = (sum((x_scale * v) ** 2 for v in w_ih.ravel())
               + sum((r_scale * v) ** 2 for v in w_hh.ravel())
               + sum(v ** 2 for v in model.item_matrix.detach().numpy().ravel()))
    assert model.l2_penalty().item() == pytest.approx(lam / 2 * squares, rel=1e-12)
    data = timed_sequences([[3, 0, 4, 2, 1]], [[0, 5000, 9000, 9010, 20000]], 5, n_test=[1])
    batch = next(model.training_batches(data, 4, np.random.default_rng(0)))
    next(plain.training_batches(data, 4, np.random.default_rng(0)))  # its carry, as the model's
    assert (model.training_loss(batch) - plain.training_loss(batch)).item() == pytest.approx(
        lam / 2 * squares, rel=1e-10)
    # the biases and h_0 are not the paper's and are not pulled anywhere
    model.l2_penalty().backward()
    for name in ("bias_ih_l0", "bias_hh_l0"):
        grad = getattr(rnn, name).grad
        assert grad is None or not grad.any(), name
    assert model.initial.grad is None or not model.initial.grad.any()


@pytest.mark.slow  # tests/test_learning.py checks dream > 1.4x pop on its own data in ~1 s
def test_dream_beats_popularity_on_synthetic_data():
    torch.manual_seed(0)
    data = preprocess(generate_synthetic(n_users=200, n_items=300, n_clusters=16,
                                              min_events=30, max_events=120, p_successor=0.45,
                                              p_favourite=0.2, n_favourites=6,
                                              generator_seed=7),
                           split_preset())
    evaluator = make_evaluator([20])
    pop = Popularity(data.n_items, data.n_users)
    pop.fit(data)
    dream = presets.model("dream", data.n_items, data.n_users, hidden_size=32)
    Trainer(evaluator, train_settings(epochs=8, batch_size=16, lr=0.01, patience=8,
                                     progress=False), seed=0).fit(dream, data)
    got, floor = (evaluator.evaluate(m, data, "test")["mrr_at_20"] for m in (dream, pop))
    assert got > 1.5 * floor
    got_f1, floor_f1 = (evaluator.next_basket_metrics(m, data, "test", GAP, 5)["basket_f1_at_5"]
                        for m in (dream, pop))
    assert got_f1 > floor_f1


def test_dream_run_logs_next_basket_metrics(tmp_path, store_uri):
    cfg = compose_config(["model=dream", "model.hidden_size=8",
                          *tiny_overrides(tmp_path / "data", tmp_path / "mlflow.db")])
    assert cfg.eval.basket_gap_s == cfg.model.basket_gap_s == GAP
    metrics = run_experiment(cfg, launch_dir=tmp_path, output_dir=tmp_path / "run").metrics
    for key in ("test_mrr_at_20", "test_recall_at_20", "test_basket_f1_at_5",
                "test_basket_ndcg_at_5"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["test_basket_count"] > 0
