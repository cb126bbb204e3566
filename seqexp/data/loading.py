"""From a dataset + split configuration to cached SequenceData: resolve or download the raw file,
parse it with the reader of its format, preprocess, and cache the result."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from seqexp.core.errors import SeqexpError
from seqexp.data.cache import (
    cache_key,
    file_digest,
    known_digest,
    load_cached,
    remember_digest,
    save_cached,
)
from seqexp.data.interactions import Interactions
from seqexp.data.lastfm import read_lastfm
from seqexp.data.movielens import read_movielens
from seqexp.data.preprocess import PREPROCESS_VERSION, build_sequences
from seqexp.data.raw_files import resolve_raw_file
from seqexp.data.sequences import SequenceData
from seqexp.data.synthetic import generate_synthetic
from seqexp.data.tabular import read_table

log = logging.getLogger(__name__)

# Keys of a dataset config that select the data or shape its preprocessing; the rest (where the
# file lives, where it is downloaded from) does not change the result and stays out of the key.
_LOCATION_KEYS = {"path", "url", "archive_member", "archive_size", "archive_md5", "name",
                  "verify"}

Reader = Callable[[Path, Mapping], Interactions]
# Each reader gets its format's keys from the dataset config (conf/dataset/*.yaml holds their
# values, the schema their rules: a config that reaches here has them all, checked).
READERS: dict[str, Reader] = {
    "movielens": lambda path, cfg: read_movielens(path, cfg["layout"]),
    "lastfm": lambda path, cfg: read_lastfm(path, item=cfg["item"]),
    "tabular": lambda path, cfg: read_table(
        path, **{key: cfg[key] for key in ("user_col", "item_col", "time_col", "sep")}),
}
# The generator's settings: its keyword arguments, each a key of conf/dataset/synthetic.yaml.
SYNTHETIC_KEYS = tuple(inspect.signature(generate_synthetic).parameters)


def load_dataset(dataset: Mapping, split: Mapping, raw_dir: Path, cache_dir: Path,
                 progress: bool = True) -> SequenceData:
    """The processed dataset for these settings, from the cache when it holds it."""
    dataset = dict(dataset)
    fmt = dataset.get("format")
    params = cache_params(dataset, split)
    remember = False  # a digest computed now, kept once the data is cached
    version: dict = {}  # the raw file's size, mtime and inode when its digest was looked up
    if fmt == "synthetic":
        source = "synthetic"
        raw_path = None
    elif fmt in READERS:
        raw_path = resolve_raw_file(dataset, Path(raw_dir), progress)
        source, version = known_digest(raw_path, Path(cache_dir))
        if source is None:
            source = file_digest(raw_path)
            remember = True
    else:
        raise SeqexpError(
            f"dataset.format={fmt!r} is unknown; choose one of synthetic, {', '.join(READERS)}"
        )
    folder = Path(cache_dir) / f"{dataset['name']}-{cache_key(source, params)}"
    data = load_cached(folder)
    if data is not None:
        log.info("loaded processed %s from cache %s", dataset.get("name"), folder)
    else:
        data = _preprocess(dataset, split, raw_path, folder, params, source)
    if raw_path is not None:  # which file a run used (logged as the param data.sha256)
        data.stats["sha256"] = source
    if remember:
        remember_digest(raw_path, Path(cache_dir), source, version)
    return data


def cache_params(dataset: Mapping, split: Mapping) -> dict:
    """The parameters of the cache key besides the raw data's identity: every dataset key that
    is not a location, the split, and the preprocessing version. A run's MLflow datasets are
    fingerprinted from the same (seqexp.run.datasets): they change exactly when the cache does."""
    return {
        "dataset": {k: v for k, v in dict(dataset).items() if k not in _LOCATION_KEYS},
        "split": dict(split),
        "version": PREPROCESS_VERSION,
    }


def data_source(stats: Mapping) -> str:
    """The raw data's identity in the cache key: the raw file's SHA-256 (the stat `sha256`,
    set by load_dataset), or "synthetic" for generated data (whose settings are in
    cache_params)."""
    return str(stats.get("sha256", "synthetic"))


def _preprocess(dataset: Mapping, split: Mapping, raw_path: Path | None, folder: Path,
                params: Mapping, source: str) -> SequenceData:
    fmt = dataset.get("format")
    started = time.perf_counter()
    if raw_path is None:
        raw = generate_synthetic(**{key: dataset[key] for key in SYNTHETIC_KEYS})
    else:
        log.info("parsing %s", raw_path)
        raw = READERS[fmt](raw_path, dataset)
    data = build_sequences(
        raw, split, min_item_support=dataset["min_item_support"],
        drop_repeats=dataset["drop_repeats"], name=str(dataset["name"]),
    )
    if raw_path is not None:  # kept with the entry: its stats are those of the run
        data.stats["sha256"] = source
    save_cached(folder, data, params)
    log.info("preprocessed in %.1f s, cached in %s", time.perf_counter() - started, folder)
    return data

