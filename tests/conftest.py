"""Fixtures shared by the tracking tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

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
