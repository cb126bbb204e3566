"""The git commit of a checkout (`source_git_info`): what a run tags as seqexp's own code, and
what the wheel's build hook (hatch_build.py) records in the wheel.

Standard library only, and no import of the package: the build hook loads this file by its path
in pip's isolated build environment, which has none of seqexp's dependencies."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _git(folder: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_git_info(root: Path) -> dict[str, str] | None:
    """{"git_sha", "git_dirty"} of the git checkout whose top folder is `root`, else None.
    Dirty = tracked files differ from the commit."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != Path(root).resolve():
        return None  # not a checkout, or a folder inside some other repository
    sha = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    if sha is None or status is None:
        return None
    return {"git_sha": sha, "git_dirty": str(bool(status)).lower()}
