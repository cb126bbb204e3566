"""End to end: the `seqexp` command, its MLflow record, determinism, Ctrl-C, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import compose_config, tiny_overrides
from seqexp.engine.trainer import Trainer
from seqexp.run.experiment import run_experiment


def seqexp(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "seqexp.apps.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def only_run(db: Path):
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("seqexp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.slow  # tests/test_artifact_locations.py runs seqexp end to end by default
def test_seqexp_run_is_recorded_in_mlflow_db_of_the_launch_directory(tmp_path):
    result = seqexp(["model=gru", "model.hidden_size=16", *tiny_overrides(tmp_path / "data")],
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    client, run = only_run(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == (
        "gru-synthetic-dataset.max_events=20,dataset.min_events=10,dataset.n_items=50,"
        "dataset.n_users=40,model.hidden_size=16,train.batch_size=16,train.epochs=2")
    m, p, tags = run.data.metrics, run.data.params, run.data.tags
    # MLflow's names: one section per group (seqexp.core.metric_names)
    for key in ("epoch/test/mrr_at_20", "epoch/test/recall_at_20", "test/mrr_at_5",
                "test_ties/mrr_at_20_optimistic",
                "test_ties/mrr_at_20_expected", "epoch/train_loss", "epoch/time/train_events_per_s",
                "run/test_oov_dropped", "run/best_epoch", "test_by_history/q1_mrr_at_20"):
        assert key in m, key
    assert "test/mrr_at_20" not in m  # the headline is logged once, under epoch/test/
    assert 0.0 <= m["epoch/test/mrr_at_20"] <= m["epoch/test/recall_at_20"] <= 1.0
    history = client.get_metric_history(run.info.run_id, "epoch/val_mrr_at_20")
    assert sorted(h.step for h in history) == [1, 2]
    assert p["train.epochs"] == "2" and p["model.hidden_size"] == "16"
    assert p["model.name"] == "gru" and p["split.test_frac"] == "0.2"
    assert p["data.n_users"] == "40" and int(p["data.test_events"]) > 0
    assert (tags["model"], tags["dataset"], tags["split"], tags["seed"]) == (
        "gru", "synthetic", "user_tail", "42")
    # seqexp's own commit, although the run was launched outside its checkout
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True).stdout.strip()
    assert tags["git_sha"] == head and tags["git_dirty"] in ("true", "false")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "checkpoints", ".hydra"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        "checkpoints/best.pt"]
    local = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path)))
    assert json.loads(local.read_text())["test_mrr_at_20"] == pytest.approx(
        m["epoch/test/mrr_at_20"])
    # Hydra's run folder stays under outputs/ of the launch directory
    assert list((tmp_path / "outputs").glob("*/*/.hydra/config.yaml"))


def _run_in_process(tmp_path: Path, name: str, extra: list[str]):
    cfg = compose_config(["model=gru", "model.hidden_size=12",
                          *tiny_overrides(tmp_path / "data", tmp_path / "mlflow.db"), *extra])
    return run_experiment(cfg, launch_dir=tmp_path, output_dir=tmp_path / name)


@pytest.mark.slow  # three runs
def test_two_cpu_runs_with_one_seed_give_identical_metrics(tmp_path):
    first = _run_in_process(tmp_path, "a", ["seed=3"])
    second = _run_in_process(tmp_path, "b", ["seed=3"])
    other = _run_in_process(tmp_path, "c", ["seed=4"])
    assert first.metrics == second.metrics
    assert first.metrics["test_mrr_at_20"] != other.metrics["test_mrr_at_20"]


def test_the_monitored_metric_picks_the_best_epoch(tmp_path):
    """train.monitor=recall_at_20: the best epoch is the first with the highest validation
    Recall@20, logged as run/best_val_recall_at_20 (with seed 1 here the validation MRR@20
    peaks at a later epoch, so monitoring MRR would pick another one)."""
    result = _run_in_process(tmp_path, "run", ["train.monitor=recall_at_20", "train.epochs=4",
                                               "train.patience=4", "seed=1"])
    client, run = only_run(tmp_path / "mlflow.db")
    recall = [h.value for h in sorted(client.get_metric_history(
        run.info.run_id, "epoch/val_recall_at_20"), key=lambda h: h.step)]
    assert len(recall) == 4 and run.data.params["train.monitor"] == "recall_at_20"
    assert run.data.metrics["run/best_val_recall_at_20"] == max(recall) == result.val_score
    assert run.data.metrics["run/best_epoch"] == recall.index(max(recall)) + 1
    assert "run/best_val_mrr_at_20" not in run.data.metrics


def test_ctrl_c_ends_the_run_killed_with_finished_epochs_kept(tmp_path, store_uri, monkeypatch):
    real_epoch = Trainer.train_epoch

    def interrupted_in_epoch_2(self, model, data, optimizer, rng, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, model, data, optimizer, rng, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _run_in_process(tmp_path, "run", ["train.epochs=3"])
    client, run = only_run(tmp_path / "mlflow.db")
    assert run.info.status == "KILLED"
    history = client.get_metric_history(run.info.run_id, "epoch/val_mrr_at_20")
    assert [h.step for h in history] == [1]
    assert "epoch/test/mrr_at_20" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        "checkpoints/best.pt"]
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_INPUTS = {
    "missing file": (["dataset=ml10m", "dataset.path=/nonexistent/ratings.dat"],
                     "dataset.path=/nonexistent/ratings.dat"),
    "wrong format": (["dataset=ml10m", "dataset.path={tmp}/notes.txt"], "notes.txt"),
    "empty after filtering": (["dataset=csv", "dataset.path={tmp}/few.csv",
                               "dataset.min_item_support=50"], "min_item_support"),
    "csv without path": (["dataset=csv"], "dataset.path"),
    "unknown model": (["model=gru5"], "model=gru5"),
    "unknown dataset": (["dataset=ml30m"], "dataset=ml30m"),
    "invalid split fraction": (["split.test_frac=1.5"], "split.test_frac"),
    "invalid epochs": (["train.epochs=-1"], "train.epochs"),
    "unknown optimizer": (["train.optimizer=rmsprop"], "train.optimizer"),
    "misspelt key": (["train.epoch=3"], "train.epoch is not a config key; did you mean "
                                        "train.epochs? (train keys: amp, batch_size,"),
    "misspelt key added": (["+train.epoch=3"], "+train.epoch=3: nothing would read it; "
                                               "train.epoch is not a config key; did you mean "
                                               "train.epochs?"),
    "misspelt model key": (["model.hiden_size=3"], "did you mean model.hidden_size?"),
    "model key in a sweep over models": (
        ["-m", "model=gru,itemknn", "model.hidden_size=32"],
        "model.hidden_size: model=itemknn has no such key (it is a key of model=gru)"),
    "forced model key in a sweep over models": (
        ["-m", "model=gru,itemknn", "++model.hidden_size=32"],
        "model.hidden_size: model=itemknn has no such key"),
    "optuna without validation": (["hparams_search=optuna", "split.val_frac=0"],
                                  "split.val_frac=0 leaves no validation events"),
}


# Each case is a subprocess of its own: the default suite keeps one per kind of check.
SLOW_CASES = {"unknown optimizer", "csv without path", "invalid epochs", "wrong format",
              "invalid split fraction", "forced model key in a sweep over models"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES
                                  else c for c in BAD_INPUTS])
def test_bad_input_gives_one_line_and_leaves_nothing_behind(tmp_path, case):
    args, expected = BAD_INPUTS[case]
    _write(tmp_path / "notes.txt", "just some notes\nnot ratings\n")
    _write(tmp_path / "few.csv", "user,item,timestamp\n1,a,1\n1,b,2\n2,a,3\n2,c,4\n")
    data_dir = tmp_path / "data"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = seqexp([*args, "train.progress=false", f"paths.data_dir={data_dir}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("seqexp: error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-1500:]
    assert not (tmp_path / "mlflow.db").exists()
    processed = data_dir / "processed"
    assert not processed.exists() or list(processed.iterdir()) == []


SAMPLE_CSV = Path(__file__).resolve().parents[1] / "docs" / "sample-events.csv"


@pytest.mark.slow  # a whole run through the CLI
def test_the_shipped_sample_csv_runs_with_the_readmes_command(tmp_path):
    """README: `seqexp model=itemknn dataset=csv dataset.path=docs/sample-events.csv
    dataset.item_col=song`, from the clone's root (here a copy of the file at that path)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = ("seqexp model=itemknn dataset=csv dataset.path=docs/sample-events.csv "
               "dataset.item_col=song")
    assert command in readme
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "sample-events.csv").write_bytes(SAMPLE_CSV.read_bytes())
    result = seqexp([*command.split()[1:], f"paths.data_dir={tmp_path / 'data'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finished (itemknn on csv): test_mrr_at_20=" in result.stdout
    client, run = only_run(tmp_path / "mlflow.db")
    p = run.data.params
    assert (p["data.n_users"], run.data.tags["dataset"]) == ("40", "csv")
    assert int(p["data.train_events"]) + int(p["data.val_events"]) + int(
        p["data.test_events"]) == 600
    m = run.data.metrics
    assert 0 < m["epoch/test/mrr_at_20"] <= m["epoch/test/recall_at_20"] < 1


def test_a_csv_file_of_ones_own_runs_as_the_readme_shows(tmp_path):
    """docs/data.md: `seqexp ... dataset=csv dataset.path=events.csv dataset.item_col=song`, a
    file with a header, columns named in config; every count and the test metrics read back
    from MLflow."""
    rows = ["user,song,timestamp"]
    for user in range(30):  # 10 events each, on a cycle of 12 items
        rows += [f"u{user},x{(user + t) % 12},{1000 * user + t}" for t in range(10)]
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    result = seqexp(["dataset=csv", "dataset.path=events.csv", "dataset.item_col=song",
                     "model=itemknn", "train.progress=false",
                     f"paths.data_dir={tmp_path / 'data'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    client, run = only_run(tmp_path / "mlflow.db")
    p, m = run.data.params, run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["dataset"] == "csv"
    assert p["dataset.path"] == "events.csv" and p["dataset.item_col"] == "song"
    # user_tail: the last 20 % of each user's 10 events are test (2); 10 % of the other 8 is
    # under one event, so no validation event
    assert (p["data.n_users"], p["data.n_items"]) == ("30", "12")
    assert (p["data.train_events"], p["data.val_events"], p["data.test_events"]) == (
        "240", "0", "60")
    # every next item is the one after the last in the cycle, the top neighbour of item-kNN
    assert m["test/n_events"] == 60 and m["run/test_oov_dropped"] == 0
    assert 0 < m["epoch/test/mrr_at_20"] <= m["test_ties/mrr_at_20_expected"] <= m[
        "test_ties/mrr_at_20_optimistic"] <= 1
    local = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path)))
    assert json.loads(local.read_text())["test_mrr_at_20"] == pytest.approx(
        m["epoch/test/mrr_at_20"])
