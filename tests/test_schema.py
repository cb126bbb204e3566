"""seqexp/core/schema.py drives the rest: resume and the report agree on what the same
configuration is, `seqexp --help` and the preflight's suggestions come from its keys, and
docs/configuration.md's key reference is its generated text."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import compose_config
from seqexp.analysis.table import RunRecord, build_table
from seqexp.apps.cli import config_keys_help
from seqexp.apps.preflight import unknown_key_message
from seqexp.core import schema
from seqexp.core.flat_config import flatten
from seqexp.models.dream import DREAM
from seqexp.models.knn import ItemKNN
from seqexp.run.registry import (
    BUILTIN_CLASSES,
    ModelClass,
    affects_results,
    class_path,
    keys_of,
    model_tables,
    registry,
    results_free_keys,
)
from seqexp.run.resume import differing_keys

ROOT = Path(__file__).resolve().parents[1]
# The keys issue 22 names as ones that cannot change results (the raw file's sha256 is
# compared instead of dataset.path).
NOT_RESULTS = ["device", "resume", "paths.data_dir", "paths.raw_dir", "paths.cache_dir",
               "mlflow.tracking_uri", "mlflow.experiment", "mlflow.run_name",
               "mlflow.log_checkpoint", "dataset.path", "train.num_threads", "train.progress",
               "train.compile", "train.tf32", "eval.batch_users", "eval.max_block_elements",
               "model.eval_chunk", "eval.save_ranks"]


@pytest.mark.parametrize("key", NOT_RESULTS)
def test_keys_about_where_and_how_fast_do_not_change_results(key):
    assert not affects_results(key)


@pytest.mark.parametrize("key", ["seed", "train.lr", "train.amp", "model.hidden_size",
                                 "dataset.min_item_support", "split.test_frac", "eval.cutoffs",
                                 "model.added_by_a_plus", "dataset.archive_member"])
def test_keys_of_what_is_computed_change_results(key):
    assert affects_results(key)


def test_a_whole_group_that_changes_no_results_covers_keys_the_schema_lacks():
    assert not schema.affects_results("paths.scratch_dir")
    assert not schema.affects_results("mlflow.nested.key")


def test_every_table_of_a_group_marks_a_leaf_alike():
    mixed = sorted(key for key, entries in schema.every_key(model_tables()).items()
                   if len({e.affects_results for e in entries}) > 1)
    assert mixed == []
    for group in schema.GROUPS.values():
        if not group.affects_results:
            assert not any(e.affects_results for t in group.tables.values() for e in t.values())


# ------------------------------------------------------------------- the same configuration
def _params(**changes: str) -> dict[str, str]:
    """A composed config flattened as a run logs it, with `changes` (dotted keys)."""
    params = flatten(OmegaConf.to_container(compose_config(["model=gru"]), resolve=True))
    return params | {"data.n_users": "200"} | {k.replace("__", "."): v for k, v in changes.items()}


def _config(params: dict[str, str]) -> dict[str, str]:
    """What resume compares with a run's params: the flattened config, without the data.*
    statistics the run logged besides it."""
    return {k: v for k, v in params.items() if not k.startswith("data.")}


def _run(name: str, seed: int, mrr: float, params: dict[str, str]) -> RunRecord:
    """A run as the report reads it, with the keys its model marks (RESULTS_FREE_TAG)."""
    return RunRecord(name, "gru", "synthetic", params | {"seed": str(seed)},
                     {"test_mrr_at_20": mrr, "test_recall_at_20": mrr * 2},
                     results_free=frozenset(results_free_keys(params)))


def test_runs_differing_only_where_and_how_fast_they_ran_are_one_configuration():
    first = _params()
    second = _params(train__compile="True", model__eval_chunk="8",
                     dataset__path="/elsewhere/events.csv", train__tf32="False",
                     eval__batch_users="16", device="cuda", paths__data_dir="/scratch")
    # resumable into each other
    assert differing_keys(_config(second), first) == []
    assert differing_keys(_config(first), second) == []
    # one row of the report, the two runs averaged as seeds
    table = build_table([_run("a", 1, 0.1, first), _run("b", 2, 0.3, second)], {},
                        defaults=lambda model, dataset: None)
    assert [row.label for row in table.rows] == ["gru"]
    cell = table.rows[0].cells[("synthetic", "mrr_at_20")]
    assert cell.n == 2 and cell.mean == pytest.approx(0.2)


def test_runs_differing_in_the_learning_rate_are_two_configurations():
    first, other = _params(), _params(train__lr="0.01")
    assert differing_keys(_config(other), first) == ["train.lr"]
    table = build_table([_run("a", 1, 0.1, first), _run("b", 2, 0.3, other)], {},
                        defaults=lambda model, dataset: None)
    assert sorted(row.label for row in table.rows) == ["gru (train.lr=0.001)",
                                                      "gru (train.lr=0.01)"]


def test_runs_on_different_raw_files_are_two_configurations_in_the_report():
    first = _params(dataset__path="/a.csv") | {"data.sha256": "aaa"}
    other = _params(dataset__path="/b.csv") | {"data.sha256": "bbb"}
    table = build_table([_run("a", 1, 0.1, first), _run("b", 2, 0.3, other)], {},
                        defaults=lambda model, dataset: None)
    assert len(table.rows) == 2


# --------------------------------------------------------------- help, preflight and docs
def test_help_lists_every_key_of_the_composed_config_with_its_doc():
    cfg = compose_config(["model=dream", "dataset=ml10m"])
    lines = config_keys_help(cfg).splitlines()
    keys = keys_of(cfg)
    assert len(lines) == len(keys)
    for line, (key, entry) in zip(lines, keys.items(), strict=True):
        assert line.split()[0] == key and line.endswith(entry.doc)
        assert ("~" in line.split(key, 1)[1].split(entry.doc)[0]) == (not entry.affects_results)


def test_the_help_page_shows_the_listing_of_the_command_lines_config():
    result = subprocess.run([sys.executable, "-m", "seqexp.apps.cli", "--help", "model=dream"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = DREAM.config_keys["pooling"].doc
    assert any(line.split()[:1] == ["model.pooling"] and line.endswith(doc)
               for line in result.stdout.splitlines())
    assert "paths.data_dir" in result.stdout and "$SEQEXP_DATA_DIR" in result.stdout


def test_the_registry_knows_seqexps_classes_by_path_and_reads_their_own_keys():
    """Every built-in class path loads a Recommender of that path whose config_keys the
    registry's table for its models is (MODEL_KEYS aside); every model file names a registered
    class."""
    for path in BUILTIN_CLASSES:
        cls = ModelClass(path).load()
        assert class_path(cls) == path and ModelClass(path).config_keys() is cls.config_keys
    for name, path in registry().models.items():
        if path in BUILTIN_CLASSES:
            table = registry().model_keys(name)
            assert {k: table[k] for k in ModelClass(path).load().config_keys} == dict(
                ModelClass(path).load().config_keys)
    assert set(registry().models.values()) <= set(registry().classes)


def test_did_you_mean_comes_from_the_schemas_keys(monkeypatch):
    cfg = compose_config(["model=itemknn"])
    monkeypatch.setattr(ItemKNN, "config_keys", ItemKNN.config_keys | {
        "shrinkage": schema.Key(schema.number(0.0), "a key only the schema has")})
    message = unknown_key_message(cfg, "model.shrinkag")
    assert "did you mean model.shrinkage?" in message and "shrinkage" in message.split("(")[1]


def test_the_key_reference_of_the_docs_is_the_generated_one():
    spec = importlib.util.spec_from_file_location("config_reference",
                                                  ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    document = (ROOT / "docs" / "configuration.md").read_text()
    assert module.with_reference(document) == document, \
        "run python scripts/config_reference.py"
    for key in ("train.lr", "model.pooling", "dataset.layout", "paths.data_dir"):
        leaf = key.split(".", 1)[1]
        assert f"| `{key}` |" in document or f"`{leaf}`" in document
