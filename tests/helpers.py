"""Shared helpers for tests: tiny configs, tiny datasets, a composed Hydra config, callbacks
that stop a run's training at a chosen epoch."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from seqexp.apps import cli
from seqexp.core.resources import config_dir
from seqexp.data.interactions import Interactions
from seqexp.data.preprocess import build_sequences
from seqexp.data.sequences import SequenceData
from seqexp.engine.evaluator import Evaluator
from seqexp.engine.trainer import Trainer, TrainingCallback, TrainSettings
from seqexp.models import cpu_kernels
from seqexp.models.recurrent import RecurrentRecommender
from seqexp.run import presets
from seqexp.run.registry import registry


def tiny_overrides(data_dir: Path, tracking_db: Path | None = None,
                   log_model: bool = False) -> list[str]:
    """A run small enough for a test: ~40 users, 2 epochs, hidden 16. Without its MLflow
    Model unless `log_model` (it costs the run about a second; tests/test_mlflow_model.py)."""
    overrides = [
        "dataset.n_users=40", "dataset.n_items=50", "dataset.min_events=10",
        "dataset.max_events=20", "train.epochs=2", "train.batch_size=16",
        "train.progress=false", f"paths.data_dir={data_dir}",
        f"mlflow.log_model={str(log_model).lower()}",
    ]
    if tracking_db is not None:
        overrides.append(f"mlflow.tracking_uri=sqlite:///{tracking_db}")
    return overrides


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@functools.cache
def _default_train() -> TrainSettings:
    return TrainSettings.from_config(compose_config([]).train)


def train_settings(**changes) -> TrainSettings:
    """The train.* settings of the default config (conf/train/default.yaml, which holds the
    defaults), with `changes`."""
    return replace(_default_train(), **changes)


def make_evaluator(cutoffs: Sequence[int] | None = None, **changes) -> Evaluator:
    """The evaluator of the default config (conf/eval/default.yaml holds the defaults), with
    `cutoffs` and `changes` (Evaluator arguments); no progress bars."""
    if cutoffs is not None:
        changes["cutoffs"] = cutoffs
    return presets.evaluator(**({"progress": False} | changes))


def split_preset(name: str = "user_tail", **changes) -> dict:
    """The split.* block of split=`name` (conf/split/<name>.yaml), with `changes`."""
    return presets.config([f"split={name}"])["split"] | changes


def preprocess(raw: Interactions, split: Mapping, **filters) -> SequenceData:
    """build_sequences with the default config's dataset filters (min_item_support,
    drop_repeats), with `filters`."""
    dataset = presets.config()["dataset"]
    defaults = {key: dataset[key] for key in ("min_item_support", "drop_repeats")}
    return build_sequences(raw, split, **(defaults | filters))


def recurrent(n_items: int, n_users: int, **changes) -> RecurrentRecommender:
    """The recurrent model of `changes["cell"]` (its preset conf/model/<cell>.yaml; the gru
    preset for a cell without one, cudnn_gru), with `changes`."""
    name = changes.get("cell", "gru")
    if name not in registry().models:
        name = "gru"
    return presets.model(name, n_items, n_users, **changes)


def run_seqexp(argv: list[str]) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `seqexp argv`, in this process (an example costs a Hydra
    composition, not a Python start)."""
    out = io.StringIO()
    saved = sys.argv
    sys.argv = ["seqexp", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return code, out.getvalue()


class HoldAfterEpoch(TrainingCallback):
    """After the state of `epoch` is written, says so on stderr and waits until a stop signal
    arrives, so that a test can SIGKILL or SIGTERM the process there."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        if epoch == self.epoch:
            print(f"seqexp-test: holding after epoch {epoch}", file=sys.stderr, flush=True)
            while trainer.stop_requested() is None:
                time.sleep(0.02)


class SignalAfterEpoch(TrainingCallback):
    """After the state of `epoch` is written, the process sends itself `signum`: what a SLURM
    time limit does through submitit."""

    def __init__(self, epoch: int, signum: int) -> None:
        self.epoch, self.signum = epoch, signum

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        if epoch == self.epoch:
            os.kill(os.getpid(), self.signum)
            time.sleep(0.1)  # the handler runs before the next bytecode; be sure it has


def adding_callback(build_trainer: Callable[..., Trainer],
                    callback: TrainingCallback) -> Callable[..., Trainer]:
    """`build_trainer` (seqexp.run.experiment's), whose trainers also call `callback`: to be put in
    its place, so that the trainer a whole run builds gets the callback."""
    def build(*args, callbacks=(), **kwargs) -> Trainer:
        return build_trainer(*args, callbacks=(*callbacks, callback), **kwargs)
    return build


def sequences(users: list[list[int]], n_items: int, n_val: list[int] | None = None,
              n_test: list[int] | None = None) -> SequenceData:
    """SequenceData from explicit per-user item lists; the last n_test[u] events are test and the
    n_val[u] before them validation (default: no val, 1 test event per user)."""
    n_val = n_val or [0] * len(users)
    n_test = n_test or [1] * len(users)
    lengths = np.array([len(u) for u in users])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    val_end = offsets[1:] - np.array(n_test)
    train_end = val_end - np.array(n_val)
    items = np.concatenate([np.array(u, dtype=np.int32) for u in users])
    stats = {"train_events": int((train_end - offsets[:-1]).sum()),
             "val_events": int(sum(n_val)), "test_events": int(sum(n_test))}
    return SequenceData(items=items, timestamps=np.arange(len(items), dtype=np.int64),
                        offsets=offsets, train_end=train_end.astype(np.int64),
                        val_end=val_end.astype(np.int64), n_items=n_items, stats=stats)


def timed_sequences(users: list[list[int]], times: list[list[int]], n_items: int, **kwargs):
    """`sequences(...)` with explicit per-user timestamps (seconds)."""
    data = sequences(users, n_items, **kwargs)
    return replace(data, timestamps=np.concatenate([np.array(t, np.int64) for t in times]))


# Floats computed through products of other shapes (a 1-row and a 3-row GEMM, other item chunks,
# other batch sizes or thread counts) may differ in the last bits: the BLAS picks its kernel by
# shape, and on AVX-512 the kernels round differently. Such scores agree to rounding ...
SHAPE_RTOL, SHAPE_ATOL = 1e-5, 1e-6
# ... and rank counts computed from them agree exactly only where no two scores of a prediction
# point lie within rounding of each other: the tie margin a test asserts before comparing counts.
TIE_MARGIN = 1e-4


def assert_no_near_ties(scores, margin: float = TIE_MARGIN) -> None:
    """Every two scores of a row (a prediction point) are exactly equal or at least `margin`
    apart, so rank counts from scores that differ by rounding cannot differ."""
    ordered = torch.sort(torch.as_tensor(scores), dim=1).values
    gaps = ordered[:, 1:] - ordered[:, :-1]
    near = (gaps > 0) & (gaps < margin)
    assert not bool(near.any()), f"{int(near.sum())} score pairs within {margin} of each other"


def switch_cpu_kernel(monkeypatch, kernel: str, on: bool) -> None:
    """Turn one kernel of seqexp.models.cpu_kernels on or off for the test, the rest as set."""
    assert kernel in cpu_kernels.KERNELS
    current = set(cpu_kernels.enabled())
    monkeypatch.setattr(cpu_kernels, "_enabled", current | {kernel} if on else current - {kernel})
