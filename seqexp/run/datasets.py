"""A run's training, validation and test data as MLflow dataset inputs: what the UI's Datasets
column shows and what tells two runs on the same data from two runs on different data.

Each split is one dataset named by the preset (`dataset.name`). Its digest is a hash of the
cache key's inputs (the raw file's SHA-256, or for generated data the generator's settings; the
preprocessing and split parameters; the preprocessing version) and of the split, so it changes
exactly when the processed data do: MLflow keeps one dataset per name and digest, so the three
splits of one run need three digests."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from seqexp.data.cache import cache_key
from seqexp.data.loading import SYNTHETIC_KEYS, cache_params, data_source, resolve_raw_file
from seqexp.data.sequences import SequenceData
from seqexp.run.tracking import SplitDataset

# seqexp's phases and the mlflow.data.context values the MLflow UI shows for them.
CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


def split_counts(data: SequenceData, phase: str) -> dict[str, int]:
    """Events of the phase, users with at least one of them, and distinct items among them."""
    start, end = data.phase_bounds(phase)
    per_user = end - start
    user_start = np.repeat(start, np.diff(data.offsets))
    user_end = np.repeat(end, np.diff(data.offsets))
    positions = np.arange(data.n_events, dtype=np.int64)
    in_phase = (positions >= user_start) & (positions < user_end)
    items = np.bincount(data.items[in_phase], minlength=data.n_items)
    return {"events": int(per_user.sum()), "users": int((per_user > 0).sum()),
            "items": int((items > 0).sum())}


def split_digest(key: str, phase: str) -> str:
    """Ten hex digits, MLflow's recommended digest length."""
    return hashlib.sha256(f"{key}:{phase}".encode()).hexdigest()[:10]


def split_datasets(dataset: Mapping, split: Mapping, raw_dir: Path,
                   data: SequenceData) -> list[SplitDataset]:
    """The train, validation and test inputs of a run on `data`, loaded by load_dataset from
    these dataset and split configs (so its raw file, if any, is already on disk)."""
    dataset = dict(dataset)
    key = cache_key(data_source(data.stats), cache_params(dataset, split))
    name = str(dataset["name"])
    if dataset.get("format") == "synthetic":
        source_file, generator = None, {k: dataset[k] for k in SYNTHETIC_KEYS if k in dataset}
    else:
        source_file = resolve_raw_file(dataset, Path(raw_dir), progress=False).resolve()
        generator = {}
    # The cache key is shared by the splits: the cache folder is <name>-<cache_key>.
    shared = {"cache_key": key} | ({"sha256": data.stats["sha256"]}
                                   if "sha256" in data.stats else {})
    return [SplitDataset(context=context, name=name, digest=split_digest(key, phase),
                         source_file=source_file, generator=generator,
                         profile=split_counts(data, phase) | shared)
            for phase, context in CONTEXTS.items()]
