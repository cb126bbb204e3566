"""Processed-data cache: one folder per key, written to a temporary folder and renamed into place,
so an interrupted run never leaves a half-written entry behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from seqexp.data.sequences import SequenceData

_ARRAYS = ("items", "timestamps", "offsets", "train_end", "val_end")
_ID_ARRAYS = ("user_ids", "item_ids")


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def cache_key(source: str, params: Mapping) -> str:
    """Hash of the raw data's identity (a file digest or generator parameters) and every
    preprocessing parameter."""
    blob = json.dumps({"source": source, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_cached(folder: Path) -> SequenceData | None:
    if not (folder / "meta.json").is_file():
        return None
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {name: np.load(folder / f"{name}.npy") for name in _ARRAYS}
    ids = {name: np.load(folder / f"{name}.npy") for name in _ID_ARRAYS
           if (folder / f"{name}.npy").is_file()}
    return SequenceData(**arrays, **ids, n_items=meta["n_items"], stats=meta["stats"])


def save_cached(folder: Path, data: SequenceData, params: Mapping) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(data, name))
        for name in _ID_ARRAYS:  # fixed-width unicode: loads without pickle
            if getattr(data, name) is not None:
                np.save(tmp / f"{name}.npy", np.asarray(getattr(data, name), dtype=str))
        meta = {"n_items": data.n_items, "stats": data.stats, "params": params}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        try:
            os.rename(tmp, folder)
        except OSError:
            if (folder / "meta.json").is_file():  # lost a race: another run wrote it
                return
            # A folder without meta.json is not an entry (a foreign or pre-atomic leftover).
            shutil.rmtree(folder)
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
