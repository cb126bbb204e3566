"""Tests aimed at the classic bugs of a sequential recommender: hidden state leaking between
users, the prediction seeing its own target, dropout left on at evaluation, outputs paired with
the wrong targets, and a user-dropout mask redrawn at every step. Each compares the code with
an independent computation (a replay from a zero state, hand-computed ranks)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import SHAPE_ATOL, SHAPE_RTOL, make_evaluator, recurrent, sequences, switch_cpu_kernel
from seqexp.data.batching import prediction_batches
from seqexp.models import cpu_kernels
from seqexp.models.base import Recommender
from seqexp.models.recurrent import RecurrentRecommender

# every test with the CPU kernels and with the shared (CUDA) code path on the CPU
pytestmark = pytest.mark.usefixtures("cpu_kernels_switch")

CELLS = ["gru", "linear_ugru", "rectified_ugru", "attentional_ugru"]
USER_CELLS = CELLS[1:]

# Users of very unequal lengths: with 3 lanes the short ones finish early, lanes are refilled,
# and at the end lanes run idle while others still work through long users, so a batch's rows
# are no longer its lanes 0, 1, 2 (for several windows in a row with the seed used below).
UNEQUAL_USERS = [
    [1, 2, 3, 4],
    [5, 6, 7, 8, 9, 10, 11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    [3, 1, 4, 1, 5, 9, 2],
    [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2, 3, 5, 3, 6, 0, 2, 8],
    [6, 6, 0],
]
N_ITEMS = 12


def _model(cell: str, n_users: int, **options) -> RecurrentRecommender:
    torch.manual_seed(0)
    settings = {"hidden_size": 4, "window": 3, "dropout": 0.0, "dropout_is_keep_prob": False,
                "user_dropout": 0.0} | options
    return recurrent(N_ITEMS, n_users, cell=cell, **settings)


def _replay(model: RecurrentRecommender, items: list[int], user: int,
            user_vector: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states [len(items), n] after each of `items`, run from a zero state; the user
    vector is the user's embedding (no dropout) unless given."""
    x = model.embedding(torch.tensor(items, dtype=torch.long))[None]
    if user_vector is None and model.user_embedding is not None:
        user_vector = model.user_embedding(torch.tensor([user]))
    out, _ = model.cell(x, torch.zeros(1, model.hidden_size), user_vector)
    return out[0]


@pytest.mark.parametrize("cell", CELLS)
def test_training_windows_continue_each_users_own_state_and_pair_outputs_with_targets(cell):
    """Every window's loss equals the cross-entropy of states replayed from zero over the
    user's prefix against the true next items, and the carried state after a full window is
    that replay's last state: nothing leaks from another user, not even after a lane runs idle.
    """
    data = sequences(UNEQUAL_USERS, n_items=N_ITEMS)
    model = _model(cell, len(UNEQUAL_USERS))
    model.eval()  # no dropout; training_loss works the same
    starts = data.offsets[:-1]
    windows_seen: dict[int, int] = {}
    misaligned_windows = 0
    checked_carries = 0
    with torch.no_grad():
        for batch in model.training_batches(data, 3, np.random.default_rng(0)):
            loss = model.training_loss(batch)
            misaligned_windows += not np.array_equal(batch.lanes, np.arange(len(batch.lanes)))
            expected, n_pairs = 0.0, 0
            for row, lane in enumerate(batch.lanes.tolist()):
                user = int(batch.users[row])
                assert bool(batch.reset[row]) == (user not in windows_seen)
                first = windows_seen.get(user, 0) * model.window
                windows_seen[user] = windows_seen.get(user, 0) + 1
                n_valid = int(batch.mask[row].sum())
                sequence = data.items[starts[user]:data.train_end[user]].tolist()
                assert batch.inputs[row, :n_valid].tolist() == sequence[first:first + n_valid]
                states = _replay(model, sequence[:first + n_valid], user)[first:]
                targets = torch.tensor(sequence[first + 1:first + n_valid + 1])
                expected += float(F.cross_entropy(model.output(states), targets,
                                                  reduction="sum"))
                n_pairs += n_valid
                if n_valid == model.window:
                    assert torch.allclose(batch.carry.states[lane], states[-1], atol=1e-6)
                    checked_carries += 1
            assert loss.item() == pytest.approx(expected / n_pairs, rel=1e-5)
    assert misaligned_windows >= 5 and checked_carries >= 8
    pairs = (data.train_end - starts - 1).clip(min=0)
    assert windows_seen == {u: -(-int(p) // model.window) for u, p in enumerate(pairs) if p > 0}


def _replayed_prediction_states(model: RecurrentRecommender, data, phase: str):
    """{(user, column): state after the events before that column}, from a zero state."""
    first, stop = data.phase_bounds(phase)
    states = {}
    for user in range(data.n_users):
        start = int(data.offsets[user])
        items = data.items[start:int(stop[user])].tolist()
        replayed = _replay(model, items, user)
        for col in range(max(int(first[user]) - start, 1), int(stop[user]) - start):
            states[(user, col)] = replayed[col - 1]
    return states


@pytest.mark.parametrize(("cell", "eval_chunk", "replay_steps"),
                         [(cell, 4, 8) for cell in CELLS] + [("gru", 64, 3), ("gru", 5, 2)])
def test_prediction_states_equal_a_replay_of_the_events_before_each_target(
        cell, eval_chunk, replay_steps, monkeypatch):
    switch_cpu_kernel(monkeypatch, "replay_steps", True)
    monkeypatch.setattr(cpu_kernels, "REPLAY_STEPS", replay_steps)
    data = sequences(UNEQUAL_USERS, n_items=N_ITEMS, n_test=[2, 5, 3, 6, 1])
    # rows stop at different chunks
    model = _model(cell, len(UNEQUAL_USERS), eval_chunk=eval_chunk)
    model.eval()
    expected = _replayed_prediction_states(model, data, "test")
    seen = set()
    with torch.no_grad():
        for batch in prediction_batches(data, "test", batch_users=3):
            got = model.prediction_states(batch)
            for point in range(batch.n_targets):
                key = (int(batch.users[batch.target_rows[point]]),
                       int(batch.target_cols[point]))
                assert torch.allclose(got[point], expected[key], atol=1e-6), key
                seen.add(key)
    assert seen == set(expected) and len(seen) == 17



@pytest.mark.parametrize("cell", list(CELLS))
def test_replay_from_per_item_input_tables_gives_the_same_states(cell, monkeypatch):
    """With more replayed events than items, a CPU replay makes each input-only product once
    per item (cpu_kernels.ItemInputs): the states are exactly those of per-event products."""
    switch_cpu_kernel(monkeypatch, "item_inputs", True)
    data = sequences(UNEQUAL_USERS, n_items=N_ITEMS, n_test=[2, 5, 3, 6, 1])
    model = _model(cell, len(UNEQUAL_USERS), hidden_size=16, eval_chunk=4)  # several chunks
    model.eval()
    (batch,) = prediction_batches(data, "test", batch_users=len(UNEQUAL_USERS))
    tables_made = []
    real_project = cpu_kernels.ItemInputs.project

    def counted(self, layer):
        tables_made.append(layer not in self.tables)
        return real_project(self, layer)

    monkeypatch.setattr(cpu_kernels.ItemInputs, "project", counted)
    with torch.no_grad():
        folded = model.prediction_states(batch)
        switch_cpu_kernel(monkeypatch, "item_inputs", False)
        per_event = model.prediction_states(batch)
    if cell != "cudnn_gru":  # its input product is inside nn.GRU
        assert sum(tables_made) >= 1 and len(tables_made) > sum(tables_made)  # made once, reused
    # a table of n_items rows and a product per event are GEMMs of other shapes: equal to
    # rounding (whole runs with and without the tables: scripts/compare_runs.py)
    torch.testing.assert_close(folded, per_event, rtol=SHAPE_RTOL, atol=SHAPE_ATOL)

def _ranks_by_comparison(scores: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """Pessimistic ranks: 1 + #items scoring above or level with the target (itself aside)."""
    target_scores = scores.gather(1, targets[:, None])
    return ((scores >= target_scores).sum(1)).tolist()


@pytest.mark.parametrize("cell", USER_CELLS)
def test_evaluation_scores_without_dropout_whatever_mode_the_model_is_in(cell):
    """A model left in training mode (as after an epoch) is evaluated with its dropout off:
    the ranks equal those of an eval-mode replay, and the model's mode is restored."""
    data = sequences(UNEQUAL_USERS, n_items=N_ITEMS, n_test=[2, 5, 3, 6, 1])
    model = _model(cell, len(UNEQUAL_USERS), hidden_size=8, user_dropout=0.5, dropout=0.5)
    model.eval()
    with torch.no_grad():
        expected_states = _replayed_prediction_states(model, data, "test")
    model.train()
    counts = make_evaluator([5], batch_users=2).rank_counts(model, data, "test")
    assert model.training
    # Points in the evaluator's order: users by length (stable), then by column.
    _, stop = data.phase_bounds("test")
    order = np.argsort(stop - data.offsets[:-1], kind="stable")
    keys = [key for user in order for key in sorted(expected_states) if key[0] == user]
    states = torch.stack([expected_states[key] for key in keys])
    targets = torch.tensor([int(data.items[data.offsets[u] + c]) for u, c in keys])
    with torch.no_grad():
        expected = _ranks_by_comparison(model.output(states), targets)
    assert counts.rank_pessimistic().tolist() == expected


class RepeatLast(Recommender):
    """Scores the last item of the context 1 and every other item 0."""

    def prediction_states(self, batch):
        return batch.items[batch.target_rows, batch.target_cols - 1]

    def score_items(self, state, lo, hi):
        return (state[:, None] == torch.arange(lo, hi)).float()


def test_the_prediction_for_an_event_sees_only_the_events_before_it():
    # Test events (the last two of each user): a repeat of the previous item ranks first;
    # any other target ties with the 4 other unscored items behind the repeated one: rank 6.
    data = sequences([[0, 1, 1, 2], [3, 3, 4], [2, 5, 5, 5]], n_items=6, n_test=[2, 2, 2])
    counts = make_evaluator([1]).rank_counts(RepeatLast(6, 3), data, "test")
    # users by length (1 first), then by column: (1: 3, 4), (0: 1, 2), (2: 5, 5)
    assert counts.rank_pessimistic().tolist() == [1, 6, 1, 6, 1, 1]
    assert counts.rank_optimistic().tolist() == [1, 2, 1, 2, 1, 1]


@pytest.mark.parametrize("cell", USER_CELLS)
def test_the_user_dropout_mask_is_one_draw_for_all_steps_of_a_window(cell):
    """With dropout on the user vector only, each row's carried state and the window's loss
    are those of a replay with one fixed mask on v: one of the 2^n masks, for every step."""
    data = sequences([[1, 2, 3, 4, 5, 6, 7, 8], [9, 8, 7, 6, 5, 4, 3, 2]], n_items=N_ITEMS)
    model = _model(cell, 2, window=6, user_dropout=0.5)
    model.train()
    n = model.hidden_size
    masks = torch.tensor(list(itertools.product([0.0, 2.0], repeat=n)))  # kept: scaled 1/0.5
    torch.manual_seed(3)
    batch = next(model.training_batches(data, 2, np.random.default_rng(0)))
    assert bool(batch.mask.all()) and bool(batch.reset.all())
    with torch.no_grad():
        loss = model.training_loss(batch)
        expected, drew_some = 0.0, False
        for row, lane in enumerate(batch.lanes.tolist()):
            user = int(batch.users[row])
            items = batch.inputs[row].tolist()
            vectors = model.user_embedding(torch.tensor([user])) * masks
            matches = [mask for mask, vector in zip(masks, vectors, strict=True)
                       if torch.allclose(_replay(model, items, user, vector[None])[-1],
                                         batch.carry.states[lane], atol=1e-6)]
            assert len(matches) == 1, f"row {row}: {len(matches)} masks fit the carried state"
            drew_some |= bool((matches[0] == 0).any())
            states = _replay(model, items, user, model.user_embedding(
                torch.tensor([user])) * matches[0])
            expected += float(F.cross_entropy(model.output(states), batch.targets[row],
                                              reduction="sum"))
    assert drew_some  # the dropout did drop something
    assert loss.item() == pytest.approx(expected / batch.n_events, rel=1e-5)
