"""Session-scoped recurrent states (`model.session_gap_s`): where sessions break, the state at a
session start, and what a session's evaluation may depend on."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from helpers import (
    SHAPE_ATOL,
    SHAPE_RTOL,
    compose_config,
    recurrent,
    timed_sequences,
    tiny_overrides,
)
from seqexp.core.errors import SeqexpError
from seqexp.data.batching import prediction_batches, window_batches
from seqexp.models.cells import CELLS
from seqexp.models.recurrent import RecurrentRecommender
from seqexp.run import presets
from seqexp.run.experiment import run_experiment
from seqexp.run.options import check_model

GAP = 100
USER_CELLS = ["linear_ugru", "rectified_ugru", "attentional_ugru"]
STEP_CELLS = ["gru", *USER_CELLS]


def model(cell: str, gap: float | None = GAP, n_users: int = 3, **options) -> RecurrentRecommender:
    torch.manual_seed(0)
    recommender = recurrent(n_items=10, n_users=n_users, cell=cell, hidden_size=6,
                                       window=4, dropout=0.0, dropout_is_keep_prob=False,
                                       user_dropout=0.0, session_gap_s=gap, **options)
    return recommender.eval()


def test_training_windows_mark_the_targets_that_start_a_session():
    # events at 0, 10, 500 (gap 490 > 100), 505, 2000 (gap 1495), 2001; one user, all training
    # but the last event, which is test
    data = timed_sequences([[1, 2, 3, 4, 5, 6]], [[0, 10, 500, 505, 2000, 2001]], n_items=10)
    batch = next(window_batches(data, 1, 8, np.random.default_rng(0), session_gap_s=GAP))
    # pairs (1->2), (2->3 new session), (3->4), (4->5 new session); 5->6 is the test event
    assert batch.session_break.tolist() == [[False, True, False, True, False, False, False,
                                             False]]
    plain = next(window_batches(data, 1, 8, np.random.default_rng(0)))
    assert plain.session_break is None
    assert torch.equal(plain.inputs, batch.inputs)


def test_a_gap_equal_to_the_threshold_does_not_break_a_session():
    data = timed_sequences([[1, 2, 3]], [[0, GAP, GAP + GAP + 1]], n_items=10)
    batch = next(window_batches(data, 1, 4, np.random.default_rng(0), session_gap_s=GAP))
    assert batch.session_break[0, :1].tolist() == [False]  # 1 -> 2: gap 100, not above


@pytest.mark.parametrize("cell", STEP_CELLS)
def test_the_state_at_a_session_start_is_h0(cell):
    # user 0: two sessions; the targets at columns 1, 2 (same session) and 3 (new session)
    data = timed_sequences([[1, 2, 3, 4, 5]], [[0, 5, 9, 400, 401]], n_items=10,
                           n_test=[4])
    batch = next(prediction_batches(data, "test", 8))
    with torch.no_grad():
        states = model(cell, n_users=1).prediction_states(batch)
    assert batch.target_cols.tolist() == [1, 2, 3, 4]
    assert torch.count_nonzero(states[2]) == 0  # column 3 starts a session: h0 = 0
    assert torch.count_nonzero(states[0]) > 0 and torch.count_nonzero(states[3]) > 0
    with torch.no_grad():
        whole = model(cell, gap=None, n_users=1).prediction_states(batch)
    assert torch.count_nonzero(whole[2]) > 0  # without sessions the state runs on


@pytest.mark.parametrize("cell", STEP_CELLS)
def test_a_session_does_not_depend_on_earlier_sessions_of_the_same_user(cell):
    # one user's two possible histories: the same last session (items 7, 8, 9) after
    # different earlier sessions
    last, stamps = [7, 8, 9], [1000, 1001, 1002]
    one = timed_sequences([[1, 2, *last]], [[0, 1, *stamps]], n_items=10, n_test=[2])
    other = timed_sequences([[4, 5, 6, 3, *last]], [[0, 1, 2, 3, *stamps]], n_items=10,
                            n_test=[2])
    recommender = model(cell, n_users=1)
    with torch.no_grad():
        first = recommender.prediction_states(next(prediction_batches(one, "test", 8)))
        second = recommender.prediction_states(next(prediction_batches(other, "test", 8)))
    torch.testing.assert_close(first, second, rtol=SHAPE_RTOL, atol=SHAPE_ATOL)
    whole = model(cell, gap=None, n_users=1)
    with torch.no_grad():
        first = whole.prediction_states(next(prediction_batches(one, "test", 8)))
        second = whole.prediction_states(next(prediction_batches(other, "test", 8)))
    assert not torch.allclose(first, second, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("cell", STEP_CELLS)
def test_only_the_user_vector_carries_who_the_user_is_across_sessions(cell):
    # two users with the same last session after different earlier ones: states within the
    # last session differ only through v, so equal for gru and not for the user-based cells
    data = timed_sequences([[1, 2, 7, 8, 9], [4, 5, 7, 8, 9]],
                           [[0, 1, 1000, 1001, 1002]] * 2, n_items=10, n_test=[2, 2])
    batch = next(prediction_batches(data, "test", 8))
    with torch.no_grad():
        states = model(cell, n_users=2).prediction_states(batch)
    rows = batch.target_rows
    user0, user1 = states[rows == 0], states[rows == 1]
    if CELLS[cell].uses_user:
        assert not torch.allclose(user0, user1, rtol=1e-3, atol=1e-4)
    else:
        torch.testing.assert_close(user0, user1, rtol=SHAPE_RTOL, atol=SHAPE_ATOL)


@pytest.mark.parametrize("cell", STEP_CELLS)
def test_training_restarts_the_carried_state_at_a_session_start(cell):
    # a window that ends with a session break carries h0 = 0 into the next window
    data = timed_sequences([[1, 2, 3, 4, 5, 6, 7, 8, 9, 1]],
                           [[0, 1, 2, 500, 501, 502, 503, 504, 505, 506]], n_items=10)
    recommender = model(cell, n_users=1).train()
    batches = recommender.training_batches(data, 1, np.random.default_rng(0))
    first = next(batches)  # pairs 1->2, 2->3, 3->4 (break), 4->5
    assert first.session_break.tolist() == [[False, False, True, False]]
    recommender.training_loss(first)
    carried = first.carry.states
    assert torch.count_nonzero(carried) > 0  # the window's last step is inside a session
    gap_at_end = timed_sequences([[1, 2, 3, 4, 5, 6]], [[0, 1, 2, 3, 900, 901]], n_items=10)
    batches = recommender.training_batches(gap_at_end, 1, np.random.default_rng(0))
    batch = next(batches)  # pairs 1->2, 2->3, 3->4, 4->5 (break at the window's end)
    assert batch.session_break.tolist() == [[False, False, False, True]]
    recommender.training_loss(batch)
    assert torch.count_nonzero(batch.carry.states) == 0


def test_whole_history_states_are_unchanged_by_an_unreachable_gap():
    # a gap no two events exceed multiplies every state by exactly 1: the same bits
    data = timed_sequences([[1, 2, 3, 4, 5, 6]], [[0, 5, 9, 400, 401, 900]], n_items=10,
                           n_test=[3])
    batch = next(prediction_batches(data, "test", 8))
    with torch.no_grad():
        plain = model("attentional_ugru", gap=None, n_users=1).prediction_states(batch)
        masked = model("attentional_ugru", gap=1e12, n_users=1).prediction_states(batch)
    assert torch.equal(plain, masked)


def test_the_fused_cell_refuses_a_session_gap_in_one_line():
    """The schema's check (RecurrentRecommender.config_checks), also of a checkpoint's."""
    node = presets.config(["model=gru"])["model"] | {"cell": "cudnn_gru"}
    check_model(node)
    with pytest.raises(SeqexpError, match="model.session_gap_s .* model.cell=cudnn_gru"):
        check_model(node | {"session_gap_s": GAP})


def test_a_session_scoped_run_through_the_experiment_is_recorded(tmp_path):
    overrides = ["model=linear_ugru", "model.hidden_size=12",
                 *tiny_overrides(tmp_path / "data", tmp_path / "mlflow.db")]
    whole = run_experiment(compose_config(overrides), launch_dir=tmp_path,
                           output_dir=tmp_path / "whole")
    # the synthetic data's sessions are separated by gaps of a day or more
    scoped = run_experiment(compose_config([*overrides, "model.session_gap_s=3600"]),
                            launch_dir=tmp_path, output_dir=tmp_path / "scoped")
    assert whole.metrics["test_mrr_at_20"] != scoped.metrics["test_mrr_at_20"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {run.data.params["model.session_gap_s"]: run
            for run in client.search_runs(client.get_experiment_by_name("seqexp")
                                          .experiment_id)}
    assert set(runs) == {"None", "3600"}
    assert runs["3600"].data.metrics["epoch/test/mrr_at_20"] == pytest.approx(
        scoped.metrics["test_mrr_at_20"])
