"""Fixtures shared by the tracking tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from seqexp.tracking import Tracker


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
