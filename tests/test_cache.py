"""The processed-data cache behind load_dataset: hits, keys, atomic writes, missing files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import fixtures_raw as fx
from helpers import split_preset
from seqexp.core.errors import SeqexpError
from seqexp.core.resources import config_dir
from seqexp.data import cache, loading
from seqexp.data.loading import load_dataset
from seqexp.data.sequences import SequenceData

USER_TAIL = split_preset()


def ml_config(path: Path | None, **overrides) -> dict:
    """conf/dataset/ml10m.yaml with a local file."""
    config = OmegaConf.to_container(OmegaConf.load(config_dir() / "dataset" / "ml10m.yaml"))
    return config | {"path": None if path is None else str(path)} | overrides


def entries(folder: Path) -> list[str]:
    """Everything in the cache folder, hidden temporary folders included (not the raw files'
    digests, which are not entries)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".digests"
                  ) if folder.exists() else []


def assert_same(a: SequenceData, b: SequenceData) -> None:
    for name in ("items", "timestamps", "offsets", "train_end", "val_end", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(a, name).dtype == getattr(b, name).dtype
    assert a.n_items == b.n_items
    assert a.stats == b.stats


class Calls:
    """Counts reader calls through loading.READERS."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fmt: str = "movielens") -> None:
        self.count = 0
        real = loading.READERS[fmt]

        def counted(path, cfg):
            self.count += 1
            return real(path, cfg)

        monkeypatch.setitem(loading.READERS, fmt, counted)


def _boom(*args, **kwargs):
    raise AssertionError("the raw file was parsed again instead of read from the cache")


@pytest.fixture
def ml_file(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return fx.write_movielens(folder)


def test_second_load_reads_the_cache(tmp_path: Path, ml_file: Path, monkeypatch) -> None:
    cache_dir = tmp_path / "cache"
    first = load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    assert first.n_events == fx.ML_N_ROWS and first.n_users == 3
    (entry,) = entries(cache_dir)
    assert entry.startswith("ml10m-")
    assert sorted(p.name for p in (cache_dir / entry).iterdir()) == [
        "item_ids.npy", "items.npy", "meta.json", "offsets.npy", "timestamps.npy",
        "train_end.npy", "user_ids.npy", "val_end.npy",
    ]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (cache_dir / entry).iterdir()}

    monkeypatch.setitem(loading.READERS, "movielens", _boom)
    monkeypatch.setattr(loading, "build_sequences", _boom)
    second = load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    assert_same(first, second)
    assert entries(cache_dir) == [entry]
    assert {p.name: p.stat().st_mtime_ns for p in (cache_dir / entry).iterdir()} == mtimes


def test_location_keys_do_not_change_the_key(tmp_path: Path, ml_file: Path, monkeypatch):
    cache_dir = tmp_path / "cache"
    first = load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    # The same bytes elsewhere, another download URL: still the same processed data.
    copy = tmp_path / "elsewhere" / "ratings-copy.dat"
    copy.parent.mkdir()
    copy.write_bytes(ml_file.read_bytes())
    monkeypatch.setitem(loading.READERS, "movielens", _boom)
    second = load_dataset(ml_config(copy, url="https://example.invalid/ml.zip"), USER_TAIL,
                          tmp_path / "raw", cache_dir)
    assert_same(first, second)
    assert len(entries(cache_dir)) == 1


@pytest.mark.parametrize(
    "dataset_change,split_change",
    [
        ({"min_item_support": 2}, {}),
        ({"drop_repeats": True}, {}),
        ({}, {"test_frac": 0.4}),
        ({}, {"val_frac": 0.0}),
        ({}, {"name": "global_time", "test_quantile": 0.8, "val_quantile": 0.9}),
    ],
)
def test_changed_parameter_makes_a_new_key(
    tmp_path: Path, ml_file: Path, monkeypatch, dataset_change: dict, split_change: dict
) -> None:
    cache_dir = tmp_path / "cache"
    calls = Calls(monkeypatch)
    load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    split = {k: v for k, v in USER_TAIL.items() if "name" not in split_change}
    split.update(split_change)
    load_dataset(ml_config(ml_file, **dataset_change), split, tmp_path / "raw", cache_dir)
    assert calls.count == 2
    assert len(entries(cache_dir)) == 2
    # ...and each setting finds its own entry afterwards.
    load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    load_dataset(ml_config(ml_file, **dataset_change), split, tmp_path / "raw", cache_dir)
    assert calls.count == 2


def test_preprocess_version_is_part_of_the_key(tmp_path: Path, ml_file: Path, monkeypatch):
    cache_dir = tmp_path / "cache"
    load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    monkeypatch.setattr(loading, "PREPROCESS_VERSION", loading.PREPROCESS_VERSION + 1)
    load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    assert len(entries(cache_dir)) == 2


def test_changed_raw_content_makes_a_new_key(tmp_path: Path, ml_file: Path, monkeypatch):
    cache_dir = tmp_path / "cache"
    calls = Calls(monkeypatch)
    first = load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    fx.write_movielens(ml_file.parent, lines=fx.ML_LINES + ["3::106::4::800"])
    second = load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    assert calls.count == 2
    assert len(entries(cache_dir)) == 2
    assert first.n_events == 17 and second.n_events == 18
    # Same size and name, one byte different: still a new key (the content is hashed).
    fx.write_movielens(ml_file.parent, lines=fx.ML_LINES + ["3::106::4::801"])
    third = load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    assert calls.count == 3
    assert len(entries(cache_dir)) == 3
    assert third.timestamps.max() == 1020 and 801 in third.timestamps


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("fail_at", [1, 3, 5])
def test_interrupted_save_leaves_nothing_behind(
    tmp_path: Path, ml_file: Path, monkeypatch, fail_at: int
) -> None:
    cache_dir = tmp_path / "cache"
    real_save = np.save
    saved = []

    def failing_save(file, arr, *args, **kwargs):
        saved.append(Path(file).name)
        if len(saved) == fail_at:
            real_save(file, arr[: len(arr) // 2], *args, **kwargs)  # half an array...
            raise Interrupted("disk full")  # ...and then the run dies
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(cache.np, "save", failing_save)
    with pytest.raises(Interrupted):
        load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    assert len(saved) == fail_at
    assert entries(cache_dir) == []  # neither an entry nor a temporary folder

    monkeypatch.setattr(cache.np, "save", real_save)
    data = load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    assert data.n_events == fx.ML_N_ROWS
    assert len(entries(cache_dir)) == 1


def test_interrupted_meta_write_leaves_nothing_behind(tmp_path: Path, ml_file: Path,
                                                      monkeypatch) -> None:
    cache_dir = tmp_path / "cache"
    real_write = Path.write_text

    def failing_write(self, *args, **kwargs):
        if self.name == "meta.json":
            raise KeyboardInterrupt
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing_write)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    assert entries(cache_dir) == []


def _entry_name(tmp_path: Path, ml_file: Path) -> str:
    """The cache folder name load_dataset uses for ml_config(ml_file) and USER_TAIL."""
    probe = tmp_path / "probe-cache"
    load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", probe)
    (name,) = entries(probe)
    return name


def test_empty_entry_folder_is_a_miss(tmp_path: Path, ml_file: Path) -> None:
    cache_dir = tmp_path / "cache"
    (cache_dir / _entry_name(tmp_path, ml_file)).mkdir(parents=True)
    data = load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    assert data.n_events == fx.ML_N_ROWS
    (entry,) = entries(cache_dir)
    assert (cache_dir / entry / "meta.json").is_file()


def test_partial_entry_without_meta_is_replaced(tmp_path: Path, ml_file: Path) -> None:
    cache_dir = tmp_path / "cache"
    stale = cache_dir / _entry_name(tmp_path, ml_file)
    stale.mkdir(parents=True)
    (stale / "items.npy").write_bytes(b"\x93NUMPY half written")
    data = load_dataset(ml_config(ml_file), USER_TAIL, tmp_path / "raw", cache_dir)
    assert data.n_events == fx.ML_N_ROWS
    assert (stale / "meta.json").is_file()


def test_missing_dataset_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ratings.dat"
    with pytest.raises(SeqexpError, match=r"dataset\.path") as info:
        load_dataset(ml_config(missing), USER_TAIL, tmp_path / "raw", tmp_path / "cache")
    assert str(missing) in str(info.value)
    assert entries(tmp_path / "cache") == []


def test_dataset_path_to_a_folder(tmp_path: Path) -> None:
    with pytest.raises(SeqexpError, match=r"dataset\.path"):
        load_dataset(ml_config(tmp_path), USER_TAIL, tmp_path / "raw", tmp_path / "cache")


def test_nothing_left_after_filtering_caches_nothing(tmp_path: Path, ml_file: Path) -> None:
    cache_dir = tmp_path / "cache"
    with pytest.raises(SeqexpError, match=r"dataset\.min_item_support=100") as info:
        load_dataset(ml_config(ml_file, min_item_support=100), USER_TAIL, tmp_path / "raw",
                     cache_dir)
    assert str(ml_file) in str(info.value)
    assert entries(cache_dir) == []


def test_wrong_format_file_caches_nothing(tmp_path: Path) -> None:
    path = fx.write_lastfm(tmp_path)
    with pytest.raises(SeqexpError) as info:
        load_dataset(ml_config(path), USER_TAIL, tmp_path / "raw", tmp_path / "cache")
    assert str(path) in str(info.value)
    assert entries(tmp_path / "cache") == []


def test_lastfm_and_table_formats_are_cached(tmp_path: Path, monkeypatch) -> None:
    cache_dir = tmp_path / "cache"
    split = {"name": "user_tail", "test_frac": 0.4, "val_frac": 0.0}
    lastfm = {"name": "lastfm", "format": "lastfm", "path": str(fx.write_lastfm(tmp_path)),
              "item": "track", "min_item_support": 1, "drop_repeats": False}
    table = {"name": "csv", "format": "tabular", "path": str(fx.write_csv(tmp_path)),
             "sep": None, "min_item_support": 1, "drop_repeats": False, **fx.TABLE_COLUMNS}
    first = [load_dataset(cfg, split, tmp_path / "raw", cache_dir) for cfg in (lastfm, table)]
    assert [d.n_events for d in first] == [7, 6]
    by_artist = load_dataset(dict(lastfm, item="artist"), split, tmp_path / "raw", cache_dir)
    assert by_artist.n_items == 3
    assert len(entries(cache_dir)) == 3
    monkeypatch.setitem(loading.READERS, "lastfm", _boom)
    monkeypatch.setitem(loading.READERS, "tabular", _boom)
    for cfg, before in zip((lastfm, table), first, strict=True):
        assert_same(before, load_dataset(cfg, split, tmp_path / "raw", cache_dir))


def test_unknown_format(tmp_path: Path, ml_file: Path) -> None:
    with pytest.raises(SeqexpError, match=r"dataset\.format='xml'"):
        load_dataset(ml_config(ml_file, format="xml"), USER_TAIL, tmp_path / "raw",
                     tmp_path / "cache")


def test_cache_key_is_deterministic_and_order_free() -> None:
    a = cache.cache_key("abc", {"x": 1, "y": {"b": 2, "a": 3}})
    b = cache.cache_key("abc", {"y": {"a": 3, "b": 2}, "x": 1})
    assert a == b and len(a) == 20
    assert cache.cache_key("abd", {"x": 1, "y": {"b": 2, "a": 3}}) != a
    assert cache.cache_key("abc", {"x": 2, "y": {"b": 2, "a": 3}}) != a
