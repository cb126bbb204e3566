"""The one training loop, for every model: closed-form fit, then (for models with trainable
parameters) epochs of mini-batches with per-epoch validation, early stopping and the best
checkpoint kept. Knows models only through models.base and reports through callbacks.

The resumable training state (`state_path`, checkpoints/last.pt) is written atomically after
every epoch, and after the batch at which a stop signal arrived: model and optimizer, the epochs
done, the best state and score, the early-stopping counter, the history, every random state
(torch, numpy, Python and the training batch generator's) and the model's own carried state.
A Trainer with `resume=True` continues from it, batch for batch as if never stopped."""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from seqexp.core.atomic import atomic_path
from seqexp.core.checkpoint import read_checkpoint, save_checkpoint
from seqexp.core.errors import SeqexpError
from seqexp.core.stopping import TrainingStopped
from seqexp.data.sequences import SequenceData
from seqexp.engine.evaluator import Evaluator
from seqexp.models.base import Recommender

log = logging.getLogger(__name__)

MetricsLogger = Callable[[dict[str, float], int], None]
# Returns the name of a stop signal that has arrived (SIGTERM, ...), else None.
StopCheck = Callable[[], str | None]
REPORT_EVERY = 20  # steps between reads of the running loss (progress bar, NaN check)

# train.optimizer: plain SGD and Adagrad alongside Adam, for models whose published learning
# rate was set for them (e.g. BPR-style factorisation).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
}


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
# Test hook (tests/test_resume.py): after writing the state of this epoch the process says so on
# stderr and waits until a stop signal arrives, so that a test can SIGKILL or SIGTERM it there.
HOLD_ENV = "SEQEXP_TEST_HOLD_AFTER_EPOCH"
# Test hook: after writing the state of epoch N the process sends itself signal S ("N:USR2"),
# what a SLURM time limit does through submitit (tests/test_resume.py, the requeue path).
SIGNAL_ENV = "SEQEXP_TEST_SIGNAL_AFTER_EPOCH"


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


@dataclass
class _Progress:
    """Where training stands besides the model and the optimizer: the best state, the
    early-stopping counter, whether training is over, and a partial epoch to continue."""

    best_state: dict[str, torch.Tensor]
    stale: int = 0
    finished: bool = False  # early-stopped: a resumed run trains no further
    partial: dict[str, Any] | None = None

    def update(self, score: float, epoch: int, model: Recommender, result: TrainResult,
               trainer: Trainer) -> None:
        if score > result.best_score + trainer.min_delta:
            result.best_score, result.best_epoch, self.stale = score, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
            trainer._save(model)
        else:
            self.stale += 1
            self.finished = self.stale >= trainer.patience

    def restore(self, saved: Mapping[str, Any], model: Recommender,
                optimizer: torch.optim.Optimizer, rng: np.random.Generator,
                result: TrainResult) -> None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        restore_random_states(saved["random"], rng)
        model.load_training_state(saved["model_training_state"])
        best = saved["best_state"]
        self.best_state = copy.deepcopy(model.state_dict()) if best is None else best
        result.best_score, result.best_epoch = saved["best_score"], saved["best_epoch"]
        result.epochs_run, result.history = saved["epoch"], list(saved["history"])
        self.stale, self.finished = saved["stale"], saved["finished"]
        self.partial = saved["partial"]
        kept = (f" and {self.partial['batches']} batch(es) of epoch {result.epochs_run + 1}"
                if self.partial else "")
        log.info("resuming after epoch %d%s", result.epochs_run, kept)


class Trainer:
    def __init__(
        self,
        evaluator: Evaluator,
        epochs: int = 10,
        batch_size: int = 1000,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        grad_clip: float | None = 5.0,
        patience: int = 3,
        min_delta: float = 0.0,
        monitor_cutoff: int = 20,
        progress: bool = True,
        seed: int = 0,
        checkpoint_path: Path | None = None,
        amp: bool = False,
        compile: bool = False,
        state_path: Path | None = None,
        resume: bool = False,
        checkpoint_contents: Mapping[str, Any] | None = None,
        stop_requested: StopCheck = lambda: None,
    ) -> None:
        self.evaluator = evaluator
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer = optimizer  # a key of OPTIMIZERS (experiment.validate checks it)
        self.grad_clip = grad_clip
        self.patience = patience
        self.min_delta = min_delta
        self.monitor = f"mrr_at_{monitor_cutoff}"
        self.progress = progress
        self.seed = seed
        self.checkpoint_path = checkpoint_path
        self.amp = amp  # bf16 autocast of the training forward pass (see amp_unavailable)
        self.compile = compile
        self._compiled: dict[int, object] = {}
        self.state_path = state_path  # the resumable state (checkpoints/last.pt)
        self.resume = resume  # continue from state_path when it exists
        self.checkpoint_contents = checkpoint_contents  # saved beside the best weights
        self.stop_requested = stop_requested
        # Epochs whose metrics the tracker has (a resumed run): the others of the saved history
        # are logged again, in case the process died between writing the state and logging.
        self.logged_epochs: set[int] | None = None

    def fit(self, model: Recommender, data: SequenceData,
            log_metrics: MetricsLogger = lambda metrics, step: None) -> TrainResult:
        """Fit `model` on the training events, validating on the validation events; on return
        the model holds its best state (by val_<monitor>), or without validation events the
        state after train.epochs epochs. A KeyboardInterrupt stops training and is reported as
        `interrupted` with the best state so far; a stop signal (`stop_requested`) writes the
        resumable state and raises TrainingStopped."""
        started = time.perf_counter()
        model.fit(data)
        if not model.trainable and type(model).fit is not Recommender.fit:
            log.info("closed-form fit in %.1f s", time.perf_counter() - started)
        has_validation = data.stats.get("val_events", 1) > 0
        result = TrainResult(best_epoch=0 if has_validation else None,
                             best_score=-math.inf if has_validation else None, epochs_run=0)
        if not model.trainable or self.epochs == 0:
            if has_validation:
                val, seconds = self._validate(model, data, 0)
                log_metrics(self._val_metrics(val, seconds), 0)
                result.best_score = val[self.monitor]
                result.history.append(val)
            self._save(model)
            return result
        if not has_validation:
            log.info("no validation events: training all %d epochs, keeping the last state",
                     self.epochs)

        optimizer = self.make_optimizer(model)
        rng = np.random.default_rng(self.seed)
        progress = _Progress(best_state=copy.deepcopy(model.state_dict()))
        saved = self._load_state() if self.resume else None
        if saved is not None:
            progress.restore(saved, model, optimizer, rng, result)
            self._log_missing(result.history, log_metrics)
        else:
            self._write_state(model, optimizer, rng, result, progress)
        try:
            epoch = result.epochs_run
            while not progress.finished and epoch < self.epochs:
                epoch += 1
                self._check_stop(result.epochs_run, 0)
                resumed_batches, progress.partial = progress.partial, None
                try:
                    train_stats = self.train_epoch(model, data, optimizer, rng, epoch,
                                                   **({"resume_from": resumed_batches}
                                                      if resumed_batches else {}))
                except _EpochAbandoned as abandoned:
                    progress.partial = abandoned.partial
                    self._write_state(model, optimizer, rng, result, progress)
                    raise TrainingStopped(str(self.stop_requested()), result.epochs_run,
                                          abandoned.partial["batches"]) from None
                metrics, row = dict(train_stats), dict(train_stats)
                result.epochs_run = epoch
                if has_validation:
                    val, seconds = self._validate(model, data, epoch)
                    metrics |= self._val_metrics(val, seconds)
                    row.update({f"val_{k}": v for k, v in val.items()})
                    progress.update(val[self.monitor], epoch, model, result, self)
                else:
                    progress.best_state = model.state_dict()  # the last epoch's
                result.history.append(row)
                self._write_state(model, optimizer, rng, result, progress)
                log_metrics(metrics, epoch)
                self._test_hooks(epoch)
                if progress.finished:
                    log.info("early stop after epoch %d: val_%s has not improved for %d "
                             "epochs (best %.5f at epoch %d)", epoch, self.monitor,
                             progress.stale, result.best_score, result.best_epoch)
                self._check_stop(epoch, 0)
        except KeyboardInterrupt:
            log.warning("interrupted: keeping the best state so far (epoch %d)", result.best_epoch)
            result.interrupted = True
        model.load_state_dict(progress.best_state)
        if not has_validation:
            self._save(model)
        return result

    def _check_stop(self, epoch: int, batches: int) -> None:
        name = self.stop_requested()
        if name is not None:
            raise TrainingStopped(name, epoch, batches)

    def _test_hooks(self, epoch: int) -> None:
        """The test-only hooks HOLD_ENV and SIGNAL_ENV (inert unless set)."""
        hold = os.environ.get(HOLD_ENV)
        if hold and int(hold) == epoch:
            print(f"seqexp-test: holding after epoch {epoch}", file=sys.stderr, flush=True)
            while self.stop_requested() is None:
                time.sleep(0.02)
        send = os.environ.get(SIGNAL_ENV)
        if send and int(send.split(":")[0]) == epoch:
            import signal

            os.kill(os.getpid(), getattr(signal, f"SIG{send.split(':')[1]}"))
            time.sleep(0.1)  # the handler runs before the next bytecode; be sure it has

    def _load_state(self) -> dict[str, Any] | None:
        if self.state_path is None or not self.state_path.is_file():
            return None
        state = read_checkpoint(self.state_path)
        if state.get("format") != STATE_FORMAT:
            raise SeqexpError(f"{self.state_path}: not a seqexp training state of this version "
                              f"(format {state.get('format')!r}, expected {STATE_FORMAT})")
        return state

    def _write_state(self, model: Recommender, optimizer: torch.optim.Optimizer,
                     rng: np.random.Generator, result: TrainResult,
                     progress: _Progress) -> None:
        if self.state_path is None:
            return
        partial = progress.partial
        best_is_current = result.best_epoch == result.epochs_run and partial is None
        state = {
            "format": STATE_FORMAT,
            "epoch": result.epochs_run,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "model_training_state": model.training_state(),
            # the current weights are the best ones in the common case: not stored twice
            "best_state": None if best_is_current else progress.best_state,
            "best_score": result.best_score,
            "best_epoch": result.best_epoch,
            "stale": progress.stale,
            "finished": progress.finished,
            "history": result.history,
            # a partial epoch: its batch generator restarts from the epoch's first random state
            "random": random_states(rng) if partial is None else partial["random"],
            "partial": None if partial is None else {
                k: v for k, v in partial.items() if k != "random"},
        }
        with atomic_path(self.state_path) as tmp:
            torch.save(state, tmp)

    def _log_missing(self, history: list[dict[str, float]], log_metrics: MetricsLogger) -> None:
        if self.logged_epochs is None:
            return
        for epoch, row in enumerate(history, start=1):
            if epoch not in self.logged_epochs:
                log_metrics(row, epoch)

    def make_optimizer(self, model: Recommender) -> torch.optim.Optimizer:
        optimizer = OPTIMIZERS[self.optimizer]
        try:  # the fused kernel: one pass over each tensor (several times faster on a CPU)
            return optimizer(model.parameters(), lr=self.lr, weight_decay=self.weight_decay,
                             fused=True)
        except (RuntimeError, TypeError, ValueError):  # this torch or device has none
            return optimizer(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def _loss_function(self, model: Recommender):
        """model.training_loss, through torch.compile when asked (compiled once per model)."""
        if not self.compile:
            return model.training_loss
        if id(model) not in self._compiled:
            self._compiled[id(model)] = torch.compile(model.training_loss, dynamic=True)
        return self._compiled[id(model)]

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
        total_events, steps = 0, 0
        # The loss is summed on the device and read back only every REPORT_EVERY steps: a read
        # per step would make the host wait for the GPU at every batch.
        total_loss = torch.zeros((), dtype=torch.float64, device=model.device)
        started = time.perf_counter()
        pairs = (data.train_end - data.offsets[:-1] - 1).clip(min=0)  # (input, next) pairs
        n_train = int(pairs.sum())
        bar = tqdm(total=n_train, desc=f"epoch {epoch}/{self.epochs}", unit="ev",
                   unit_scale=True, disable=not self.progress, leave=False, mininterval=1.0)
        device = model.device
        why_not = amp_unavailable(device) if self.amp else None
        use_amp = self.amp and why_not is None
        if why_not and epoch == 1:
            log.warning("train.amp: %s; training in float32", why_not)
        loss_function = self._loss_function(model)
        batches = model.training_batches(data, self.batch_size, rng)
        if resume_from is not None:
            batches = self._skip_kept_batches(batches, model, resume_from)
            steps, total_events = resume_from["batches"], resume_from["events"]
            total_loss += resume_from["loss"].to(device)
            bar.update(total_events)
        with bar:
            for batch in batches:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss = loss_function(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
                optimizer.step()
                total_loss += loss.detach().double() * batch.n_events
                total_events += batch.n_events
                steps += 1
                bar.update(batch.n_events)
                if steps % REPORT_EVERY == 0:
                    mean_loss = self._checked_loss(total_loss, total_events, epoch)
                    elapsed = time.perf_counter() - started
                    bar.set_postfix(loss=f"{mean_loss:.4f}",
                                    ev_s=f"{total_events / elapsed:,.0f}")
                if max_batches is not None and steps >= max_batches:
                    break
                if self.stop_requested() is not None:
                    states = random_states(rng)
                    states["batches"] = epoch_random
                    raise _EpochAbandoned({
                        "batches": steps, "events": total_events, "loss": total_loss.cpu(),
                        "random": states, "torch": states["torch"],
                        "model_training_state": model.training_state(),
                    })
            # A model's batches need not add up to the (input, next) pairs (BPR samples every
            # training event, DREAM drops pairs without a negative): the bar ends at 100 %.
            bar.total = bar.n
            bar.refresh()
        mean_loss = self._checked_loss(total_loss, total_events, epoch)  # waits for the device
        elapsed = time.perf_counter() - started
        stats = {
            "train_loss": mean_loss,
            "train_events_per_s": total_events / max(elapsed, 1e-9),
            "train_epoch_seconds": elapsed,
        }
        log.info("epoch %d: loss %.4f, %d events in %.1f s (%.0f events/s)", epoch,
                 stats["train_loss"], total_events, elapsed, stats["train_events_per_s"])
        return stats

    @staticmethod
    def _skip_kept_batches(batches: Iterator[Any], model: Recommender,
                           resume_from: Mapping[str, Any]) -> Iterator[Any]:
        """The epoch's batch generator past the batches the partial epoch trained on: they are
        drawn again from the same random state (so the rest follow as they would have), then
        the model's carried state and torch's random state at the stop are put back."""
        for _ in range(resume_from["batches"]):
            next(batches, None)
        model.load_training_state(resume_from["model_training_state"])
        torch.set_rng_state(resume_from["torch"])
        return batches

    @staticmethod
    def _checked_loss(total_loss: torch.Tensor, total_events: int, epoch: int) -> float:
        """Mean loss so far; a non-finite one stops training (the parameters are ruined)."""
        mean = total_loss.item() / max(total_events, 1)
        if not math.isfinite(mean):
            raise SeqexpError(f"training loss became {mean} in epoch {epoch}; lower train.lr")
        return mean

    def _validate(self, model: Recommender, data: SequenceData,
                  epoch: int) -> tuple[dict[str, float], float]:
        started = time.perf_counter()
        val = self.evaluator.evaluate(model, data, "val")
        seconds = time.perf_counter() - started
        log.info("epoch %d: val_%s = %.5f, val_recall_at_%s = %.5f (%.1f s)", epoch,
                 self.monitor, val[self.monitor], self.monitor.rsplit("_", 1)[1],
                 val[f"recall_at_{self.monitor.rsplit('_', 1)[1]}"], seconds)
        return val, seconds

    @staticmethod
    def _val_metrics(val: Mapping[str, float], seconds: float) -> dict[str, float]:
        return {f"val_{k}": v for k, v in val.items()} | {"val_seconds": seconds}

    def _save(self, model: Recommender) -> None:
        if self.checkpoint_path is not None:
            save_checkpoint(model, self.checkpoint_path, self.checkpoint_contents)
