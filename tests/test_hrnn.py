"""HRNN: the user-level update at a session boundary and the session state at a session start
by hand, the state carried across training windows, and the missing session gap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import SHAPE_ATOL, SHAPE_RTOL, compose_config, timed_sequences
from seqexp.core.errors import SeqexpError
from seqexp.data.batching import prediction_batches
from seqexp.models.hrnn import HRNN
from seqexp.run import presets
from seqexp.run.options import check_model

GAP = 100
CLOSE = {"rtol": SHAPE_RTOL, "atol": SHAPE_ATOL}


def _model() -> HRNN:
    torch.manual_seed(0)
    return presets.model("hrnn", 10, 1, session_gap_s=GAP, hidden_size=3, window=3, dropout=0.0,
                dropout_is_keep_prob=False, user_dropout=0.0).eval()


def user_gru_by_hand(gru: torch.nn.GRUCell, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """c' = (1 − z) ⊙ n + z ⊙ c with r, z = σ(W_{r,z} s + b + U_{r,z} c + b'),
    n = tanh(W_n s + b + r ⊙ (U_n c + b')): the user GRU written out."""
    w_r, w_z, w_n = gru.weight_ih.chunk(3)
    u_r, u_z, u_n = gru.weight_hh.chunk(3)
    b_r, b_z, b_n = gru.bias_ih.chunk(3)
    d_r, d_z, d_n = gru.bias_hh.chunk(3)
    r = torch.sigmoid(s @ w_r.T + b_r + c @ u_r.T + d_r)
    z = torch.sigmoid(s @ w_z.T + b_z + c @ u_z.T + d_z)
    n = torch.tanh(s @ w_n.T + b_n + r * (c @ u_n.T + d_n))
    return (1 - z) * n + z * c


def test_a_session_start_updates_the_user_state_and_projects_it():
    # one user: session 1 = items 1 2 3 (t 0 5 9), session 2 = 4 5 (t 400 401), session 3 = 6
    model = _model()
    cell = model.cell
    data = timed_sequences([[1, 2, 3, 4, 5, 6]], [[0, 5, 9, 400, 401, 900]], n_items=10,
                           n_test=[5])
    batch = next(prediction_batches(data, "test", 8))
    assert batch.target_cols.tolist() == [1, 2, 3, 4, 5]
    with torch.no_grad():
        states = model.prediction_states(batch)
        x = model.embedding(torch.tensor([1, 2, 3, 4, 5]))

        def session_step(s, item):  # the session GRU (gru's cell, checked in test_cells.py)
            no_boundary = torch.ones(1, 1)
            both = torch.cat([s, torch.zeros_like(s)], -1)
            return cell(x[item : item + 1, None], both, None, no_boundary)[0][:, 0]

        zero = torch.zeros(1, 3)
        s = session_step(zero, 0)  # after item 1: the session state, no boundary yet
        torch.testing.assert_close(states[0:1], s, **CLOSE)
        s = session_step(s, 1)
        torch.testing.assert_close(states[1:2], s, **CLOSE)
        s = session_step(s, 2)  # item 3 ends session 1: the next target opens session 2
        c1 = user_gru_by_hand(cell.user_gru, s, zero)  # user state: from 0 with s
        start = torch.tanh(c1 @ cell.init.weight.T + cell.init.bias)
        torch.testing.assert_close(states[2:3], start, **CLOSE)  # item 4 predicted from it
        s = session_step(start, 3)
        torch.testing.assert_close(states[3:4], s, **CLOSE)
        s = session_step(s, 4)  # item 5 ends session 2
        c2 = user_gru_by_hand(cell.user_gru, s, c1)  # the second update starts from c1
        torch.testing.assert_close(states[4:5],
                                   torch.tanh(c2 @ cell.init.weight.T + cell.init.bias), **CLOSE)


def test_training_carries_both_states_across_windows_as_the_replay_does():
    # sessions 1 2 | 3 4 | 5 6 7 | 8 (t 0 5 | 300 305 | 700 705 710 | 800); training pairs in
    # windows of 3: the second window starts from the first's [s; c], its boundary 4 -> 5 updates
    # the user state carried from the boundary 2 -> 3 of the first window
    model = _model()
    items, times = [[1, 2, 3, 4, 5, 6, 7, 8]], [[0, 5, 300, 305, 700, 705, 710, 800]]
    train = timed_sequences(items, times, n_items=10, n_test=[1])
    carried = []
    with torch.no_grad():
        for batch in model.training_batches(train, 1, np.random.default_rng(0)):
            model.training_loss(batch)
            carried.append(batch.carry.states[0, :3].clone())
        replay = timed_sequences(items, times, n_items=10, n_test=[7])
        states = model.prediction_states(next(prediction_batches(replay, "test", 8)))
    assert len(carried) == 2
    torch.testing.assert_close(carried[0], states[2], **CLOSE)  # after item 3 (column 2)
    torch.testing.assert_close(carried[1], states[5], **CLOSE)  # after item 6 (column 5)


def test_hrnn_needs_a_session_gap():
    """The schema's check (HRNN.config_checks), also of a checkpoint's model block."""
    node = presets.config(["model=hrnn"])["model"]
    check_model(node)
    with pytest.raises(SeqexpError, match="model=hrnn needs session boundaries: set "
                       "model.session_gap_s"):
        check_model(node | {"session_gap_s": None})


def test_the_replay_carries_both_states_across_its_time_chunks():
    rng = np.random.default_rng(0)
    items = [list(rng.integers(0, 5, 30)) for _ in range(3)]
    times = [list(np.cumsum(rng.integers(0, 200, 30))) for _ in range(3)]  # gaps across 100
    data = timed_sequences(items, times, n_items=5, n_test=[10, 10, 10])
    model = _model()
    batch = next(prediction_batches(data, "test", 8))
    with torch.no_grad():
        whole = model.prediction_states(batch)
        model.eval_chunk = 7  # the replay runs 7 steps at a time, carrying [s; c] between
        torch.testing.assert_close(model.prediction_states(batch), whole, **CLOSE)


@pytest.mark.parametrize("overrides, gap", [
    (["split=last_session"], 1800),
    (["split=last_session", "split.session_gap_s=600"], 600),  # the protocol's sessions
    (["split=user_tail"], 1800),
    (["split=last_session", "split.session_gap_s=600", "model.session_gap_s=60"], 60),
])
def test_hrnns_session_gap_is_the_last_session_splits_unless_set(overrides, gap):
    cfg = compose_config(["model=hrnn", *overrides])
    assert cfg.model.session_gap_s == gap
