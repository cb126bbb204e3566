"""The one training loop, for every model: closed-form fit, then (for models with trainable
parameters) epochs of mini-batches with per-epoch validation, early stopping and the best
checkpoint kept. Knows models only through models.base and reports through callbacks.

The Trainer runs the loop (`fit`, `train_epoch`) and calls parts with one job each: its
TrainSettings (the train.* keys, read by name from the config), EarlyStopping, BestCheckpoint
(best.pt), ResumableState (last.pt), ProgressLog (the bar and the log lines) and a caller's
TrainingCallbacks, at each batch's and epoch's end.

The resumable training state (ResumableState, checkpoints/last.pt) is written atomically after
every epoch, and after the batch at which a stop signal arrived: model and optimizer, the epochs
done, the best state and score, the early-stopping counter, the history, every random state
(torch, numpy, Python and the training batch generator's) and the model's own carried state.
A Trainer whose state has `resume=True` continues from it, batch for batch as if never
stopped."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from seqexp.core.checkpoint import read_checkpoint, save_checkpoint, save_tensors
from seqexp.core.errors import SeqexpError
from seqexp.core.stopping import EvaluationStopped, FitStopped, TrainingStopped
from seqexp.data.sequences import SequenceData
from seqexp.engine.evaluator import Evaluator
from seqexp.engine.lazy_adam import LazyAdam, clip_gradients
from seqexp.models.base import Recommender

log = logging.getLogger(__name__)

MetricsLogger = Callable[[dict[str, float], int], None]
# Returns the name of a stop signal that has arrived (SIGTERM, ...), else None.
StopCheck = Callable[[], str | None]
REPORT_EVERY = 20  # steps between reads of the running loss (progress bar, NaN check)

# train.optimizer: plain SGD and Adagrad alongside Adam, for models whose published learning
# rate was set for them (e.g. BPR-style factorisation).
# lazy_adam: Adam on the rows a batch touches alone, for models with row-sparse gradients
# (seqexp/engine/lazy_adam.py; other results than Adam's).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
    "lazy_adam": LazyAdam,
}
# Tensors of a parameter's size each optimiser keeps (Adam's two moments, Adagrad's sum of
# squares; SGD as the trainer builds it, without momentum, none): seqexp/engine/memory.py.
OPTIMIZER_STATES: dict[str, int] = {"adam": 2, "sgd": 0, "adagrad": 1, "lazy_adam": 2}
# Optimisers that take sparse gradients: a model that can give them is asked to
# (Recommender.set_sparse_gradients).
SPARSE_GRADIENTS = {"lazy_adam"}


@dataclass
class TrainResult:
    """best_epoch / best_score: by the monitored validation metric; None without validation
    events (then the model holds the state after the last epoch)."""

    best_epoch: int | None
    best_score: float | None
    epochs_run: int
    interrupted: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


STATE_FORMAT = "seqexp-training-state-1"


class _EpochAbandoned(Exception):
    """Raised by train_epoch when a stop signal arrived: the partial epoch, to be saved."""

    def __init__(self, partial: dict[str, Any]) -> None:
        super().__init__("stop requested")
        self.partial = partial


def random_states(rng: np.random.Generator) -> dict[str, Any]:
    """Every random state training reads, as tensors and plain values (no ndarray: the state
    file is read with weights_only=True)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_global": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                         cached],
        "python": random.getstate(),
        "batches": rng.bit_generator.state,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: Mapping[str, Any], rng: np.random.Generator) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy_global"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    rng.bit_generator.state = states["batches"]
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def amp_unavailable(device: torch.device) -> str | None:
    """Why bf16 autocast would not speed up training on `device` (None: it would). A CPU
    needs native bf16 products (AVX512-BF16 or AMX): elsewhere oneDNN emulates them."""
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, private
        if any(getattr(torch.cpu, probe, lambda: False)() for probe in probes):
            return None
        return "this CPU has no native bfloat16 products (AVX512-BF16 or AMX)"
    return f"not supported on {device.type}"


# ------------------------------------------------------------------ the parts of the training loop


@dataclass(frozen=True)
class TrainSettings:
    """The train.* keys the trainer reads, by their names in conf/train/default.yaml, which holds
    their defaults (none here: tests/test_resume.py holds the fields and the keys together).
    Values are checked by the config schema (seqexp/core/schema.py) before a trainer is built."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str  # a key of OPTIMIZERS
    weight_decay: float
    grad_clip: float | None
    monitor: str  # the validation metric followed: a key of Evaluator.evaluate's
    patience: int
    min_delta: float
    progress: bool
    amp: bool  # bf16 autocast of the training forward pass (see amp_unavailable)
    compile: bool

    @classmethod
    def from_config(cls, train: Mapping[str, Any]) -> TrainSettings:
        """The settings of `train` (cfg.train), each field read by its own name, so that a new
        train.* key needs no wiring. Keys that are no field (train.num_threads, train.tf32,
        train.cpu_kernels) are read by experiment.configure_torch, not by the trainer."""
        return cls(**{f.name: train[f.name] for f in fields(cls)})


class TrainingCallback:
    """A caller's addition to training (Trainer(callbacks=...)): the trainer calls every hook
    at its point of the loop; the hooks here do nothing."""

    def on_batch_end(self, trainer: Trainer, epoch: int, batches: int) -> None:
        """After the `batches`-th batch of `epoch` is trained, before the stop check."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        """After `epoch` is validated, its resumable state written and its metrics logged,
        before the stop check."""


@dataclass
class EarlyStopping:
    """The best validation score so far and its epoch, and the epochs since (`stale`): training
    is `finished` once `patience` epochs in a row have not beaten the best by `min_delta`."""

    patience: int
    min_delta: float
    best_score: float | None = -math.inf  # None (and best_epoch None): no validation events
    best_epoch: int | None = 0
    stale: int = 0
    finished: bool = False

    def update(self, score: float, epoch: int) -> bool:
        """Counts the score of `epoch`; True when it is the new best."""
        if score > self.best_score + self.min_delta:
            self.best_score, self.best_epoch, self.stale = score, epoch, 0
            return True
        self.stale += 1
        self.finished = self.stale >= self.patience
        return False


@dataclass(frozen=True)
class BestCheckpoint:
    """The best weights on disk (checkpoints/best.pt; no file when `path` is None), with
    `contents` beside them (the resolved config, the raw ids and the training histories:
    seqexp.apps.recommend)."""

    path: Path | None = None
    contents: Mapping[str, Any] | None = None

    def save(self, model: Recommender) -> None:
        if self.path is not None:
            save_checkpoint(model, self.path, self.contents)


@dataclass
class FitState:
    """Where one Trainer.fit stands: what trains, the best weights, early stopping, the result
    so far and a partial epoch (to continue, or stopped and to be saved). All of it is what the
    resumable state holds."""

    model: Recommender
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator  # the training batch generator's random numbers
    stopping: EarlyStopping
    best_state: dict[str, torch.Tensor]
    result: TrainResult
    partial: dict[str, Any] | None = None

    def finish(self) -> TrainResult:
        self.result.best_epoch = self.stopping.best_epoch
        self.result.best_score = self.stopping.best_score
        return self.result


@dataclass(frozen=True)
class ResumableState:
    """The resumable training state file (checkpoints/last.pt, format STATE_FORMAT), written
    after every epoch and at a stop; with `resume`, a fit continues from it when it exists.
    `logged_epochs`: the epochs whose metrics the tracker has (a resumed run): the others of
    the saved history are logged again, in case the process died between writing the state and
    logging."""

    path: Path
    resume: bool = False
    logged_epochs: frozenset[int] | None = None
    # The state `load` read already (seqexp.run.experiment reads it before the run is changed).
    saved: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        """The saved state to continue from; None when not resuming or there is none."""
        if self.saved is not None:
            return self.saved
        if not self.resume or not self.path.is_file():
            return None
        state = read_checkpoint(self.path)
        if state.get("format") != STATE_FORMAT:
            raise SeqexpError(f"{self.path}: not a seqexp training state of this version "
                              f"(format {state.get('format')!r}, expected {STATE_FORMAT})")
        return state

    def write(self, fit: FitState) -> None:
        partial, stopping = fit.partial, fit.stopping
        best_is_current = stopping.best_epoch == fit.result.epochs_run and partial is None
        state = {
            "format": STATE_FORMAT,
            "epoch": fit.result.epochs_run,
            "model": fit.model.state_dict(),
            "optimizer": fit.optimizer.state_dict(),
            "model_training_state": fit.model.training_state(),
            # the current weights are the best ones in the common case: not stored twice
            "best_state": None if best_is_current else fit.best_state,
            "best_score": stopping.best_score,
            "best_epoch": stopping.best_epoch,
            "stale": stopping.stale,
            "finished": stopping.finished,
            "history": fit.result.history,
            # a partial epoch: its batch generator restarts from the epoch's first random state
            "random": random_states(fit.rng) if partial is None else partial["random"],
            "partial": None if partial is None else {
                k: v for k, v in partial.items() if k != "random"},
        }
        save_tensors(state, self.path)

    def restore(self, saved: Mapping[str, Any], fit: FitState,
                log_metrics: MetricsLogger) -> None:
        """`fit` as the saved state left it; the saved epochs the tracker lacks logged again."""
        fit.model.load_state_dict(saved["model"])
        fit.optimizer.load_state_dict(saved["optimizer"])
        restore_random_states(saved["random"], fit.rng)
        fit.model.load_training_state(saved["model_training_state"])
        best = saved["best_state"]
        fit.best_state = copy.deepcopy(fit.model.state_dict()) if best is None else best
        stopping = fit.stopping
        stopping.best_score, stopping.best_epoch = saved["best_score"], saved["best_epoch"]
        stopping.stale, stopping.finished = saved["stale"], saved["finished"]
        fit.result.epochs_run, fit.result.history = saved["epoch"], list(saved["history"])
        fit.partial = saved["partial"]
        kept = (f" and {fit.partial['batches']} batch(es) of epoch {fit.result.epochs_run + 1}"
                if fit.partial else "")
        log.info("resuming after epoch %d%s", fit.result.epochs_run, kept)
        if self.logged_epochs is not None:
            for epoch, row in enumerate(fit.result.history, start=1):
                if epoch not in self.logged_epochs:
                    log_metrics(row, epoch)


class EpochLoss:
    """The event-weighted mean training loss of an epoch so far. It is summed on the device and
    read back (`mean`) only when asked: a read per step would make the host wait for the GPU at
    every batch."""

    def __init__(self, device: torch.device, epoch: int) -> None:
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.events, self.steps, self.epoch = 0, 0, epoch

    def add(self, loss: torch.Tensor, n_events: int) -> None:
        self.total += loss.detach().double() * n_events
        self.events += n_events
        self.steps += 1

    def continue_from(self, partial: Mapping[str, Any]) -> None:
        """Goes on from the sums of a partial epoch (its `batches`, `events` and `loss`)."""
        self.steps, self.events = partial["batches"], partial["events"]
        self.total += partial["loss"].to(self.total.device)

    def sums(self) -> dict[str, Any]:
        return {"batches": self.steps, "events": self.events, "loss": self.total.cpu()}

    def mean(self) -> float:
        """Mean loss so far; a non-finite one stops training (the parameters are ruined)."""
        mean = self.total.item() / max(self.events, 1)
        if not math.isfinite(mean):
            raise SeqexpError(f"training loss became {mean} in epoch {self.epoch}; "
                              f"lower train.lr")
        return mean


class ProgressLog:
    """What training shows as it goes: a bar per epoch (`enabled`: train.progress) with the
    running loss and speed, and the log lines of each epoch's training and validation."""

    def __init__(self, enabled: bool, epochs: int) -> None:
        self.enabled, self.epochs = enabled, epochs
        self._bar: tqdm | None = None

    @contextmanager
    def epoch(self, epoch: int, total_events: int, done_events: int = 0) -> Iterator[None]:
        """The bar of one epoch while the block runs. A model's batches need not add up to the
        (input, next) pairs (BPR samples every training event, DREAM drops pairs without a
        negative): a block that ends normally leaves the bar at 100 %."""
        # disable=None: no bar when stderr is not a terminal (a log file), where the epoch's
        # log line says the same once
        self._bar = tqdm(total=total_events, desc=f"epoch {epoch}/{self.epochs}", unit="ev",
                         unit_scale=True, disable=None if self.enabled else True, leave=False,
                         mininterval=1.0)
        self._bar.update(done_events)
        with self._bar:
            yield
            self._bar.total = self._bar.n
            self._bar.refresh()

    def advance(self, n_events: int) -> None:
        self._bar.update(n_events)

    def show(self, mean_loss: float, events_per_s: float) -> None:
        self._bar.set_postfix(loss=f"{mean_loss:.4f}", ev_s=f"{events_per_s:,.0f}")

    @staticmethod
    def trained(epoch: int, stats: Mapping[str, float], events: int) -> None:
        log.info("epoch %d: loss %.4f, %d events in %.1f s (%.0f events/s)", epoch,
                 stats["train_loss"], events, stats["train_epoch_seconds"],
                 stats["train_events_per_s"])

    @staticmethod
    def validated(epoch: int, val: Mapping[str, float], monitor: str, seconds: float) -> None:
        cutoff = monitor.rsplit("_", 1)[1]
        # the monitored metric first, then MRR or Recall at its cutoff (whichever it is not)
        shown = list(dict.fromkeys([monitor, f"mrr_at_{cutoff}", f"recall_at_{cutoff}"]))[:2]
        log.info("epoch %d: %s (%.1f s)", epoch,
                 ", ".join(f"val_{name} = {val[name]:.5f}" for name in shown), seconds)

    @staticmethod
    def early_stop(epoch: int, monitor: str, stopping: EarlyStopping) -> None:
        log.info("early stop after epoch %d: val_%s has not improved for %d epochs (best %.5f "
                 "at epoch %d)", epoch, monitor, stopping.stale, stopping.best_score,
                 stopping.best_epoch)


def training_pairs(data: SequenceData) -> int:
    """The (input, next) pairs of the training events: an epoch's length on its bar."""
    return int((data.train_end - data.offsets[:-1] - 1).clip(min=0).sum())


def no_stop_signal() -> str | None:
    return None


def discard_metrics(metrics: dict[str, float], step: int) -> None:
    return None


# --------------------------------------------------------------------------------- the trainer


class Trainer:
    """Fits a model with `settings` (cfg.train), monitoring the validation metric
    `settings.monitor` (train.monitor) for early stopping and the best checkpoint. `state`: the
    resumable state (None: none written); `seed`: the config's seed, of the training batches;
    `stop_requested`: the check for a stop signal (seqexp.core.stopping.StopSignals), made after
    every batch and at every epoch's start and end; `callbacks`: a caller's additions."""

    def __init__(self, evaluator: Evaluator, settings: TrainSettings, *,
                 seed: int,
                 best_checkpoint: BestCheckpoint | None = None,
                 state: ResumableState | None = None,
                 stop_requested: StopCheck = no_stop_signal,
                 callbacks: Sequence[TrainingCallback] = ()) -> None:
        self.evaluator = evaluator
        self.settings = settings
        self.monitor = self.settings.monitor
        self.seed = seed  # of the training batch generator
        self.best_checkpoint = best_checkpoint or BestCheckpoint()
        self.state = state
        self.stop_requested = stop_requested
        self.callbacks = list(callbacks)
        self.progress = ProgressLog(self.settings.progress, self.settings.epochs)
        self._compiled: dict[int, object] = {}

    def fit(self, model: Recommender, data: SequenceData,
            log_metrics: MetricsLogger = discard_metrics) -> TrainResult:
        """Fit `model` on the training events, validating on the validation events; on return
        the model holds its best state (by val_<monitor>), or without validation events the
        state after train.epochs epochs. A KeyboardInterrupt stops training and is reported as
        `interrupted` with the best state so far; a stop signal (`stop_requested`) writes the
        resumable state and raises TrainingStopped."""
        started = time.perf_counter()
        try:
            model.fit(data, self.stop_requested)
        except FitStopped as stopped:  # nothing of the fit is kept: a rerun fits again
            raise TrainingStopped(stopped.signal_name, 0, 0) from None
        if not model.trainable and type(model).fit is not Recommender.fit:
            log.info("closed-form fit in %.1f s", time.perf_counter() - started)
        has_validation = data.stats.get("val_events", 1) > 0
        if not model.trainable or self.settings.epochs == 0:
            return self._fit_without_epochs(model, data, has_validation, log_metrics)
        if not has_validation:
            log.info("no validation events: training all %d epochs, keeping the last state",
                     self.settings.epochs)
        fit = self._start(model, has_validation, log_metrics)
        try:
            while not fit.stopping.finished and fit.result.epochs_run < self.settings.epochs:
                self._run_epoch(fit, data, has_validation, log_metrics)
        except KeyboardInterrupt:
            log.warning("interrupted: keeping the best state so far (epoch %d)",
                        fit.stopping.best_epoch)
            fit.result.interrupted = True
        model.load_state_dict(fit.best_state)
        if not has_validation:
            self.best_checkpoint.save(model)
        return fit.finish()

    def _fit_without_epochs(self, model: Recommender, data: SequenceData, has_validation: bool,
                            log_metrics: MetricsLogger) -> TrainResult:
        """A model without trainable parameters (or train.epochs=0): validated once as it is."""
        result = TrainResult(best_epoch=0 if has_validation else None, best_score=None,
                             epochs_run=0)
        if has_validation:
            val, seconds = self._validate(model, data, 0)
            log_metrics(self._val_metrics(val, seconds), 0)
            result.best_score = val[self.monitor]
            result.history.append(val)
        self.best_checkpoint.save(model)
        return result

    def _start(self, model: Recommender, has_validation: bool,
               log_metrics: MetricsLogger) -> FitState:
        """A new fit, or the saved one when resuming (its state written either way)."""
        stopping = EarlyStopping(self.settings.patience, self.settings.min_delta)
        if not has_validation:
            stopping.best_score = stopping.best_epoch = None
        fit = FitState(model, self.make_optimizer(model), np.random.default_rng(self.seed),
                       stopping, copy.deepcopy(model.state_dict()), TrainResult(None, None, 0))
        saved = None if self.state is None else self.state.load()
        if saved is not None:
            self.state.restore(saved, fit, log_metrics)
        elif self.state is not None:
            self.state.write(fit)
        return fit

    def _run_epoch(self, fit: FitState, data: SequenceData, has_validation: bool,
                   log_metrics: MetricsLogger) -> None:
        """The next epoch: trained, validated, counted by early stopping, the best weights
        kept, the resumable state written, the metrics logged and the callbacks called."""
        epoch = fit.result.epochs_run + 1
        self._check_stop(epoch - 1, 0)
        resumed_batches, fit.partial = fit.partial, None
        try:
            train_stats = self.train_epoch(fit.model, data, fit.optimizer, fit.rng, epoch,
                                           **({"resume_from": resumed_batches}
                                              if resumed_batches else {}))
        except _EpochAbandoned as abandoned:
            fit.partial = abandoned.partial
            self._write_state(fit)
            raise TrainingStopped(str(self.stop_requested()), epoch - 1,
                                  abandoned.partial["batches"]) from None
        metrics, row = dict(train_stats), dict(train_stats)
        fit.result.epochs_run = epoch
        if has_validation:
            val, seconds = self._validate(fit.model, data, epoch)
            metrics |= self._val_metrics(val, seconds)
            row.update({f"val_{k}": v for k, v in val.items()})
            if fit.stopping.update(val[self.monitor], epoch):
                fit.best_state = copy.deepcopy(fit.model.state_dict())
                self.best_checkpoint.save(fit.model)
        else:
            fit.best_state = fit.model.state_dict()  # the last epoch's
        fit.result.history.append(row)
        self._write_state(fit)
        log_metrics(metrics, epoch)
        for callback in self.callbacks:
            callback.on_epoch_end(self, epoch)
        if fit.stopping.finished:
            self.progress.early_stop(epoch, self.monitor, fit.stopping)
        self._check_stop(epoch, 0)

    def _write_state(self, fit: FitState) -> None:
        if self.state is not None:
            self.state.write(fit)

    def _check_stop(self, epoch: int, batches: int) -> None:
        name = self.stop_requested()
        if name is not None:
            raise TrainingStopped(name, epoch, batches)

    def make_optimizer(self, model: Recommender) -> torch.optim.Optimizer:
        """train.optimizer over the model's parameters; the model is told whether that
        optimiser takes sparse gradients."""
        model.set_sparse_gradients(self.settings.optimizer in SPARSE_GRADIENTS)
        optimizer = OPTIMIZERS[self.settings.optimizer]
        lr, weight_decay = self.settings.lr, self.settings.weight_decay
        try:  # the fused kernel: one pass over each tensor (several times faster on a CPU)
            return optimizer(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):  # this torch or device has none
            return optimizer(model.parameters(), lr=lr, weight_decay=weight_decay)

    def _loss_function(self, model: Recommender):
        """model.training_loss, through torch.compile when asked (compiled once per model)."""
        if not self.settings.compile:
            return model.training_loss
        if id(model) not in self._compiled:
            self._compiled[id(model)] = torch.compile(model.training_loss, dynamic=True)
        return self._compiled[id(model)]

    def _uses_amp(self, device: torch.device, epoch: int) -> bool:
        why_not = amp_unavailable(device) if self.settings.amp else None
        if why_not and epoch == 1:
            log.warning("train.amp: %s; training in float32", why_not)
        return self.settings.amp and why_not is None

    def train_epoch(self, model: Recommender, data: SequenceData,
                    optimizer: torch.optim.Optimizer, rng: np.random.Generator,
                    epoch: int, max_batches: int | None = None,
                    resume_from: Mapping[str, Any] | None = None) -> dict[str, float]:
        """One pass over the training data (or its first `max_batches` batches). `resume_from`:
        the partial epoch of a training state, whose batches are regenerated (not trained on)
        before training goes on. A stop signal ends the epoch after the current batch
        (_EpochAbandoned, with the partial epoch to save)."""
        model.train()
        epoch_random = rng.bit_generator.state  # the batch generator's, at the epoch's start
        loss, started = EpochLoss(model.device, epoch), time.perf_counter()
        use_amp, loss_function = self._uses_amp(model.device, epoch), self._loss_function(model)
        batches = model.training_batches(data, self.settings.batch_size, rng)
        if resume_from is not None:
            batches = self._skip_kept_batches(batches, model, resume_from)
            loss.continue_from(resume_from)
        with self.progress.epoch(epoch, training_pairs(data), loss.events):
            for batch in batches:
                loss.add(self._step(model, optimizer, loss_function, batch, use_amp),
                         batch.n_events)
                self.progress.advance(batch.n_events)
                for callback in self.callbacks:
                    callback.on_batch_end(self, epoch, loss.steps)
                if loss.steps % REPORT_EVERY == 0:
                    elapsed = time.perf_counter() - started
                    self.progress.show(loss.mean(), loss.events / elapsed)
                if max_batches is not None and loss.steps >= max_batches:
                    break
                if self.stop_requested() is not None:
                    raise _EpochAbandoned(self._partial_epoch(model, batch, rng, epoch_random,
                                                              loss))
        mean_loss = loss.mean()  # waits for the device
        elapsed = time.perf_counter() - started
        stats = {"train_loss": mean_loss, "train_events_per_s": loss.events / max(elapsed, 1e-9),
                 "train_epoch_seconds": elapsed}
        self.progress.trained(epoch, stats, loss.events)
        return stats

    def _step(self, model: Recommender, optimizer: torch.optim.Optimizer,
              loss_function: Callable[[Any], torch.Tensor], batch: Any,
              use_amp: bool) -> torch.Tensor:
        """One optimiser step on `batch`; its loss."""
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = loss_function(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.settings.grad_clip:
            clip_gradients(model.parameters(), self.settings.grad_clip)
        optimizer.step()
        return loss

    @staticmethod
    def _partial_epoch(model: Recommender, batch: Any, rng: np.random.Generator,
                       epoch_random: Mapping[str, Any], loss: EpochLoss) -> dict[str, Any]:
        """What the resumable state keeps of an epoch stopped after `loss.steps` batches, the
        last one `batch`: the sums so far, the random states (the batch generator's as at the
        epoch's start, since its batches are drawn again) and the state carried from it."""
        states = random_states(rng)
        states["batches"] = epoch_random
        return {**loss.sums(), "random": states, "torch": states["torch"],
                "model_training_state": model.training_state(batch)}

    @staticmethod
    def _skip_kept_batches(batches: Iterator[Any], model: Recommender,
                           resume_from: Mapping[str, Any]) -> Iterator[Any]:
        """The epoch's batch generator past the batches the partial epoch trained on: they are
        drawn again from the same random state (so the rest follow as they would have), then
        the state carried after the last of them (which travels with the epoch's batches) and
        torch's random state at the stop are put back."""
        last_kept = None
        for _ in range(resume_from["batches"]):
            last_kept = next(batches, None)
        model.load_training_state(resume_from["model_training_state"], last_kept)
        torch.set_rng_state(resume_from["torch"])
        return batches

    def _validate(self, model: Recommender, data: SequenceData,
                  epoch: int) -> tuple[dict[str, float], float]:
        started = time.perf_counter()
        try:
            val = self.evaluator.evaluate(model, data, "val", self.stop_requested)
        except EvaluationStopped as stopped:
            # The state of the epoch before stays the resumable one: this epoch's training
            # is done again on resume, as it would be had the signal come a moment earlier.
            raise TrainingStopped(stopped.signal_name, max(epoch - 1, 0), 0) from None
        seconds = time.perf_counter() - started
        self.progress.validated(epoch, val, self.monitor, seconds)
        return val, seconds

    @staticmethod
    def _val_metrics(val: Mapping[str, float], seconds: float) -> dict[str, float]:
        return {f"val_{k}": v for k, v in val.items()} | {"val_seconds": seconds}
