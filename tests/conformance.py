"""The model contract (seqexp/models/base.py), checked on one trained model: what every
registered model must do, whoever wrote it. tests/test_conformance.py runs every check over
every registered model; a plugin's test (tests/test_plugins.py, the worked example of
docs/adding-a-model.md in tests/test_docs.py) runs them over its own.

Each check takes a model trained for one epoch on tiny synthetic data (`trained`)."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import seqexp
from helpers import compose_config, tiny_overrides
from seqexp.apps.recommend import Recommendations
from seqexp.core.checkpoint import read_checkpoint
from seqexp.core.stopping import TrainingStopped
from seqexp.data.batching import PredictionBatch, prediction_batches
from seqexp.data.loading import load_dataset
from seqexp.data.sequences import SequenceData
from seqexp.engine.ranks import distinct_keys
from seqexp.engine.trainer import ResumableState, Trainer, TrainingCallback
from seqexp.models.base import Recommender
from seqexp.run.artifacts import checkpoint_contents
from seqexp.run.experiment import build_evaluator, build_model, build_trainer, seed_everything

CHECKS = ("chunk_invariance", "score_factors", "no_future_leak", "prediction_state",
          "save_load", "resume_mid_epoch")


def _seeded(model_name: str, data_dir: Path, overrides: list[str]):
    """(cfg, data, untrained model) of a tiny run (hidden size 8 where the model has one), the
    model built right after seeding, as a run builds it."""
    cfg = compose_config([f"model={model_name}", *tiny_overrides(data_dir), *overrides])
    if "hidden_size" in cfg.model:
        cfg.model.hidden_size = 8
    data = load_dataset(cfg.dataset, cfg.split, Path(cfg.paths.raw_dir),
                        Path(cfg.paths.cache_dir), progress=False)
    seed_everything(cfg.seed)
    return cfg, data, build_model(cfg.model, data)


def trained(model_name: str, data_dir: Path, folder: Path):
    """(cfg, data, model in eval mode): trained for one epoch on tiny data, its best
    checkpoint in `folder`/checkpoints."""
    cfg, data, model = _seeded(model_name, data_dir, ["train.epochs=1"])
    trainer = build_trainer(cfg, build_evaluator(cfg), folder / "checkpoints" / "best.pt",
                            checkpoint_contents=checkpoint_contents(cfg, data))
    trainer.fit(model, data)
    return cfg, data, model.eval()


def _batch(data: SequenceData) -> PredictionBatch:
    return next(prediction_batches(data, "test", batch_users=64))


@torch.no_grad()
def _scores(model: Recommender, batch: PredictionBatch, n_items: int) -> torch.Tensor:
    return model.score_items(model.prediction_states(batch), 0, n_items)


@torch.no_grad()
def check_chunk_invariance(model: Recommender, data: SequenceData) -> None:
    """Scores of items lo..hi-1 are the columns lo..hi-1 of the whole catalogue's."""
    batch = _batch(data)
    state = model.prediction_states(batch)
    whole = model.score_items(state, 0, data.n_items)
    assert whole.shape == (batch.n_targets, data.n_items)
    bounds = [0, 1, 7, 20, data.n_items]
    chunks = [model.score_items(state, lo, hi) for lo, hi in pairwise(bounds)]
    # tolerances: products of other shapes are not bit-equal on every CPU
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def check_score_factors(model: Recommender, data: SequenceData) -> None:
    """Where a model gives score_factors, its scores are that product plus that bias (the
    evaluator counts those in place of score_items's)."""
    batch = _batch(data)
    state = model.prediction_states(batch)
    factors = model.score_factors(state)
    if factors is None:
        return
    queries, items, bias = factors
    assert queries.shape == (batch.n_targets, items.shape[1])
    assert items.shape[0] == data.n_items and (bias is None or bias.shape == (data.n_items,))
    expected = queries @ items.T + (0 if bias is None else bias)
    torch.testing.assert_close(model.score_items(state, 0, data.n_items), expected,
                               rtol=1e-5, atol=1e-6)


@torch.no_grad()
def check_score_row_keys(model: Recommender, data: SequenceData) -> None:
    """Where a model names points that share their scores (score_row_keys), points with equal
    keys get the same scores for every item (the evaluator scores one row per key)."""
    batch = _batch(data)
    keys = model.score_row_keys(batch)
    if keys is None:
        return
    assert keys.shape == (batch.n_targets,)
    scores = _scores(model, batch, data.n_items)
    _, first, row = distinct_keys(keys)
    assert len(first) < batch.n_targets  # the check compares something
    torch.testing.assert_close(scores, scores[first][row], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def check_score_key_columns(model: Recommender, data: SequenceData) -> None:
    """Where a model names query columns that points of one key share (score_key_columns),
    those first G columns of its score_factors' queries are equal for points with equal keys,
    and some columns are left for the product (the evaluator makes the G columns' part once
    per key)."""
    batch = _batch(data)
    keyed = model.score_key_columns(batch)
    if keyed is None:
        return
    keys, width = keyed
    queries = model.score_factors(model.prediction_states(batch))[0]
    assert keys.shape == (batch.n_targets,) and 0 < width < queries.shape[1]
    _, first, row = distinct_keys(keys)
    assert len(first) < batch.n_targets  # the check compares something
    assert torch.equal(queries[:, :width], queries[first][row][:, :width])


@torch.no_grad()
def check_no_future_leak(model: Recommender, data: SequenceData) -> None:
    """A prediction depends on nothing from its target on: each user's first test event and
    every later one are replaced, and the scores of the points up to the first test event (its
    own included) do not move."""
    first_test = data.val_end  # each user's first test event
    position = np.arange(data.n_events) - np.repeat(data.offsets[:-1], np.diff(data.offsets))
    later = np.arange(data.n_events) >= np.repeat(first_test, np.diff(data.offsets))
    changed = replace(data, items=np.where(later, (data.items + 1) % data.n_items,
                                           data.items).astype(data.items.dtype))
    assert later.any()
    batch, other = _batch(data), _batch(changed)
    assert torch.equal(batch.target_rows, other.target_rows)
    before = (batch.target_cols.numpy() <= (first_test - data.offsets[:-1])[
        batch.users.numpy()][batch.target_rows.numpy()])
    assert before.any() and not before.all() and position.max() > 0
    torch.testing.assert_close(_scores(model, other, data.n_items)[before],
                               _scores(model, batch, data.n_items)[before])


@torch.no_grad()
def check_prediction_state(model: Recommender, data: SequenceData) -> None:
    """The state is one row per prediction point (a tensor, a tuple of tensors, or the int
    P), and the rows of a sliced state score as those rows of the whole (the evaluator scores
    slices of it)."""
    batch = _batch(data)
    state = model.prediction_states(batch)
    parts = state if isinstance(state, tuple) else (state,)
    for part in parts:
        assert (part == batch.n_targets if isinstance(part, int)
                else isinstance(part, torch.Tensor) and len(part) == batch.n_targets), type(part)

    def rows(s, lo: int, hi: int):
        return hi - lo if isinstance(s, int) else s[lo:hi]

    lo, hi = 1, min(4, batch.n_targets)
    sliced = tuple(rows(p, lo, hi) for p in parts)
    scores = model.score_items(sliced if isinstance(state, tuple) else sliced[0], 0,
                               data.n_items)
    torch.testing.assert_close(scores, model.score_items(state, 0, data.n_items)[lo:hi])


def check_save_load(model: Recommender, data: SequenceData, cfg, folder: Path) -> None:
    """seqexp.load(the run's outputs folder) recommends what the trained model does."""
    in_memory = Recommendations(model, data, cfg)
    loaded = seqexp.load(folder)
    assert loaded.user_ids == in_memory.user_ids and loaded.item_ids == in_memory.item_ids
    for user in in_memory.user_ids[:3]:
        expected = in_memory.recommend(user=user, k=10)
        assert len(expected) == 10 and list(expected["rank"]) == list(range(1, 11))
        pd.testing.assert_frame_equal(loaded.recommend(user=user, k=10), expected)
    items = in_memory.item_ids[3:6]
    user = in_memory.user_ids[0] if model.uses_users else None
    expected = in_memory.recommend(items=items, user=user, k=10, exclude_seen=True)
    assert not set(items) & set(expected["item"])
    pd.testing.assert_frame_equal(
        loaded.recommend(items=items, user=user, k=10, exclude_seen=True), expected)


class _StopAfterBatch(TrainingCallback):
    """A SIGTERM after the `batch`-th batch of `epoch` (the stop check that follows sees it)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at, self.signal = (epoch, batch), None

    def on_batch_end(self, trainer: Trainer, epoch: int, batches: int) -> None:
        if (epoch, batches) == self.at:
            self.signal = "SIGTERM"

    def __call__(self) -> str | None:
        return self.signal


def _fit(model_name: str, data_dir: Path, state: Path, resume: bool = False,
         stop: _StopAfterBatch | None = None, overrides: tuple[str, ...] = ()
         ) -> tuple[dict, dict]:
    """(the trained weights, the test metrics) of two epochs from the seed, as a new process
    would train them (`resume`: from the training state `state`), with config `overrides`."""
    cfg, data, model = _seeded(model_name, data_dir,
                               ["train.epochs=2", "train.patience=5", *overrides])
    evaluator = build_evaluator(cfg)
    stop = stop or _StopAfterBatch(0, 0)
    trainer = build_trainer(cfg, evaluator, state=ResumableState(state, resume),
                            stop_requested=stop, callbacks=[stop])
    trainer.fit(model, data)
    return model.state_dict(), evaluator.evaluate(model, data, "test")


def check_resume_mid_epoch(model_name: str, data_dir: Path, folder: Path,
                           overrides: tuple[str, ...] = ()) -> None:
    """Training stopped after the first batch of the second epoch (a SIGTERM) and resumed from
    its training state ends with the weights and test metrics of an uninterrupted one, bit
    for bit (config `overrides` on all three runs)."""
    full_weights, full_test = _fit(model_name, data_dir, folder / "full.pt",
                                   overrides=overrides)
    state = folder / "stopped.pt"
    stop = _StopAfterBatch(2, 1)
    try:
        _fit(model_name, data_dir, state, stop=stop, overrides=overrides)
    except TrainingStopped:
        saved = read_checkpoint(state)
        assert saved["epoch"] == 1 and saved["partial"]["batches"] == 1
    else:  # a model without epochs to train never reaches a batch
        assert stop.signal is None
    weights, test = _fit(model_name, data_dir, state, resume=True, overrides=overrides)
    assert test == full_test
    for key, value in full_weights.items():
        assert torch.equal(weights[key], value), key


def check_all(model_name: str, data_dir: Path, folder: Path) -> None:
    """Every check on `model_name` trained once."""
    cfg, data, model = trained(model_name, data_dir, folder)
    check_chunk_invariance(model, data)
    check_score_factors(model, data)
    check_score_row_keys(model, data)
    check_score_key_columns(model, data)
    check_no_future_leak(model, data)
    check_prediction_state(model, data)
    check_save_load(model, data, cfg, folder)
    check_resume_mid_epoch(model_name, data_dir, folder)
