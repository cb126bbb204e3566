"""Files and folders seqexp writes get the umask's mode (666 / 777 less the umask), as a plain
open() or mkdir would give them, not the 600 / 700 of their private temporary names."""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from helpers import compose_config, sequences, tiny_overrides
from seqexp.core.atomic import atomic_path, write_json, write_text
from seqexp.core.file_modes import current_umask, file_mode, folder_mode
from seqexp.data.cache import save_cached
from seqexp.data.download import extract_member
from seqexp.run.experiment import run_experiment

UMASKS = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700), 0o002: (0o664, 0o775)}


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", sorted(UMASKS))
def test_the_modes_follow_the_umask(mask):
    before = os.umask(0o022)
    os.umask(before)
    with umask(mask):
        assert current_umask() == mask
        assert (file_mode(), folder_mode()) == UMASKS[mask]
    assert current_umask() == before


@pytest.mark.parametrize("mask", sorted(UMASKS))
def test_atomic_writes_get_the_umasks_mode(mask, tmp_path):
    files, _ = UMASKS[mask]
    with umask(mask):
        write_text(tmp_path / "a.txt", "a")
        write_json(tmp_path / "b.json", {"b": 1})
        with atomic_path(tmp_path / "c.bin") as tmp:
            tmp.write_bytes(b"c")
        write_text(tmp_path / "a.txt", "replaced")  # a replaced file too
    for name in ("a.txt", "b.json", "c.bin"):
        assert mode(tmp_path / name) == files, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.bin"]


@pytest.mark.parametrize("mask", sorted(UMASKS))
def test_a_cache_entry_and_an_extracted_member_get_the_umasks_mode(mask, tmp_path):
    files, folders = UMASKS[mask]
    data = sequences([[0, 1, 2], [2, 1]], n_items=3)
    archive = tmp_path / "a.tar.gz"
    (tmp_path / "member.txt").write_text("x")
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "member.txt", arcname="member.txt")
    with umask(mask):
        save_cached(tmp_path / "cache" / "entry", data, {"p": 1})
        extract_member(archive, "member.txt", tmp_path / "out" / "member.txt")
    entry = tmp_path / "cache" / "entry"
    assert mode(entry) == folders
    assert {p.name: mode(p) for p in entry.iterdir()} == {
        p.name: files for p in entry.iterdir()}
    assert np.load(entry / "items.npy").tolist() == [0, 1, 2, 2, 1]
    assert mode(tmp_path / "out" / "member.txt") == files


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_a_runs_files_and_their_mlflow_copies_get_the_umasks_mode(mask, tmp_path):
    """A tiny end-to-end run: best.pt, config.yaml, metrics.json, their MLflow artifacts and
    the processed-data cache entry."""
    files, folders = UMASKS[mask]
    cfg = compose_config(["model=gru", "model.hidden_size=8", "train.epochs=1",
                          *tiny_overrides(tmp_path / "data", tmp_path / "mlflow.db")])
    with umask(mask):
        result = run_experiment(cfg, launch_dir=tmp_path, output_dir=tmp_path / "run")
    run = tmp_path / "run"
    written = [run / "checkpoints" / "best.pt", run / "config.yaml", run / "metrics.json"]
    artifacts = next((tmp_path / "mlartifacts").rglob(result.run_id)) / "artifacts"
    copies = [artifacts / "checkpoints" / "best.pt", artifacts / "config.yaml",
              artifacts / "metrics.json"]
    for path in written + copies:
        assert path.is_file() and mode(path) == files, path
    entries = [p for p in (tmp_path / "data" / "processed").iterdir() if p.is_dir()
               and (p / "meta.json").is_file()]
    assert entries
    for entry in entries:
        assert mode(entry) == folders, entry
        assert all(mode(p) == files for p in entry.iterdir()), entry


def test_a_new_mlflow_store_follows_the_umask(tmp_path):
    """Under umask 002 (a group sharing a folder) a new store is 664, where SQLite alone makes
    644: the mode comes from file_modes, read without a umask round-trip."""
    from seqexp.run.tracking import Tracker

    with umask(0o002):
        Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "x")
    assert mode(tmp_path / "mlflow.db") == 0o664
