"""Stop signals: SIGTERM (what SLURM sends before it kills a job, and `kill`'s default) and the
signal a launcher uses for a time limit (submitit: SIGUSR2, with its own Python handler that
requeues the job) stop training cleanly. While `StopSignals` is active they only set a flag;
the training loop reads it after every batch, writes the resumable state and stops. Afterwards
`pass_on` hands a launcher's signal to the launcher's own handler, so submitit still requeues."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

# SIGTERM always; the user signals only where a launcher installed a Python handler for them.
_LAUNCHER_SIGNALS = ("SIGUSR1", "SIGUSR2")


class TrainingStopped(Exception):
    """A stop signal ended training; the resumable state is on disk. `epoch` epochs are done and
    `batches` batches of the next one are kept in the state."""

    def __init__(self, signal_name: str, epoch: int, batches: int) -> None:
        kept = (f" and {batches} batch{'es' if batches > 1 else ''} of epoch {epoch + 1}"
                if batches else "")
        super().__init__(f"stopped by {signal_name} after epoch {epoch}{kept}")
        self.signal_name = signal_name
        self.epoch = epoch
        self.batches = batches


class EvaluationStopped(Exception):
    """A stop signal arrived while a model was being evaluated; raised after the current batch
    of prediction points, so that a stop never waits for a whole validation or test pass."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} during an evaluation")
        self.signal_name = signal_name


def exit_code(signal_name: str) -> int:
    """The shell's code for a process ended by `signal_name`: 128 + its number (SIGTERM 143)."""
    return 128 + int(getattr(signal, signal_name, signal.SIGTERM))


class StopSignals:
    """Context manager; calling it returns the name of the first stop signal received, or None.
    Outside the main thread (where Python cannot install handlers) it never reports one."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> str | None:
        return self.received

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in ("SIGTERM", *_LAUNCHER_SIGNALS):
            number = getattr(signal, name, None)
            if number is None:
                continue
            previous = signal.getsignal(number)
            if name == "SIGTERM" or callable(previous):
                self._previous[number] = previous
                signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name
            log.warning("%s received: stopping after the current batch, with the training "
                        "state saved", self.received)

    def previous_handler(self) -> Callable[[int, FrameType | None], Any] | None:
        """The handler the received signal had before (a launcher's), if it was a Python one."""
        if self.received is None:
            return None
        previous = self._previous.get(int(getattr(signal, self.received)))
        return previous if callable(previous) else None

    def pass_on(self) -> None:
        """Run the launcher's handler of the received signal (submitit: checkpoint the job,
        requeue it and exit), if there was one."""
        handler = self.previous_handler()
        if handler is not None:
            handler(int(getattr(signal, str(self.received))), None)


class FitStopped(Exception):
    """A stop signal arrived during a model's closed-form fit (between two of its blocks);
    nothing of the fit is kept: a rerun or resume fits again."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} during the fit")
        self.signal_name = signal_name
