"""Atomic file writes: a reader sees the old file or the new one, never half of one, and a write
that fails or is interrupted leaves nothing behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from seqexp.core.file_modes import file_mode


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
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, payload: Mapping) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True))
