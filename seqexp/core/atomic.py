"""Atomic file writes: a reader sees the old file or the new one, never half of one, and a write
that fails or is interrupted leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from seqexp.core.file_modes import file_mode

# The temporary names atomic_path gives (mkstemp's: 8 characters of [a-z0-9_]).
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
# What write_failure appends to find the file system's own error behind a failed write.
_PROBE_BYTES = 1 << 20


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (same file system, so the final rename is atomic) to write
    to; renamed over `path` when the block ends, with the mode a new file gets under the
    umask, and removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp made it 600: the final file gets what open() would give it (666 less umask).
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:  # a writer's error (pyarrow's)
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, payload: Mapping) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def write_failure(tmp: Path, path: Path) -> OSError | None:
    """The file system's own error behind a write to `tmp` that a library reported in its own
    words (torch: a RuntimeError, `basic_ios::clear` or `unexpected pos`): the error that a plain
    write at its end gets now (no space left, a quota, the file size limit), naming `path`. None
    when such a write succeeds: then the failure was something else."""
    try:
        with open(tmp, "ab") as handle:
            handle.write(bytes(_PROBE_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        return OSError(exc.errno, exc.strerror, str(path))
    return None


def remove_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files that atomic_path left in `folder` and below when its process
    was killed in the middle of a write; returns them. Only for a folder that no live process
    writes in (a run being resumed)."""
    removed = []
    for tmp in Path(folder).rglob(".*.tmp"):
        if _TEMPORARY.fullmatch(tmp.name) and tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
