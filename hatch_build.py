"""Build hook: a wheel records the commit it was built from (seqexp/_build_git.json), so that a
run of an installed seqexp can tag seqexp's own commit (seqexp.run.tracking.git_tags).

seqexp/core/source_git.py is loaded by its path, not imported as part of the package: pip builds
in an isolated environment without seqexp's dependencies (omegaconf, torch, MLflow)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _source_git(root: Path):
    """seqexp/core/source_git.py as a module of its own (stdlib only)."""
    spec = importlib.util.spec_from_file_location("_seqexp_source_git",
                                                  root / "seqexp" / "core" / "source_git.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class GitInfoHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        info = _source_git(Path(self.root)).source_git_info(Path(self.root))
        if info is None:  # an sdist or a copy without .git: nothing to record
            return
        self._folder = tempfile.mkdtemp(prefix="seqexp-build-")
        target = Path(self._folder) / "_build_git.json"
        target.write_text(json.dumps(info))
        build_data["force_include"][str(target)] = "seqexp/_build_git.json"

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        if getattr(self, "_folder", None):
            shutil.rmtree(self._folder, ignore_errors=True)
