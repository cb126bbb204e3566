"""Build hook: a wheel records the commit it was built from (seqexp/_build_git.json), so that a
run of an installed seqexp can tag seqexp's own commit (seqexp.run.tracking.git_tags)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class GitInfoHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        sys.path.insert(0, self.root)
        try:
            from seqexp.run.tracking import source_git_info
        finally:
            sys.path.remove(self.root)
        info = source_git_info(Path(self.root))
        if info is None:  # an sdist or a copy without .git: nothing to record
            return
        self._folder = tempfile.mkdtemp(prefix="seqexp-build-")
        target = Path(self._folder) / "_build_git.json"
        target.write_text(json.dumps(info))
        build_data["force_include"][str(target)] = "seqexp/_build_git.json"

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        if getattr(self, "_folder", None):
            shutil.rmtree(self._folder, ignore_errors=True)
