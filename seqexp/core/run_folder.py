"""Every run owns its outputs folder.

The folder's name (conf/config.yaml: hydra.run.dir, hydra.sweep.dir) ends in a random token
(`run_token`, the `${seqexp_run_token:}` resolver), so that runs started in the same second,
one after another or at once, get folders of their own. The token makes a clash unlikely; the
claim makes it impossible to go unnoticed: a run takes its folder by creating the mark file
`.seqexp-run` with O_EXCL (atomic on local and NFS v3+ file systems) before its MLflow run exists,
then writes its run id into it. A second run in a claimed folder (a fixed `hydra.run.dir=`) is
refused, and the readers of a run's files (seqexp.load, seqexp-recommend, resume=) use the
folder only when the mark names that run.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from seqexp.core.atomic import write_text
from seqexp.core.errors import SeqexpError

MARK = ".seqexp-run"
_CLAIMED = "claimed"  # the mark's text until the run id is known


def run_token() -> str:
    """A fresh random part for an outputs folder's name (8 hex digits)."""
    return secrets.token_hex(4)


def claim(folder: Path) -> None:
    """Take `folder` for a new run, or one line when another run has it already."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / MARK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = owner(folder) or "another run"
        raise SeqexpError(f"{folder} holds the outputs of run {holder} already; every run needs "
                          f"a folder of its own: drop hydra.run.dir= (hydra.sweep.dir= for a "
                          f"multirun), so that each run gets a new one, or set it to a new "
                          f"folder") from None
    with os.fdopen(fd, "w") as mark:
        mark.write(_CLAIMED)


def record_owner(folder: Path, run_id: str) -> None:
    """Write the claimed folder's run id into its mark."""
    write_text(folder / MARK, run_id)


def release(folder: Path) -> None:
    """Give back a folder claimed for a run that was never created."""
    (folder / MARK).unlink(missing_ok=True)


def owner(folder: Path) -> str | None:
    """The run id a folder's mark names; None for a folder without one (made by an older
    seqexp) or whose run was not created yet."""
    try:
        text = (folder / MARK).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return None if text in ("", _CLAIMED) else text


def belongs_to(folder: Path, run_id: str) -> bool:
    """Whether `folder` holds run `run_id`'s files: its mark names that run, or it has no mark
    (a folder of an older seqexp, which had none)."""
    if not (folder / MARK).exists():
        return True
    return owner(folder) == run_id
