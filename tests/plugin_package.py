"""A model package outside seqexp, "installed" the way pip leaves one: its folder on sys.path
(and PYTHONPATH, for subprocesses) with a *.dist-info folder whose entry_points.txt registers
its class in the group `seqexp.models` (seqexp/run/plugins.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from seqexp.run.plugins import ENTRY_POINT_GROUP
from seqexp.run.registry import registry


def install_package(site: Path, package: str, files: Mapping[str, str],
                    entry_points: Mapping[str, str], monkeypatch) -> Path:
    """Write `files` ({path inside the package: text}) as the package `package` in `site`,
    register `entry_points` ({name: "module:Class"}) and put `site` on sys.path and
    PYTHONPATH for this test; the registry of models is read again."""
    root = site / package
    for path, text in {"__init__.py": "", **files}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    info = site / f"{package}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    registry.cache_clear()
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    return root
