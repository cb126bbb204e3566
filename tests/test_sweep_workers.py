"""A SIGKILLed parallel sweep leaves no process behind: its joblib (loky) workers notice that
the sweep's main process is gone, end their runs as SIGTERM would, and exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
HOOKED_PATH = os.pathsep.join(str(p) for p in (ROOT, ROOT / "tests" / "subprocess_hooks",
                                               ROOT / "tests"))


def _group(pgid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


@pytest.mark.slow  # a joblib sweep of two worker processes
def test_a_sigkilled_joblib_sweep_leaves_no_process_behind(tmp_path):
    env = dict(os.environ, SEQEXP_TEST_HOLD_AFTER_EPOCH="1", PYTHONPATH=HOOKED_PATH,
               OMP_NUM_THREADS="1")
    sweep = subprocess.Popen(
        [sys.executable, "-m", "seqexp.apps.cli", "-m", "hydra/launcher=joblib",
         "hydra.launcher.n_jobs=2", "model=gru", "model.hidden_size=8", "seed=1,2",
         *tiny_overrides(tmp_path / "data", tmp_path / "mlflow.db"), "train.epochs=3"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    held, lines = 0, []
    for line in sweep.stderr:
        lines.append(line)
        held += "seqexp-test: holding after epoch 1" in line
        if held == 2:
            break
    assert held == 2, "".join(lines[-30:])
    assert len(_group(sweep.pid)) >= 3  # the main process and its two workers
    sweep.send_signal(signal.SIGKILL)
    sweep.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _group(sweep.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [(p.pid, " ".join(p.cmdline())[:120]) for p in _group(sweep.pid)]
    for process in _group(sweep.pid):
        process.kill()
    assert left == []
