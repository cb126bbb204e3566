"""Artifacts land beside the SQLite store, and nowhere else: checked on the file system, not
through MLflow (which reads back whatever location it wrote, right or wrong)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_overrides
from seqexp.run.tracking import sqlite_path

TINY = [o for o in tiny_overrides(Path("unused")) if not o.startswith("paths.")]
TINY_WITH_MODEL = [o for o in tiny_overrides(Path("unused"), log_model=True)
                   if not o.startswith("paths.")]


@pytest.mark.parametrize(("uri", "expected"), [
    ("sqlite:///mlflow.db", "{cwd}/mlflow.db"),
    ("sqlite:///sub/../store/x.db?timeout=5", "{cwd}/store/x.db"),
    ("sqlite:////abs/dir/mlflow.db", "/abs/dir/mlflow.db"),
    ("sqlite:///:memory:", None),
    ("postgresql://u@localhost/db", None),
    ("http://127.0.0.1:5000", None),
])
def test_sqlite_path_reads_sqlalchemy_paths_not_url_paths(uri, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = sqlite_path(uri)
    assert found == (None if expected is None else Path(expected.format(cwd=tmp_path)))


def _run(module: str, args: list[str], cwd: Path, home: Path) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HOME=str(home))
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _ui_hint(store: Path, experiment: str = "seqexp") -> str:
    """The UI line a run prints: the command that serves `store`, and the address of the
    experiment's runs table (its id read from the SQLite file)."""
    with sqlite3.connect(store) as db:
        (experiment_id,), = db.execute("SELECT experiment_id FROM experiments WHERE name = ?",
                                       (experiment,)).fetchall()
    return (f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{store}, then open "
            f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType="
            f"machine_learning&viewStateShareKey=seqexp-at-20")


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}


def _layout(tmp_path: Path, store: str) -> tuple[Path, Path, Path, Path, list[str]]:
    """launch folder, data folder, $HOME, the store's folder and the mlflow.tracking_uri
    override (none for the default store)."""
    launch, data, home = tmp_path / "home" / "me" / "exp", tmp_path / "data", tmp_path / "home2"
    for folder in (launch, home):
        folder.mkdir(parents=True)
    store_dir = {"default": launch, "relative": launch / "runs",
                 "absolute": tmp_path / "elsewhere"}[store]
    uri = {"default": [], "relative": ["mlflow.tracking_uri=sqlite:///runs/mlflow.db"],
           "absolute": [f"mlflow.tracking_uri=sqlite:///{store_dir / 'mlflow.db'}"]}[store]
    return launch, data, home, store_dir, uri


def _assert_nothing_outside(tmp_path: Path, launch: Path, home: Path, allowed: set[str],
                            tmp_before: set[str]) -> None:
    """Nothing where a misread `file://` URI puts it (its first folder taken for a host name,
    the rest rooted at /), beside this test's folder or in $HOME; in the launch folder only
    `allowed`."""
    assert not Path("/", *tmp_path.parts[2:]).exists()
    assert set(os.listdir(tmp_path.parent)) == tmp_before
    # matplotlib's font cache (seqexp-report's chart) is the only thing a user's $HOME gets.
    assert all("matplotlib" in p.parts for p in _files(home))
    assert {p.name for p in tmp_path.iterdir()} <= {"home", "data", "home2", "elsewhere"}
    assert {p.name for p in launch.iterdir()} <= allowed


def test_a_run_puts_every_artifact_beside_the_default_store_and_says_where(tmp_path,
                                                                          empty_store):
    launch, data, home, store_dir, _ = _layout(tmp_path, "default")
    # the schema made once per session (seconds); seqexp still creates the experiment and so
    # chooses where its artifacts go
    shutil.copy(empty_store, launch / "mlflow.db")
    tmp_before = set(os.listdir(tmp_path.parent))

    single = _run("seqexp.apps.cli", ["model=pop", *TINY_WITH_MODEL, f"paths.data_dir={data}"],
                  launch, home)

    last = single.strip().splitlines()[-3:]
    assert last[0].startswith("seqexp: run ")
    assert " finished (pop on synthetic): test_mrr_at_20=" in last[0]
    assert (launch / last[1].split("outputs: ", 1)[1] / "config.yaml").is_file()
    assert last[2].strip() == f"{_ui_hint(launch / 'mlflow.db')}  (experiment seqexp)"
    _assert_nothing_outside(tmp_path, launch, home, {"outputs", "mlflow.db", ".mlflow.db.lock",
                                                     "mlartifacts"}, tmp_before)
    artifacts = _files(store_dir / "mlartifacts")
    assert {"config.yaml", "metrics.json", "best.pt"} <= {p.name for p in artifacts}
    assert any(".hydra" in p.parts for p in artifacts)
    assert {p.parts[0] for p in artifacts} == {"seqexp"}
    # the run's artifacts in its folder, its MLflow Model's under models/ of the experiment
    run_folders = {p.parts[1] for p in artifacts} - {"models"}
    assert len(run_folders) == 1
    model_files = {p.name for p in artifacts if p.parts[1] == "models"}
    assert {"MLmodel", "best.pt", "mlflow_model_code.py"} <= model_files


@pytest.mark.slow  # three commands; the run above checks the same store by default
def test_run_sweep_and_report_put_every_artifact_beside_the_default_store(tmp_path, empty_store):
    launch, data, home, store_dir, _ = _layout(tmp_path, "default")
    # the schema made once per session (seconds); seqexp still creates the experiment and so
    # chooses where its artifacts go
    shutil.copy(empty_store, launch / "mlflow.db")
    tmp_before = set(os.listdir(tmp_path.parent))

    common = [*TINY, f"paths.data_dir={data}"]
    single = _run("seqexp.apps.cli", ["model=pop", *common], launch, home)
    sweep = _run("seqexp.apps.cli", ["-m", "model=pop", "seed=1,2", *common], launch, home)
    _run("seqexp.apps.report", ["--out", "report", "--experiment", "seqexp"], launch, home)

    # The last lines say where the results went: the run, each job, the sweep.
    last = single.strip().splitlines()[-3:]
    assert last[0].startswith("seqexp: run ")
    assert " finished (pop on synthetic): test_mrr_at_20=" in last[0]
    assert (launch / last[1].split("outputs: ", 1)[1] / "config.yaml").is_file()
    assert last[2].strip() == f"{_ui_hint(launch / 'mlflow.db')}  (experiment seqexp)"
    for job in (0, 1):
        assert f"[job {job}] seqexp: run " in sweep
    summary = sweep.strip().splitlines()[-3:]
    assert summary[0].startswith("seqexp: sweep ") and " done: 2 finished, 0 failed" in summary[0]
    assert summary[1].strip().startswith("report: seqexp-report --sweep-id ")
    assert summary[2].strip().startswith(f"{_ui_hint(launch / 'mlflow.db')}  (experiment seqexp, ")

    _assert_nothing_outside(tmp_path, launch, home, {"outputs", "report", "mlflow.db",
                                                     ".mlflow.db.lock", "mlartifacts"},
                            tmp_before)
    artifacts = _files(store_dir / "mlartifacts")
    assert {"config.yaml", "metrics.json", "best.pt", "multirun.yaml", "seqexp.md",
            "seqexp.csv", "seqexp.tex", "seqexp.png"} <= {p.name for p in artifacts}
    assert any(".hydra" in p.parts for p in artifacts)
    # One experiment folder; a folder per run: the run, 2 jobs, the sweep's parent and the
    # report's own run (a report by experiment has no sweep parent to attach to).
    assert {p.parts[0] for p in artifacts} == {"seqexp"}
    assert len({p.parts[1] for p in artifacts}) == 5


@pytest.mark.slow  # the default store's test above runs the same code; sqlite_path's units too
@pytest.mark.parametrize("store", ["relative", "absolute"])
def test_a_run_tracked_in_a_given_sqlite_file_keeps_its_artifacts_beside_it(tmp_path, store):
    launch, data, home, store_dir, uri = _layout(tmp_path, store)
    tmp_before = set(os.listdir(tmp_path.parent))

    _run("seqexp.apps.cli", ["model=pop", *TINY, f"paths.data_dir={data}", *uri], launch, home)

    _assert_nothing_outside(tmp_path, launch, home, {"outputs", "runs"}, tmp_before)
    artifacts = _files(store_dir / "mlartifacts")
    assert {"config.yaml", "metrics.json", "best.pt"} <= {p.name for p in artifacts}
    assert {p.parts[0] for p in artifacts} == {"seqexp"}
