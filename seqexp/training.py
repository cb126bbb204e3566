"""The one training loop, for every model: closed-form fit, then (for models with trainable
parameters) epochs of mini-batches with per-epoch validation, early stopping and the best
checkpoint kept. Knows models only through models.base and reports through callbacks."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from seqexp.atomic import atomic_path
from seqexp.data.sequences import SequenceData
from seqexp.errors import SeqexpError
from seqexp.evaluation import Evaluator
from seqexp.models.base import Recommender

log = logging.getLogger(__name__)

MetricsLogger = Callable[[dict[str, float], int], None]
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


def save_checkpoint(model: Recommender, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


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

    def fit(self, model: Recommender, data: SequenceData,
            log_metrics: MetricsLogger = lambda metrics, step: None) -> TrainResult:
        """Fit `model` on the training events, validating on the validation events; on return
        the model holds its best state (by val_<monitor>), or without validation events the
        state after train.epochs epochs. A KeyboardInterrupt stops training and is reported as
        `interrupted` with the best state so far."""
        started = time.perf_counter()
        model.fit(data)
        if not model.trainable and type(model).fit is not Recommender.fit:
            log.info("closed-form fit in %.1f s", time.perf_counter() - started)
        has_validation = data.stats.get("val_events", 1) > 0
        result = TrainResult(best_epoch=0 if has_validation else None,
                             best_score=-math.inf if has_validation else None, epochs_run=0)
        if not model.trainable or self.epochs == 0:
            if has_validation:
                val = self._validate(model, data, 0, log_metrics)
                result.best_score = val[self.monitor]
                result.history.append(val)
            self._save(model)
            return result
        if not has_validation:
            log.info("no validation events: training all %d epochs, keeping the last state",
                     self.epochs)

        optimizer = self.make_optimizer(model)
        rng = np.random.default_rng(self.seed)
        best_state = copy.deepcopy(model.state_dict())
        stale = 0
        try:
            for epoch in range(1, self.epochs + 1):
                train_stats = self.train_epoch(model, data, optimizer, rng, epoch)
                log_metrics(train_stats, epoch)
                row = dict(train_stats)
                result.epochs_run = epoch
                if not has_validation:
                    result.history.append(row)
                    best_state = model.state_dict()  # the last epoch's, saved after the loop
                    continue
                val = self._validate(model, data, epoch, log_metrics)
                row.update({f"val_{k}": v for k, v in val.items()})
                score = val[self.monitor]
                result.history.append(row)
                if score > result.best_score + self.min_delta:
                    result.best_score, result.best_epoch, stale = score, epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                    self._save(model)
                else:
                    stale += 1
                    if stale >= self.patience:
                        log.info("early stop after epoch %d: val_%s has not improved for %d "
                                 "epochs (best %.5f at epoch %d)", epoch, self.monitor, stale,
                                 result.best_score, result.best_epoch)
                        break
        except KeyboardInterrupt:
            log.warning("interrupted: keeping the best state so far (epoch %d)", result.best_epoch)
            result.interrupted = True
        model.load_state_dict(best_state)
        if not has_validation:
            self._save(model)
        return result

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
                    epoch: int, max_batches: int | None = None) -> dict[str, float]:
        """One pass over the training data (or its first `max_batches` batches)."""
        model.train()
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
        with bar:
            for batch in model.training_batches(data, self.batch_size, rng):
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
    def _checked_loss(total_loss: torch.Tensor, total_events: int, epoch: int) -> float:
        """Mean loss so far; a non-finite one stops training (the parameters are ruined)."""
        mean = total_loss.item() / max(total_events, 1)
        if not math.isfinite(mean):
            raise SeqexpError(f"training loss became {mean} in epoch {epoch}; lower train.lr")
        return mean

    def _validate(self, model: Recommender, data: SequenceData, epoch: int,
                  log_metrics: MetricsLogger) -> dict[str, float]:
        started = time.perf_counter()
        val = self.evaluator.evaluate(model, data, "val")
        seconds = time.perf_counter() - started
        log_metrics({f"val_{k}": v for k, v in val.items()} | {"val_seconds": seconds}, epoch)
        log.info("epoch %d: val_%s = %.5f, val_recall_at_%s = %.5f (%.1f s)", epoch,
                 self.monitor, val[self.monitor], self.monitor.rsplit("_", 1)[1],
                 val[f"recall_at_{self.monitor.rsplit('_', 1)[1]}"], seconds)
        return val

    def _save(self, model: Recommender) -> None:
        if self.checkpoint_path is not None:
            save_checkpoint(model, self.checkpoint_path)
