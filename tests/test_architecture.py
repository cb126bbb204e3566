"""The package layout (docs/architecture.md): the import contracts of pyproject.toml hold, and the
light entry points stay light."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    beside = Path(sys.executable).with_name("lint-imports")
    found = str(beside) if beside.is_file() else shutil.which("lint-imports")
    assert found, "lint-imports not installed (pip install -e '.[dev]')"
    return found


def _modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running `statement`."""
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout))


def test_the_import_contracts_hold():
    result = subprocess.run([_lint_imports()], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_report_loads_neither_torch_nor_the_data_pipeline_nor_the_engine():
    loaded = _modules_after("import seqexp.apps.report")
    for module in ("torch", "seqexp.engine", "seqexp.data.loading", "seqexp.data.preprocess",
                   "seqexp.data.download", "seqexp.models", "mlflow"):
        assert module not in loaded, module


def test_a_model_module_loads_no_data_pipeline():
    loaded = _modules_after("import seqexp.models.popularity")
    for module in ("seqexp.data.loading", "seqexp.data.download", "pandas", "pyarrow",
                   "hydra", "mlflow"):
        assert module not in loaded, module


def test_the_package_and_its_load_function_import_nothing_heavy():
    loaded = _modules_after("import seqexp; assert callable(seqexp.load)")
    assert not {"torch", "mlflow", "seqexp.apps", "seqexp.run"} & loaded
