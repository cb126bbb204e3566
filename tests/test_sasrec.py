"""SASRec: the attention mask by hand, causality, the prediction window, the training rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import SHAPE_ATOL, SHAPE_RTOL, sequences
from seqexp.core.errors import SeqexpError
from seqexp.data.batching import prediction_batches
from seqexp.models.sasrec import SASRec, _training_rows, attention_mask
from seqexp.run import presets
from seqexp.run.options import check_model


def _model(n_items: int = 6, max_len: int = 4) -> SASRec:
    torch.manual_seed(0)
    return presets.model("sasrec", n_items, 2, hidden_size=8, max_len=max_len, n_blocks=2,
                         n_heads=2, dropout=0.0).eval()


def test_attention_mask_by_hand():
    # one window: padding, then two items
    allowed = attention_mask(torch.tensor([[False, True, True]]))[0]
    assert allowed.tolist() == [[True, False, False],  # padding: itself only
                                [False, True, False],  # first item: itself
                                [False, True, True]]  # second item: both items, no padding


def test_an_output_never_depends_on_a_later_item():
    model = _model()
    items = torch.tensor([[6, 1, 2, 3]])  # 6 = padding
    changed = torch.tensor([[6, 1, 2, 5]])
    before, after = model.encode(items), model.encode(changed)
    torch.testing.assert_close(before[:, :3], after[:, :3], rtol=SHAPE_RTOL, atol=SHAPE_ATOL)
    assert not torch.allclose(before[:, 3], after[:, 3])  # the changed position itself moves
    earlier = torch.tensor([[6, 4, 2, 3]])  # an earlier item does change the last output
    assert not torch.allclose(before[:, 3], model.encode(earlier)[:, 3])


def test_a_prediction_state_is_the_window_of_the_last_max_len_items():
    # user 0: 0 1 2 3 4 | test 5 (and 4 is validation-free training); user 1: 3 | test 2
    data = sequences([[0, 1, 2, 3, 4, 5], [3, 2]], n_items=6, n_test=[2, 1])
    model = _model(max_len=3)
    batch = next(prediction_batches(data, "test", batch_users=8))
    states = model.prediction_states(batch)
    expected = {(0, 4): [1, 2, 3], (0, 5): [2, 3, 4], (1, 1): [6, 6, 3]}
    for point in range(batch.n_targets):
        user = int(batch.users[batch.target_rows[point]])
        window = expected[(user, int(batch.target_cols[point]))]
        by_hand = model.encode(torch.tensor([window]))[0, -1]
        torch.testing.assert_close(states[point], by_hand, rtol=SHAPE_RTOL, atol=SHAPE_ATOL)
    # a later event of the user changes no earlier prediction
    changed = sequences([[0, 1, 2, 3, 4, 0], [3, 2]], n_items=6, n_test=[2, 1])
    again = model.prediction_states(next(prediction_batches(changed, "test", batch_users=8)))
    torch.testing.assert_close(again, states, rtol=SHAPE_RTOL, atol=SHAPE_ATOL)
    # item scores are the state times each item's input embedding, on any chunk
    scores = model.score_items(states, 2, 5)
    torch.testing.assert_close(scores, states @ model.item_embedding.weight[2:5].T)


def test_training_rows_cut_each_user_from_the_end():
    # user 0 trains on 0 1 2 3 4 (4 pairs), user 1 on 5 (no pair); max_len 3
    data = sequences([[0, 1, 2, 3, 4, 9], [5, 9]], n_items=10)
    inputs, targets, mask = _training_rows(data, 3)
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert np.where(mask, inputs, -1).tolist() == [[1, 2, 3], [-1, -1, 0]]
    assert np.where(mask, targets, -1).tolist() == [[2, 3, 4], [-1, -1, 1]]


def test_sasrec_refuses_heads_that_do_not_divide_the_size():
    """The schema's check (SASRec.config_checks), also of a checkpoint's model block."""
    node = presets.config(["model=sasrec"])["model"]
    check_model(node | {"hidden_size": 8, "n_heads": 2})
    with pytest.raises(SeqexpError, match="model.n_heads=3 must divide model.hidden_size=8"):
        check_model(node | {"hidden_size": 8, "n_heads": 3})
