"""The classical baselines: expdecay_knn, mf and seqmf, on tiny inputs and small synthetic data."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from helpers import (
    SHAPE_ATOL,
    SHAPE_RTOL,
    assert_no_near_ties,
    make_evaluator,
    preprocess,
    sequences,
    split_preset,
    train_settings,
)
from seqexp.data.batching import prediction_batches
from seqexp.data.synthetic import generate_synthetic
from seqexp.engine.trainer import Trainer
from seqexp.models.popularity import Popularity
from seqexp.run import presets
from seqexp.run.experiment import seed_everything

# users' training items: u0 {0,1,2}, u1 {0,1}, u2 {2,3}; the last event of each is a test event
HAND_USERS = [[0, 1, 2, 4], [0, 1, 4], [2, 3, 4]]
# cosine similarities of items 0..3 by hand (items 4, 5 have no training event)
HAND_SIM = np.zeros((6, 6))
HAND_SIM[0, 1] = HAND_SIM[1, 0] = 1.0  # {u0,u1} vs {u0,u1}
HAND_SIM[0, 2] = HAND_SIM[2, 0] = HAND_SIM[1, 2] = HAND_SIM[2, 1] = 0.5  # 1 / sqrt(2 * 2)
HAND_SIM[2, 3] = HAND_SIM[3, 2] = 1 / math.sqrt(2)  # {u0,u2} vs {u2}


def _user0_test_scores(model, data) -> list[float]:
    """Scores of all items for user 0's test event (context: items 0, 1, 2)."""
    batch = next(prediction_batches(data, "test", batch_users=8))
    row = int(np.flatnonzero(batch.users.numpy() == 0)[0])
    point = int(np.flatnonzero(batch.target_rows.numpy() == row)[0])
    state = model.prediction_states(batch)
    state = tuple(s[point:point + 1] for s in state) if isinstance(state, tuple) else state[
        point:point + 1]
    return model.score_items(state, 0, data.n_items)[0].tolist()


def _hand_expdecay(weights: list[float]) -> list[float]:
    """sum_k weight_k * sim(history_k, i) for user 0's history (0, 1, 2)."""
    return (np.array(weights) @ HAND_SIM[[0, 1, 2]]).tolist()


def test_expdecay_position_scores_by_hand():
    data = sequences(HAND_USERS, n_items=6)
    model = presets.model("expdecay_knn", 6, 3, popularity_tiebreak=False)
    model.fit(data)
    # history 0, 1, 2: the last item weighs 1, the one before exp(-1), the first exp(-2)
    expected = _hand_expdecay([math.exp(-2), math.exp(-1), 1.0])
    assert expected[3] == pytest.approx(1 / math.sqrt(2))
    assert expected[1] == pytest.approx(0.5 + math.exp(-2))
    assert _user0_test_scores(model, data) == pytest.approx(expected, abs=1e-6)
    # decay 2 squares the weights
    model.decay = 2.0
    expected = _hand_expdecay([math.exp(-4), math.exp(-2), 1.0])
    assert _user0_test_scores(model, data) == pytest.approx(expected, abs=1e-6)
    # a window of 2 drops item 0 from the sum
    model.decay, model.window = 1.0, 2
    expected = _hand_expdecay([0.0, math.exp(-1), 1.0])
    assert _user0_test_scores(model, data) == pytest.approx(expected, abs=1e-6)


def test_expdecay_time_scores_by_hand_in_hours():
    data = sequences(HAND_USERS, n_items=6)
    # user 0's history at 0 s, 9000 s (2.5 h) and 10800 s (3 h): 3 h and 0.5 h before the last
    data.timestamps[:4] = [0, 9000, 10800, 20000]
    model = presets.model("expdecay_knn", 6, 3, decay_unit="time", time_unit_s=3600.0,
                          popularity_tiebreak=False)
    model.fit(data)
    expected = _hand_expdecay([math.exp(-3.0), math.exp(-0.5), 1.0])
    assert _user0_test_scores(model, data) == pytest.approx(expected, abs=1e-6)
    # equal timestamps weigh the same: items 1 and 2 at the same second
    data.timestamps[:4] = [0, 10800, 10800, 20000]
    expected = _hand_expdecay([math.exp(-3.0), 1.0, 1.0])
    assert _user0_test_scores(model, data) == pytest.approx(expected, abs=1e-6)
    # minutes instead of hours
    model.time_unit_s = 60.0
    expected = _hand_expdecay([math.exp(-180.0), 1.0, 1.0])
    assert _user0_test_scores(model, data) == pytest.approx(expected, abs=1e-6)


def _synthetic(n_users: int = 120, n_items: int = 60, seed: int = 3):
    raw = generate_synthetic(n_users=n_users, n_items=n_items, n_clusters=4, min_events=15,
                             max_events=40, p_successor=0.45, p_favourite=0.2, n_favourites=6,
                             generator_seed=seed)
    return preprocess(raw, split_preset())


def test_expdecay_with_a_very_large_decay_ranks_exactly_like_itemknn():
    data = _synthetic()
    evaluator = make_evaluator([20])
    knn = presets.model("itemknn", data.n_items, data.n_users)
    knn.fit(data)
    reference = evaluator.rank_counts(knn, data, "test")
    # In time units, events at the same second as the last weigh 1 whatever the decay; with
    # distinct timestamps only the last event is left as well.
    distinct = dataclasses.replace(data, timestamps=np.arange(data.n_events) * 60)
    for unit, timed in (("position", data), ("time", distinct)):
        sharp = presets.model("expdecay_knn", data.n_items, data.n_users, decay=1e4,
                              decay_unit=unit, time_unit_s=60.0)
        sharp.load_state_dict(knn.state_dict())
        counts = evaluator.rank_counts(sharp, timed, "test")
        assert np.array_equal(counts.greater, reference.greater)
        assert np.array_equal(counts.equal, reference.equal)
    # with decay 1 the earlier history does change the ranks
    smooth = presets.model("expdecay_knn", data.n_items, data.n_users)
    smooth.load_state_dict(knn.state_dict())
    assert not np.array_equal(evaluator.rank_counts(smooth, data, "test").greater,
                              reference.greater)


def test_expdecay_scores_do_not_depend_on_item_chunks_or_the_anchor_block_size():
    data = _synthetic()
    model = presets.model("expdecay_knn", data.n_items, data.n_users, window=None)
    model.fit(data)
    batch = next(prediction_batches(data, "test", batch_users=64))
    state = model.prediction_states(batch)
    catalogue = model.score_items(state, 0, data.n_items)
    chunk = model.score_items(state, 3, 50)
    assert torch.allclose(chunk, catalogue[:, 3:50], atol=1e-6)
    model.anchor_block = 1  # one anchor column per step
    assert torch.allclose(model.score_items(state, 3, 50), chunk, atol=1e-6)


def _one_state(model, batch, point: int):
    return model.prediction_states(batch)[point:point + 1]


def test_mf_scores_are_user_factor_times_item_factor_plus_bias():
    torch.manual_seed(0)
    data = sequences([[0, 1, 2, 3], [3, 2, 1], [4, 4]], n_items=5)
    model = presets.model("mf", 5, 3, factors=4)
    with torch.no_grad():
        model.item_bias.copy_(torch.randn(5))
    batch = next(prediction_batches(data, "test", batch_users=8))
    scores = model.score_items(model.prediction_states(batch), 0, 5)
    p, q, b = model.user_factors.detach(), model.item_factors.detach(), model.item_bias.detach()
    for point in range(batch.n_targets):
        user = int(batch.users[batch.target_rows[point]])
        assert torch.allclose(scores[point], q @ p[user] + b, atol=1e-6)
    assert len({int(u) for u in batch.users}) == 3  # three users, three different rows


def test_seqmf_scores_follow_the_fpmc_equation_over_the_last_two_items():
    torch.manual_seed(0)
    data = sequences([[0, 1, 2, 3, 4, 5], [5, 1]], n_items=6, n_test=[2, 1])
    model = presets.model("seqmf", 6, 2, factors=3)
    batch = next(prediction_batches(data, "test", batch_users=8))
    scores = model.score_items(model.prediction_states(batch), 0, 6)
    p = model.user_factors.detach()
    q, q_next = model.item_factors.detach().split(3, dim=1)
    origin = model.transition_factors.detach()
    expected = {  # (user, column of the target): p_u . q_i + 1/2 sum_{last 2} l_j . q'_i
        (0, 4): q @ p[0] + 0.5 * q_next @ (origin[2] + origin[3]),
        (0, 5): q @ p[0] + 0.5 * q_next @ (origin[3] + origin[4]),
        # one earlier event: the mean over the one item there is, l_5 . q'_i
        (1, 1): q @ p[1] + q_next @ origin[5],
    }
    seen = set()
    for point in range(batch.n_targets):
        row = int(batch.target_rows[point])
        key = (int(batch.users[row]), int(batch.target_cols[point]))
        assert torch.allclose(scores[point], expected[key], atol=1e-6)
        seen.add(key)
    assert seen == set(expected)


def test_seqmf_sees_the_last_item_but_not_one_three_steps_back():
    torch.manual_seed(0)
    data = sequences([[0, 1, 2, 3, 4, 5]], n_items=6)  # the target is item 5, at column 5
    model = presets.model("seqmf", 6, 1, factors=4)
    batch = next(prediction_batches(data, "test", batch_users=8))
    reference = model.score_items(model.prediction_states(batch), 0, 6)
    three_back = batch.items.clone()
    three_back[0, 2] = 0  # context ... 2, 3, 4 -> ... 0, 3, 4
    batch.items = three_back
    assert torch.equal(model.score_items(model.prediction_states(batch), 0, 6), reference)
    last = three_back.clone()
    last[0, 4] = 1  # the last item 4 -> 1
    batch.items = last
    assert not torch.allclose(model.score_items(model.prediction_states(batch), 0, 6), reference)


def test_bpr_batches_cover_each_training_event_once_with_other_items_as_negatives():
    data = sequences([[0, 1, 2, 3, 4, 5], [5, 1, 2], [3]], n_items=6, n_test=[2, 1, 0])
    # training events: user 0 items 0..3, user 1 items 5, 1, user 2 item 3
    for model, expected in (
        (presets.model("mf", 6, 3), {(0, 0, ()), (0, 1, ()), (0, 2, ()), (0, 3, ()), (1, 5, ()),
                                     (1, 1, ()), (2, 3, ())}),
        # seqmf: events with an earlier training event, context most recent first
        (presets.model("seqmf", 6, 3),
         {(0, 1, (0,)), (0, 2, (1, 0)), (0, 3, (2, 1)), (1, 1, (5,))}),
    ):
        seen = []
        for batch in model.training_batches(data, 2, np.random.default_rng(0)):
            assert batch.n_events == len(batch.positives) <= 2
            assert bool((batch.negatives != batch.positives).all())
            assert bool(((batch.negatives >= 0) & (batch.negatives < 6)).all())
            for row in range(batch.n_events):
                context = tuple(batch.context[row][batch.context_mask[row]].tolist())
                seen.append((int(batch.users[row]), int(batch.positives[row]), context))
        assert sorted(seen) == sorted(expected)


def test_bpr_negatives_are_uniform_over_the_other_items():
    data = sequences([[0] * 3001], n_items=4, n_test=[0])
    model = presets.model("mf", 4, 1)
    negatives = torch.cat([b.negatives for b in
                           model.training_batches(data, 1000, np.random.default_rng(0))])
    counts = np.bincount(negatives.numpy(), minlength=4)
    assert counts[0] == 0 and len(negatives) == 3001
    assert counts[1:].min() > 900  # about 1000 each


def _train(name: str, data, seed: int, epochs: int = 6):
    seed_everything(seed)
    model = presets.model(name, data.n_items, data.n_users, factors=16)
    trainer = Trainer(make_evaluator([20]), train_settings(epochs=epochs, batch_size=256, lr=0.01,
                                                     grad_clip=None, patience=epochs,
                                                     progress=False), seed=seed)
    result = trainer.fit(model, data)
    return model, result


@pytest.mark.parametrize("name", ["mf", "seqmf"])
def test_factorisation_loss_falls_and_beats_popularity(name):
    data = _synthetic(n_users=150, n_items=60)
    evaluator = make_evaluator([20])
    pop = Popularity(data.n_items, data.n_users)
    pop.fit(data)
    model, result = _train(name, data, seed=0)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.8 * losses[0]
    assert losses[0] < math.log(2) + 0.01  # BPR starts near log 2 with small factors
    mrr = evaluator.evaluate(model, data, "test")["mrr_at_20"]
    assert mrr > 1.5 * evaluator.evaluate(pop, data, "test")["mrr_at_20"]


@pytest.mark.parametrize("name", ["mf", "seqmf"])
def test_factorisation_is_deterministic_under_a_seed(name):
    data = _synthetic(n_users=40, n_items=30)
    first, _ = _train(name, data, seed=5, epochs=2)
    again, _ = _train(name, data, seed=5, epochs=2)
    other, _ = _train(name, data, seed=6, epochs=2)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not torch.equal(first.user_factors, other.user_factors)


def test_expdecay_is_deterministic():
    data = _synthetic(n_users=40, n_items=30)
    counts = []
    for _ in range(2):
        model = presets.model("expdecay_knn", data.n_items, data.n_users, decay_unit="time")
        model.fit(data)
        counts.append(make_evaluator([20]).rank_counts(model, data, "test"))
    assert np.array_equal(counts[0].greater, counts[1].greater)
    assert np.array_equal(counts[0].equal, counts[1].equal)


def test_train_optimizer_sgd_takes_plain_gradient_steps():
    torch.manual_seed(0)
    data = sequences([[0, 1, 2, 3], [3, 2, 1]], n_items=4, n_test=[0, 0])
    model = presets.model("mf", 4, 2, factors=3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = next(model.training_batches(data, 100, np.random.default_rng(0)))
    model.training_loss(batch).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    trainer = Trainer(make_evaluator([20]), train_settings(lr=0.5, optimizer="sgd"), seed=0)
    optimizer = trainer.make_optimizer(model)
    assert isinstance(optimizer, torch.optim.SGD)
    model.training_loss(batch).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.allclose(p, before[name] - 0.5 * grads[name], atol=1e-6), name


# ------------------------------------------------------------------ seen_bias (mf, seqmf)
@pytest.mark.parametrize("name", ["mf", "seqmf"])
def test_seen_bias_adds_beta_to_exactly_the_items_seen_before_each_point(name):
    torch.manual_seed(0)
    # user 0: 0 1 2 | test 1 5 (item 1 repeats, 5 is new); user 1: 3 | test 3 4
    data = sequences([[0, 1, 2, 1, 5], [3, 3, 4]], n_items=6, n_test=[2, 2])
    plain = presets.model(name, 6, 2, factors=3)
    model = presets.model(name, 6, 2, factors=3, seen_bias=True)
    model.load_state_dict(plain.state_dict() | {"seen_bias": torch.tensor(2.5)})
    batch = next(prediction_batches(data, "test", batch_users=8))
    base = plain.score_items(plain.prediction_states(batch), 0, 6)
    state = model.prediction_states(batch)
    # item chunks [0, 4) + [4, 6) give the same block as one pass
    scores = torch.cat([model.score_items(state, 0, 4), model.score_items(state, 4, 6)], 1)
    expected_seen = {  # (user, target column): items before that column
        (0, 3): {0, 1, 2}, (0, 4): {0, 1, 2}, (1, 1): {3}, (1, 2): {3},
    }
    for point in range(batch.n_targets):
        row = int(batch.target_rows[point])
        key = (int(batch.users[row]), int(batch.target_cols[point]))
        seen = torch.zeros(6)
        seen[list(expected_seen.pop(key))] = 2.5
        assert torch.allclose(scores[point], base[point] + seen, atol=1e-6), key
    assert not expected_seen


def test_seen_bias_state_slices_like_the_evaluator_does():
    """The evaluator cuts states into runs of points; every piece must score as the whole."""
    torch.manual_seed(0)
    data = sequences([[0, 1, 2, 1, 5], [3, 3, 4]], n_items=6, n_test=[2, 2])
    model = presets.model("mf", 6, 2, factors=3, seen_bias=True)
    with torch.no_grad():
        model.seen_bias.fill_(-1.0)
    batch = next(prediction_batches(data, "test", batch_users=8))
    state = model.prediction_states(batch)
    whole = model.score_items(state, 0, 6)
    # a 1-point and a 2-point product round differently on some CPUs (AVX-512 GEMM kernels)
    for part in (slice(0, 1), slice(1, 3), slice(3, 4)):
        piece = tuple(s[part] for s in state)
        torch.testing.assert_close(model.score_items(piece, 0, 6), whole[part],
                                   rtol=SHAPE_RTOL, atol=SHAPE_ATOL)
    assert_no_near_ties(whole)  # so counts from scores equal to rounding are equal
    full = make_evaluator([5], max_block_elements=4).rank_counts(model, data, "test")
    one_block = make_evaluator([5]).rank_counts(model, data, "test")
    assert np.array_equal(full.greater, one_block.greater)
    assert np.array_equal(full.equal, one_block.equal)


def test_bpr_batches_flag_items_seen_before_the_positive():
    # user 0 trains on 0 1 0 2 (test 3), user 1 on 2 0 0 (test 1): the second 0 of each repeats,
    # every other positive is new to its user (user 1's 2 and 0 are not: user 0 had them)
    data = sequences([[0, 1, 0, 2, 3], [2, 0, 0, 1]], n_items=4)
    model = presets.model("mf", 4, 2, seen_bias=True)
    flags = {}
    for batch in model.training_batches(data, 3, np.random.default_rng(0)):
        for k in range(batch.n_events):
            position, negative = int(batch.positions[k]), int(batch.negatives[k])
            start = data.offsets[int(batch.users[k])]
            history = set(data.items[start:position].tolist())
            assert bool(batch.negative_seen[k]) == (negative in history)
            flags[position] = bool(batch.positive_seen[k])
    assert flags == {0: False, 1: False, 2: True, 3: False, 5: False, 6: False, 7: True}


def test_seen_bias_is_learned_negative_without_repeats_and_positive_with_them():
    rng = np.random.default_rng(0)
    distinct = [list(rng.permutation(30)[:12]) for _ in range(40)]  # nobody repeats an item
    repeats = [list(rng.choice(rng.permutation(30)[:4], 12)) for _ in range(40)]  # 4 favourites
    signs = []
    for users in (distinct, repeats):
        data = sequences(users, n_items=30)
        seed_everything(0)
        model = presets.model("mf", 30, 40, factors=8, seen_bias=True)
        settings = train_settings(epochs=15, batch_size=64, lr=0.05, grad_clip=None,
                                  patience=15, progress=False)
        Trainer(make_evaluator([20]), settings, seed=0).fit(model, data)  # no validation events
        signs.append(float(model.seen_bias.detach()))
    assert signs[0] < -0.1 and signs[1] > 0.1
