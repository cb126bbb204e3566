"""The cache when the disk says no (read-only, full) or a writer was killed, and the raw file's
SHA-256 computed once per file version."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fixtures_raw as fx
from helpers import split_preset
from seqexp.core import liveness
from seqexp.core.errors import SeqexpError
from seqexp.data import cache, loading
from seqexp.data.loading import load_dataset
from seqexp.data.sequences import inconsistencies

USER_TAIL = split_preset()
# conf/dataset/ml10m.yaml (the loader reads every key of its format)
ML = {"name": "ml10m", "format": "movielens", "layout": "ratings_dat", "min_item_support": 1,
      "drop_repeats": False}


def load(path: Path, cache_dir: Path):
    return load_dataset(ML | {"path": str(path)}, USER_TAIL, cache_dir / "raw", cache_dir)


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != ".digests")


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_cache_folder_is_one_line_naming_it(tmp_path, monkeypatch, code):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cache.tempfile, "mkdtemp", refuse)
    with pytest.raises(SeqexpError) as caught:
        load(fx.write_movielens(tmp_path), tmp_path / "cache")
    message = str(caught.value)
    assert message.startswith(f"cannot write the processed-data cache in {tmp_path / 'cache'} "
                              f"({os.strerror(code)}); set paths.cache_dir=")
    assert "paths.data_dir=" in message
    assert visible(tmp_path / "cache") == []


def test_full_disk_mid_write_removes_the_temporary_folder(tmp_path, monkeypatch):
    real_save, calls = np.save, []

    def save_then_fill(path, array):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, array)

    monkeypatch.setattr(cache.np, "save", save_then_fill)
    with pytest.raises(SeqexpError, match=r"cannot write the processed-data cache in .*cache "
                                          r"\(No space left on device\); free some space there"
                                          r" or set paths.cache_dir="):
        load(fx.write_movielens(tmp_path), tmp_path / "cache")
    assert len(calls) == 3
    assert visible(tmp_path / "cache") == []


def test_digest_is_computed_once_per_file_version(tmp_path, monkeypatch):
    path = fx.write_movielens(tmp_path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    hashed = []
    real = cache.file_digest
    monkeypatch.setattr(loading, "file_digest", lambda p: hashed.append(p) or real(p))
    assert load(path, tmp_path / "cache").stats["sha256"] == expected
    assert load(path, tmp_path / "cache").stats["sha256"] == expected
    assert len(hashed) == 1  # the second run read it from the cache
    lines = fx.ML_LINES[:-1]
    fx.write_movielens(tmp_path, lines=lines)  # a new version of the same file
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = load(path, tmp_path / "cache")
    assert len(hashed) == 2
    assert changed.stats["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() != expected



def test_a_file_changed_while_it_was_hashed_is_hashed_again_next_time(tmp_path, monkeypatch):
    path, cache_dir = fx.write_movielens(tmp_path), tmp_path / "cache"
    real = cache.file_digest

    def hash_then_change(p):  # the file is rewritten after its digest was taken
        digest = real(p)
        fx.write_movielens(tmp_path, lines=fx.ML_LINES[:-1])
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        return digest

    monkeypatch.setattr(loading, "file_digest", hash_then_change)
    load(path, cache_dir)
    # the digest is kept under the version that was hashed, not the file as it is now
    assert cache.known_digest(path, cache_dir)[0] is None


def finished_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def temporary(cache_dir: Path, pid: int, start: str, host: str) -> Path:
    path = cache_dir / f".ml10m-{'a' * 20}.tmp.{pid}.{start}.x1y2z3@{host}"
    path.mkdir(parents=True)
    (path / "items.npy").write_bytes(b"half")
    return path


def test_stale_temporary_folders_of_gone_writers_are_removed(tmp_path):
    cache_dir = tmp_path / "cache"
    me = liveness.identity()
    dead = temporary(cache_dir, finished_pid(), "123", me["host"])
    reused = temporary(cache_dir, os.getpid(), "1", me["host"])  # this pid, another start
    alive = temporary(cache_dir, os.getpid(), me["pid_start"], me["host"])
    foreign_new = temporary(cache_dir, 1, "1", "another-host")
    foreign_old = temporary(cache_dir, 1, "1", "old-host")
    unnamed_old = cache_dir / f".ml10m-{'b' * 20}.abcd1234"
    unnamed_old.mkdir()
    old = time.time() - cache.STALE_FOREIGN_S - 60
    for path in (foreign_old, unnamed_old):
        os.utime(path, (old, old))
    unrelated = cache_dir / ".something-else"
    unrelated.mkdir()
    removed = cache.remove_stale_temporaries(cache_dir)
    assert sorted(removed) == sorted([dead, reused, foreign_old, unnamed_old])
    assert visible(cache_dir) == sorted(p.name for p in (alive, foreign_new, unrelated))


def test_processes_of_other_hosts_are_never_taken_for_gone():
    dead = finished_pid()
    assert liveness.is_gone(liveness.host(), dead)
    assert not liveness.is_gone("another-host", dead)
    assert not liveness.is_gone(liveness.host(), os.getpid(), liveness.identity()["pid_start"])
    assert not liveness.is_gone(liveness.host(), "not-a-pid")


def test_a_save_cleans_up_after_a_killed_writer(tmp_path):
    cache_dir = tmp_path / "cache"
    dead = temporary(cache_dir, finished_pid(), "5", liveness.host())
    data = load(fx.write_movielens(tmp_path), cache_dir)
    assert not dead.exists()
    (entry,) = visible(cache_dir)
    assert entry.startswith("ml10m-") and data.n_events == fx.ML_N_ROWS


KILLED_WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from seqexp.data import cache, loading
from seqexp.data.loading import load_dataset
from seqexp.run import presets
real_save = np.save
def save_and_hang(path, array):
    real_save(path, array)
    print("writing", flush=True)
    time.sleep(600)
cache.np.save = save_and_hang
cfg = {"name": "ml10m", "format": "movielens", "layout": "ratings_dat", "min_item_support": 1,
       "drop_repeats": False, "path": sys.argv[1]}
load_dataset(cfg, presets.config(["split=user_tail"])["split"],
             Path(sys.argv[2]) / "raw", Path(sys.argv[2]))
"""


@pytest.mark.slow
def test_sigkill_during_the_cache_write_is_cleaned_up_by_the_next_run(tmp_path):
    path, cache_dir = fx.write_movielens(tmp_path), tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(cache_dir)],
                              stdout=subprocess.PIPE, text=True, env=env)
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()
    writer.wait()
    (left,) = visible(cache_dir)
    assert left.startswith(".ml10m-") and f".tmp.{writer.pid}." in left
    load(path, cache_dir)
    (entry,) = visible(cache_dir)
    assert entry.startswith("ml10m-")


def _garbage(file: Path) -> None:
    file.write_bytes(b"\x00garbage")


def _header_unclosed(file: Path) -> None:
    """The header's opening brace turned into a quote: numpy's tokenizer meets a string that
    never ends (tokenize.TokenError)."""
    raw = bytearray(file.read_bytes())
    raw[raw.index(b"{")] = ord("'")
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize(("name", "damage"), [
    ("meta.json", _garbage), ("items.npy", _garbage), ("items.npy", _header_unclosed),
])
def test_a_damaged_entry_is_preprocessed_again(tmp_path, name, damage):
    path, cache_dir = fx.write_movielens(tmp_path), tmp_path / "cache"
    first = load(path, cache_dir)
    (entry,) = visible(cache_dir)
    damage(cache_dir / entry / name)
    again = load(path, cache_dir)
    np.testing.assert_array_equal(again.items, first.items)
    assert visible(cache_dir) == [entry]
    rewritten = cache.load_cached(cache_dir / entry)  # written anew, not left damaged
    assert rewritten is not None and rewritten.stats == first.stats


def _ids_out_of_range(entry: Path) -> None:
    items = np.load(entry / "items.npy")
    items[3] = items.max() + 7
    np.save(entry / "items.npy", items)


def _short_offsets(entry: Path) -> None:
    np.save(entry / "offsets.npy", np.load(entry / "offsets.npy")[:-1])


def _decreasing_offsets(entry: Path) -> None:
    offsets = np.load(entry / "offsets.npy")
    offsets[1], offsets[2] = offsets[2], offsets[1]
    np.save(entry / "offsets.npy", offsets)


def _bounds_outside_events(entry: Path) -> None:
    val_end = np.load(entry / "val_end.npy")
    val_end[0] += 10_000
    np.save(entry / "val_end.npy", val_end)


def _counts_unlike_meta(entry: Path) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    meta["stats"]["test_events"] += 1
    (entry / "meta.json").write_text(json.dumps(meta))


def _item_ids_cut_short(entry: Path) -> None:
    np.save(entry / "item_ids.npy", np.load(entry / "item_ids.npy")[:-1])


@pytest.mark.parametrize(("damage", "named"), [
    (_ids_out_of_range, "item ids span"), (_short_offsets, "offsets end at"),
    (_decreasing_offsets, "offsets decrease"), (_bounds_outside_events, "bounds lie outside"),
    (_counts_unlike_meta, "stats say test_events="), (_item_ids_cut_short, "item_ids has"),
])
def test_an_entry_that_parses_but_is_inconsistent_is_rebuilt_with_a_warning(
        tmp_path, caplog, damage, named):
    path, cache_dir = fx.write_movielens(tmp_path), tmp_path / "cache"
    first = load(path, cache_dir)
    (entry,) = visible(cache_dir)
    damage(cache_dir / entry)
    with caplog.at_level("WARNING", logger="seqexp.data.cache"):
        again = load(path, cache_dir)
    assert any("is inconsistent" in r.message and named in r.message for r in caplog.records), \
        [r.message for r in caplog.records]
    np.testing.assert_array_equal(again.items, first.items)
    assert again.stats == first.stats
    rewritten = cache.load_cached(cache_dir / entry)  # written anew, consistent again
    assert rewritten is not None and not inconsistencies(rewritten)


def test_consistent_data_has_no_inconsistencies(tmp_path):
    assert inconsistencies(load(fx.write_movielens(tmp_path), tmp_path / "cache")) == []


def test_read_only_download_folder_is_one_line_naming_it(tmp_path, monkeypatch):
    from seqexp.data import download
    from seqexp.data.loading import resolve_raw_file

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(download, "fetch", refuse)
    dataset = {"name": "ml10m", "path": None, "url": "https://example.org/ml-10m.zip",
               "archive_member": "ml-10M100K/ratings.dat", "archive_md5": "0" * 32,
               "verify": True}
    with pytest.raises(SeqexpError, match=rf"cannot write the downloaded data in "
                                          rf"{tmp_path / 'ml10m'} \(Read-only file system\); "
                                          rf"set paths.raw_dir="):
        resolve_raw_file(dataset, tmp_path, progress=False)
