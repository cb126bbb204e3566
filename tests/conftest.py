"""Fixtures shared by the tracking tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from seqexp.models import cpu_kernels
from seqexp.run.tracking import Tracker


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A SQLite MLflow store with its schema: MLflow takes seconds to create one, a copy is
    instant."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    Tracker(f"sqlite:///{db}", None)
    return db


@pytest.fixture
def store_uri(tmp_path, empty_store) -> str:
    """A fresh SQLite tracking URI in tmp_path, schema already made."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on busy cores the threads wait for
    each other (test_learning.py at a load average of about 10 on 2 cores: 132 s with 2
    threads, 29 s with 1); torch's setting is put back after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[True, False], ids=["cpu_kernels", "shared_path"])
def cpu_kernels_switch(request, monkeypatch) -> bool:
    """The test once with every CPU kernel (train.cpu_kernels=true) and once with none: the
    code path CUDA takes, run on the CPU."""
    monkeypatch.setattr(cpu_kernels, "_enabled", set(cpu_kernels.KERNELS) if request.param
                        else set())
    return request.param
