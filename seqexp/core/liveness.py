"""Whether the process that wrote something is still running: the host, pid and start time a
writer records (in a temporary folder's name, in an MLflow run's tags), and the check a later
process makes. A pid alone is not enough, since the system reuses pids: the start time tells a
new process under an old pid from the old one."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from functools import cache
from pathlib import Path


@cache
def host() -> str:
    return socket.gethostname() or "unknown-host"


def start_time(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), None where the
    process does not exist or the system does not tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) is in parentheses and may hold spaces.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def identity() -> dict[str, str]:
    """This process: {host, pid, pid_start} ("" where the start time is unknown)."""
    return {"host": host(), "pid": str(os.getpid()),
            "pid_start": start_time(os.getpid()) or ""}


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def is_gone(writer_host: str, pid: str | int, pid_start: str = "") -> bool:
    """True when the writer ran on this host and its process has ended (its pid is free, or now
    belongs to a process started at another time). False when it may still run, and for other
    hosts, whose processes cannot be seen from here."""
    if writer_host != host():
        return False
    try:
        number = int(pid)
    except (TypeError, ValueError):
        return False
    if number <= 0:
        return False
    if not _exists(number):
        return True
    if pid_start:
        now = start_time(number)
        return now is not None and now != pid_start
    return False


# Set by a multirun's main process (seqexp.run.sweep) for the workers it starts (joblib's loky
# processes), which otherwise outlive a SIGKILLed sweep for minutes, each holding a model.
SWEEP_PID_ENV = "SEQEXP_SWEEP_PID"
_watching: list[int] = []


def end_with_sweep(poll_s: float = 0.5, grace_s: float = 3.0) -> None:
    """In a worker process that a sweep's main process started: once that process is gone
    (this one is handed to init), stop as SIGTERM stops a run (its MLflow run KILLED, its state
    saved), and leave after `grace_s` whatever it is doing. Elsewhere (a sequential sweep runs
    its jobs in the main process; a cluster's jobs have other parents) nothing is watched."""
    parent = os.getppid()
    if os.environ.get(SWEEP_PID_ENV) != str(parent) or _watching:
        return
    _watching.append(parent)
    threading.Thread(target=_watch, args=(parent, poll_s, grace_s), daemon=True,
                     name="seqexp-sweep-watch").start()


def _watch(parent: int, poll_s: float, grace_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os._exit(128 + signal.SIGTERM)
