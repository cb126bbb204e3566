"""Multiruns end to end: one MLflow parent run per sweep with every job nested under it, also
when the jobs run in other processes (joblib); Optuna going on past a failed trial; a failed
grid job failing the sweep and its parent run; the report of a real sweep."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import tiny_overrides
from seqexp.run.sweep import SWEEP_FILE


def seqexp(args: list[str], cwd: Path, module: str = "seqexp.apps.cli"
           ) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def sweep_runs(db: Path, experiment: str = "seqexp"):
    """(client, the parent run, the other runs) of the only sweep in the experiment."""
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("seqexp.role") == "sweep"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = [r for r in runs if r is not parents[0]]
    return client, parents[0], children


def assert_nested(parent, children, sweep_dir: Path) -> None:
    sweep_id = parent.data.tags["sweep_id"]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["sweep_id"] == sweep_id
    assert sorted(c.data.tags["sweep_job"] for c in children) == [
        str(i) for i in range(len(children))]
    written = json.loads((sweep_dir / SWEEP_FILE).read_text())
    assert written["parent_run_id"] == parent.info.run_id and written["sweep_id"] == sweep_id


@pytest.mark.slow  # parallel worker processes; tests/test_artifact_locations.py sweeps in-line
def test_joblib_multirun_nests_parallel_jobs_under_one_parent_and_reports_them(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = seqexp(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2",
                     "model=gru", "model.hidden_size=16", *tiny_overrides(tmp_path / "data"),
                     f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # the jobs ran in joblib's worker processes, not in the process that holds the parent run
    assert "Joblib.Parallel(n_jobs=2,backend=loky" in result.stdout + result.stderr

    client, parent, children = sweep_runs(tmp_path / "mlflow.db")
    assert parent.info.status == "FINISHED"
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert sorted(c.data.tags["seed"] for c in children) == ["1", "2"]
    assert_nested(parent, children, sweep_dir)
    best = max(children, key=lambda c: c.data.metrics["run/best_val_mrr_at_20"])
    summary = parent.data.metrics
    assert summary["sweep/jobs_finished"] == 2 and summary["sweep/jobs_failed"] == 0
    assert summary["run/best_val_mrr_at_20"] == best.data.metrics["run/best_val_mrr_at_20"]
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.params["sweep.launcher"].endswith("JoblibLauncher")
    assert "multirun.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # each job's lines say whose they are; the sweep ends with its summary and what to run next
    for child in children:
        job = child.data.tags["sweep_job"]
        line = f"[job {job}] seqexp: run {child.info.run_id} finished (gru on synthetic, best "
        assert line in result.stdout
    summary = result.stdout.strip().splitlines()[-3:]
    assert summary[0].startswith(f"seqexp: sweep {parent.data.tags['sweep_id']} done: "
                                 f"2 finished, 0 failed, 0 killed; best val_mrr_at_20=")
    assert f"seqexp-report --sweep-id {parent.data.tags['sweep_id']}" in summary[1]
    # the sweep carries its own comparison: its parent holds the report, named after it,
    # and the best job's numbers
    name = parent.info.run_name
    assert name == f"sweep-{parent.data.tags['sweep_id']}"
    carried = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert carried == {f"report/{name}.{ext}" for ext in ("md", "csv", "tex", "png")} | {
        f"report/{name}_mrr_by_history.png"}
    for key in ("epoch/test/mrr_at_20", "epoch/test/recall_at_20", "run/best_epoch"):
        assert parent.data.metrics[key] == best.data.metrics[key], key

    report = seqexp(["--sweep-id", parent.data.tags["sweep_id"], "--out", "report"],
                    cwd=tmp_path, module="seqexp.apps.report")
    assert report.returncode == 0, report.stderr[-3000:]
    out = tmp_path / "report"
    mrr = [c.data.metrics["epoch/test/mrr_at_20"] for c in children]
    recall = [c.data.metrics["epoch/test/recall_at_20"] for c in children]
    (row,) = list(csv.DictReader((out / f"{name}.csv").open()))
    assert (row["model"], row["synthetic_mrr_at_20_n"]) == ("gru", "2")
    assert float(row["synthetic_mrr_at_20_mean"]) == pytest.approx(statistics.fmean(mrr))
    assert float(row["synthetic_mrr_at_20_std"]) == pytest.approx(statistics.stdev(mrr))
    assert float(row["synthetic_recall_at_20_mean"]) == pytest.approx(statistics.fmean(recall))
    shown = f"{statistics.fmean(mrr):.5f} ± {statistics.stdev(mrr):.5f} (n=2)"
    # ‡ synthetic data, [a] the tiny settings (the footnote names them)
    assert f"| gru | {shown} ‡ [a] |" in (out / f"{name}.md").read_text()
    assert shown.replace("±", r"$\pm$") in (out / f"{name}.tex").read_text()
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / f"{name}.csv").read_text() == (
        Path(client.download_artifacts(parent.info.run_id, f"report/{name}.csv", str(tmp_path)))
        .read_text())  # seqexp-report --sweep-id makes the same table


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                    reason="hydra-optuna-sweeper not installed (pip install 'seqexp[optuna]')")
@pytest.mark.slow  # a whole search; tests/test_presets.py checks the presets compose
def test_optuna_search_goes_on_past_a_failed_trial(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # A valid and an invalid batch size; the seeded random sampler draws 0, 16, 0 (optuna 2.10),
    # so the search must get past a failed first trial and also end on one. (Not the grid
    # sampler: hydra-optuna-sweeper 1.3.0 crashes when the last grid trial fails.)
    tiny = [o for o in tiny_overrides(tmp_path / "data") if not o.startswith("train.batch_size")]
    result = seqexp(["-m", "hparams_search=optuna", "hydra/sweeper/sampler=random",
                     "hydra.sweeper.sampler.seed=0", "hydra.sweeper.n_trials=3",
                     "hydra.sweeper.params=null", "train.batch_size=choice(16,0)", "model=gru",
                     "model.hidden_size=16", *tiny, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed: train.batch_size=0 must be an integer >= 1" in result.stdout + result.stderr

    client, parent, children = sweep_runs(tmp_path / "mlflow.db")
    assert len(children) == 3
    assert_nested(parent, children, sweep_dir)
    failed = [c for c in children if c.info.status == "FAILED"]
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(failed) >= 1 and len(finished) >= 1 and len(failed) + len(finished) == 3
    for run in failed:
        assert "train.batch_size=0 must be an integer >= 1" in run.data.tags["error"]
        assert run.data.tags["model"] == "gru"
    for run in finished:
        assert run.data.params["train.batch_size"] == "16"
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"train.batch_size": 16}
    assert results["best_value"] == pytest.approx(
        max(run.data.metrics["run/best_val_mrr_at_20"] for run in finished))
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["sweep/jobs_finished"] == len(finished)
    assert parent.data.metrics["sweep/jobs_failed"] == len(failed)
    assert parent.data.params["sweep.direction"] == "maximize"
    assert "optimization_results.yaml" in {
        a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow  # a whole sweep in a subprocess
def test_a_failed_grid_job_fails_the_sweep_and_ends_its_parent_run_failed(tmp_path, store_uri):
    tiny = [o for o in tiny_overrides(tmp_path / "data") if not o.startswith("train.batch_size")]
    result = seqexp(["-m", "model=pop", "train.batch_size=16,0", *tiny,
                     f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert result.returncode != 0
    _, parent, children = sweep_runs(tmp_path / "mlflow.db")
    assert parent.info.status == "FAILED"
    jobs = {c.data.tags["sweep_job"]: c for c in children}
    assert jobs["0"].info.status == "FINISHED" and jobs["0"].data.params["train.batch_size"] == "16"
    assert jobs["1"].info.status == "FAILED"
    assert "train.batch_size=0 must be an integer >= 1" in jobs["1"].data.tags["error"]
