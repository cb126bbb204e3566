"""What the MLflow UI shows of seqexp's runs: the experiment's kind (the page it opens on), each
split as a dataset input, MLflow's source tags, system metrics, and run names without the keys
that do not change results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from helpers import compose_config, sequences, tiny_overrides
from seqexp.core.resources import config_dir
from seqexp.run.datasets import split_counts
from seqexp.run.experiment import run_experiment
from seqexp.run.naming import run_name
from seqexp.run.sweep import SweepCallback, end_open_sweeps
from seqexp.run.tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    Tracker,
    entry_point,
    git_tags,
    runs_view_key,
    ui_hint,
)


def pop_run(tmp_path: Path, folder: str, extra: list[str] = (), file: Path | None = None):
    """A tiny popularity run (no training) in tmp_path/mlflow.db (the store_uri fixture's copy
    of an empty store: creating one takes seconds), on the synthetic data or on a CSV file; its
    MLflow run."""
    store = [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    data = (tiny_overrides(tmp_path / "data") if file is None else
            ["dataset=csv", f"dataset.path={file}", "train.progress=false",
             f"paths.data_dir={tmp_path / 'data'}"])
    cfg = compose_config(["model=pop", *data, *store, *extra])
    result = run_experiment(cfg, launch_dir=tmp_path, output_dir=tmp_path / folder)
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.run_id)


def datasets_by_context(run) -> dict[str, object]:
    found = {}
    for given in run.inputs.dataset_inputs:
        contexts = [t.value for t in given.tags if t.key == "mlflow.data.context"]
        assert len(contexts) == 1, given.tags
        found[contexts[0]] = given.dataset
    return found


def test_a_new_experiment_is_marked_as_model_training(store_uri):
    tracker = Tracker(store_uri, "fresh")
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND == (
        "custom_model_development")


def test_an_existing_experiment_gets_a_kind_only_when_it_has_none(store_uri):
    client = MlflowClient(store_uri)
    bare = client.create_experiment("made-by-hand")
    genai = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker(store_uri, "made-by-hand")
    Tracker(store_uri, "genai")
    assert client.get_experiment(bare).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert client.get_experiment(genai).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_reader_leaves_the_experiment_alone(store_uri):
    client = MlflowClient(store_uri)
    bare = client.create_experiment("read-only")
    Tracker(store_uri, "read-only", create=False)
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(bare).tags


@pytest.mark.parametrize(("uri", "experiment_id", "expected"), [
    ("sqlite:////abs/mlflow.db", "3",
     "MLflow UI: mlflow ui --backend-store-uri sqlite:////abs/mlflow.db, then open "
     "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
     "&viewStateShareKey=seqexp-at-20"),
    ("http://mlflow.example:5000", "17",
     "MLflow UI: open http://mlflow.example:5000/#/experiments/17/runs?workflowType="
     "machine_learning&viewStateShareKey=seqexp-at-20"),
    ("https://mlflow.example/team/", "8",
     "MLflow UI: open https://mlflow.example/team/#/experiments/8/runs?workflowType="
     "machine_learning&viewStateShareKey=seqexp-at-20"),
])
def test_the_ui_hint_lands_on_the_experiments_runs_table(uri, experiment_id, expected):
    # without ?workflowType=machine_learning MLflow 3.17.2's UI opens on the GenAI overview;
    # the bare experiment address redirects to /runs and drops the view key
    assert ui_hint(uri, experiment_id, 20) == expected


def test_a_run_stores_the_view_its_address_names(store_uri):
    tracker = Tracker(store_uri, "viewed")
    tracker.show_runs_view(10)
    tags = MlflowClient(store_uri).get_experiment(tracker.experiment_id).tags
    view = json.loads(tags[f"mlflow.sharedViewState.{runs_view_key(10)}"])
    assert view["orderByKey"] == "metrics.`epoch/test/mrr_at_10`" and view["orderByAsc"] is False
    assert view["selectedColumns"][:6] == [
        "tags.`model`", "tags.`dataset`", "tags.`seed`", "metrics.`epoch/test/mrr_at_10`",
        "metrics.`epoch/test/recall_at_10`", "metrics.`epoch/test/ndcg_at_10`"]
    assert f"viewStateShareKey={runs_view_key(10)}" in ui_hint(store_uri, "1", 10)


def test_runs_log_their_splits_as_datasets_whose_digest_follows_the_data(tmp_path, store_uri,
                                                                           one_torch_thread):
    first = pop_run(tmp_path, "a")
    again = pop_run(tmp_path, "b", ["seed=5"])  # another seed: the same data
    filtered = pop_run(tmp_path, "c", ["dataset.min_item_support=3"])
    runs = [datasets_by_context(run) for run in (first, again, filtered)]
    assert all(set(found) == {"training", "validation", "test"} for found in runs)
    splits = runs[0]
    assert {d.name for d in splits.values()} == {"synthetic"}
    assert len({d.digest for d in splits.values()}) == 3  # MLflow keeps one per name and digest
    for context in splits:
        assert runs[1][context].digest == splits[context].digest
        assert runs[2][context].digest != splits[context].digest
    params = first.data.params
    for context, phase in (("training", "train"), ("validation", "val"), ("test", "test")):
        profile = json.loads(splits[context].profile)
        assert profile["events"] == int(params[f"data.{phase}_events"]) > 0
        assert 0 < profile["users"] <= int(params["data.n_users"])
        assert 0 < profile["items"] <= int(params["data.n_items"])
    assert json.loads(splits["training"].profile)["users"] == int(params["data.n_users"])
    assert json.loads(splits["training"].profile)["items"] == int(params["data.n_items"])
    schema = json.loads(splits["test"].schema)["mlflow_colspec"]
    assert [c["name"] for c in schema] == ["user", "item", "timestamp"]
    source = json.loads(splits["training"].source)
    assert splits["training"].source_type == "code"
    assert source["tags"]["n_users"] == "40" and source["tags"]["generator_seed"] == "7"


def test_split_counts_are_events_users_and_distinct_items_of_the_split():
    # user 0: train 0 1 | val 2 | test 3; user 1: train 4 5 1 | test 1
    data = sequences([[0, 1, 2, 3], [4, 5, 1, 1]], n_items=6, n_val=[1, 0], n_test=[1, 1])
    assert split_counts(data, "train") == {"events": 5, "users": 2, "items": 4}
    assert split_counts(data, "val") == {"events": 1, "users": 1, "items": 1}
    assert split_counts(data, "test") == {"events": 2, "users": 2, "items": 2}


def test_a_raw_files_datasets_name_the_file_and_follow_its_content(tmp_path, store_uri,
                                                                    one_torch_thread):
    events = tmp_path / "events.csv"

    def write(shift: int) -> None:
        rows = ["user,item,timestamp"]
        rows += [f"u{u},x{(u + t + shift) % 12},{1000 * u + t}" for u in range(30)
                 for t in range(10)]
        events.write_text("\n".join(rows) + "\n")

    write(0)
    first = datasets_by_context(pop_run(tmp_path, "a", file=events))
    same = datasets_by_context(pop_run(tmp_path, "b", ["seed=5"], file=events))
    write(1)  # other items: another file, another SHA-256
    changed = datasets_by_context(pop_run(tmp_path, "c", file=events))
    training = first["training"]
    # user_tail: the last 2 of each user's 10 events are test, no validation event (10 % of 8)
    counts = {context: {k: json.loads(d.profile)[k] for k in ("events", "users", "items")}
              for context, d in first.items()}
    assert counts == {"training": {"events": 240, "users": 30, "items": 12},
                      "validation": {"events": 0, "users": 0, "items": 0},
                      "test": {"events": 60, "users": 30, "items": 12}}
    assert training.name == "csv" and training.source_type == "local"
    assert json.loads(training.source)["uri"] == events.resolve().as_uri()
    assert same["training"].digest == training.digest != changed["training"].digest
    assert json.loads(training.profile)["sha256"] != json.loads(
        changed["training"].profile)["sha256"]


def test_runs_carry_mlflows_source_tags(tmp_path, store_uri, monkeypatch, one_torch_thread):
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/seqexp", "model=pop"])
    tags = pop_run(tmp_path, "a").data.tags
    assert tags["mlflow.source.name"] == "seqexp"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"]
    sha = git_tags()["git_sha"]
    assert sha != "unknown" and tags["mlflow.source.git.commit"] == sha == tags["git_sha"]


def test_a_sweeps_parent_run_carries_the_source_tags_in_a_model_training_experiment(
        tmp_path, store_uri, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/seqexp", "-m", "seed=1,2"])
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True, overrides=[
            f"mlflow.tracking_uri={store_uri}", "mlflow.experiment=sweeps",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    OmegaConf.update(cfg, "hydra.runtime.cwd", str(tmp_path))
    callback = SweepCallback()
    callback.on_multirun_start(cfg)
    client = MlflowClient(store_uri)
    # before end_open_sweeps, whose Tracker would give the experiment a kind it lacked
    experiment = client.get_experiment(callback.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    end_open_sweeps("KILLED")
    tags = client.get_run(callback.info.parent_run_id).data.tags
    assert tags["seqexp.role"] == "sweep"
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("seqexp", "LOCAL")
    assert tags["mlflow.source.git.commit"] == tags["git_sha"] and tags["mlflow.user"]


@pytest.mark.parametrize(("argv0", "expected"), [
    ("/venv/bin/seqexp", "seqexp"),
    ("/venv/bin/seqexp-report", "seqexp-report"),
    (str(Path(__file__).parents[1] / "seqexp" / "apps" / "cli.py"), "seqexp"),  # python -m
    ("/usr/bin/pytest", "pytest"),
    ("", "python"),
])
def test_the_entry_point_is_the_command_a_user_typed(argv0, expected):
    assert entry_point(argv0) == expected


def test_a_user_tag_given_by_the_caller_is_kept(store_uri):
    tracker = Tracker(store_uri, "x")
    run_id = tracker.start("r", {"mlflow.user": "alice"})
    assert tracker.client.get_run(run_id).data.tags["mlflow.user"] == "alice"


# 0.1 s: the monitor's own samples (and the last); an hour: only what seqexp logs as the run
# ends, which MLflow's monitor would drop, so that a short run still has its system metrics.
@pytest.mark.parametrize("interval_s", ["0.1", "3600"])
def test_system_metrics_are_logged_when_asked_for(tmp_path, store_uri, monkeypatch, interval_s,
                                                  one_torch_thread):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", interval_s)
    metrics = pop_run(tmp_path, "on", ["mlflow.system_metrics=true"]).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics
    off = pop_run(tmp_path, "off").data.metrics
    assert not [key for key in off if key.startswith("system/")]


def test_run_names_leave_out_keys_that_do_not_change_results():
    overrides = ["model=gru", "dataset=lastfm", "train.lr=0.01", "train.progress=false",
                 "train.num_threads=2", "device=cpu", "paths.data_dir=/d", "mlflow.experiment=e",
                 "train.compile=true", "train.tf32=false", "eval.batch_users=64",
                 "eval.max_block_elements=100", "model.eval_chunk=8", "eval.save_ranks=false",
                 "dataset.path=/x.csv", "resume=last", "+hydra.job.chdir=true", "seed=3",
                 "model.hidden_size=16", "~dataset.verify"]
    assert run_name("gru", "lastfm", overrides) == (
        "gru-lastfm-dataset.verify,model.hidden_size=16,seed=3,train.lr=0.01")
