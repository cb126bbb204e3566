"""Processed-data cache: one folder per key, written to a temporary folder and renamed into place,
so an interrupted run never leaves a half-written entry behind.

A temporary folder's name holds its writer's pid, start time and host. A writer killed before
it could clean up (SIGKILL, a power cut) leaves its folder behind; the next save in the same
cache folder removes it once its writer is gone (same host, pid ended or reused), and a
temporary folder of another host once it is older than STALE_FOREIGN_S.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import tokenize
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from seqexp.core import liveness
from seqexp.core.atomic import write_json
from seqexp.core.errors import unwritable
from seqexp.core.file_modes import folder_mode
from seqexp.data.sequences import SequenceData, inconsistencies

log = logging.getLogger(__name__)

_ARRAYS = ("items", "timestamps", "offsets", "train_end", "val_end")
_ID_ARRAYS = ("user_ids", "item_ids")
# .<entry>.tmp.<pid>.<start>.<random>@<host>: see the module docstring.
_TEMPORARY = re.compile(r"\.(?P<entry>[^/]+-[0-9a-f]{20})\.tmp\.(?P<pid>\d+)\.(?P<start>\d*)\."
                        r"[^.@]+@(?P<host>.+)")
# Before the writer was named: .<entry>.<random>, removed by age only.
_UNNAMED_TEMPORARY = re.compile(r"\.[^/]+-[0-9a-f]{20}\.[a-z0-9_]{8}")
STALE_FOREIGN_S = 24 * 3600.0
_DIGESTS = ".digests"  # cache_dir/.digests/<hash of the path>.json: see file_digest


def file_digest(path: Path) -> str:
    """SHA-256 of a raw file (hex)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _version(path: Path, cache_dir: Path) -> tuple[dict, Path]:
    """A raw file's version (path, size, mtime, inode) and where its digest is kept."""
    path = Path(path).resolve()
    stat = path.stat()
    version = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
               "inode": stat.st_ino}
    key = hashlib.sha256(str(path).encode()).hexdigest()
    return version, Path(cache_dir) / _DIGESTS / f"{key}.json"


def known_digest(path: Path, cache_dir: Path) -> tuple[str | None, dict]:
    """The SHA-256 kept for this version of the file by `remember_digest`, else None: computed
    once per file version, and again when its size, mtime or inode changes (as make and rsync
    decide); and the version read, for `remember_digest`."""
    version, memo = _version(path, cache_dir)
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in version} == version and len(known.get("sha256", "")) == 64:
            return known["sha256"], version
    except (OSError, ValueError, AttributeError):
        pass
    return None, version


def remember_digest(path: Path, cache_dir: Path, digest: str, version: dict) -> None:
    """Keep a file's digest in cache_dir/.digests (called once its data is cached, so a file that
    fails to parse leaves nothing behind), under the version `known_digest` read before the file
    was hashed: a file changed since is hashed again next time."""
    memo = _version(path, cache_dir)[1]
    try:
        write_json(memo, version | {"sha256": digest})
    except OSError as exc:  # a read-only cache still serves its entries
        log.debug("cannot keep the digest of %s in %s: %s", path, memo, exc)


def cache_key(source: str, params: Mapping) -> str:
    """Hash of the raw data's identity (a file digest or generator parameters) and every
    preprocessing parameter."""
    blob = json.dumps({"source": source, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_cached(folder: Path) -> SequenceData | None:
    """The entry in `folder`, None when there is none. An entry that cannot be read (damaged
    on disk, edited by hand) or whose arrays are inconsistent (`inconsistencies`) is removed,
    so that this run writes it anew."""
    if not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {name: np.load(folder / f"{name}.npy") for name in _ARRAYS}
        ids = {name: np.load(folder / f"{name}.npy") for name in _ID_ARRAYS
               if (folder / f"{name}.npy").is_file()}
        data = SequenceData(**arrays, **ids, n_items=int(meta["n_items"]),
                            stats=dict(meta["stats"]))
    # np.load reads an .npy header with Python's tokenizer: an unclosed bracket or quote in a
    # damaged one raises TokenError, not ValueError
    except (OSError, ValueError, KeyError, TypeError, EOFError, tokenize.TokenError) as exc:
        log.warning("cache entry %s cannot be read (%s); preprocessing again", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    problems = inconsistencies(data)
    if problems:  # parses, but is not what save_cached wrote
        log.warning("cache entry %s is inconsistent (%s); preprocessing again", folder,
                    "; ".join(problems))
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return data


def remove_stale_temporaries(cache_dir: Path, now: float | None = None) -> list[Path]:
    """Remove the temporary folders in cache_dir whose writer is gone; returns them."""
    now = time.time() if now is None else now
    removed = []
    try:
        candidates = [p for p in Path(cache_dir).iterdir() if p.name.startswith(".")]
    except OSError:
        return removed
    for path in candidates:
        named = _TEMPORARY.fullmatch(path.name)
        if named is not None and named["host"] == liveness.host():
            stale = liveness.is_gone(named["host"], named["pid"], named["start"])
        elif named is not None or _UNNAMED_TEMPORARY.fullmatch(path.name):
            try:
                stale = now - path.stat().st_mtime > STALE_FOREIGN_S
            except OSError:
                stale = False
        else:
            continue
        if stale and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                log.info("removed %s, left by a run that ended before finishing it", path)
                removed.append(path)
    return removed


def save_cached(folder: Path, data: SequenceData, params: Mapping) -> None:
    """Write the entry atomically. A folder that cannot be written (read-only, no permission, a
    full disk) is a SeqexpError naming it, with the temporary folder removed."""
    tmp: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder.parent)
        me = liveness.identity()
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp.{me['pid']}.{me['pid_start']}.",
                                    suffix=f"@{me['host']}", dir=folder.parent))
        os.chmod(tmp, folder_mode())  # mkdtemp's 700 would hide the entry from teammates
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
    except OSError as exc:
        raise unwritable(folder.parent, exc, "the processed-data cache", "paths.cache_dir"
                         ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

