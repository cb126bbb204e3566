"""The config schema: every key's rule (type, allowed values or range), its one-line doc and
whether it changes a run's results, in one table per group (docs/configuration.md, "Key
reference", is generated from it).

The defaults are not here: they are the choices of conf/ (each model preset has its own
values). Everything else about a key is, and drives:
- `check_config`: every value refused before any work, with one line naming the key;
- `affects_results`: which keys make two runs different configurations, for both resume
  (seqexp/run/resume.py) and the report's seeds-of-one-configuration (seqexp/analysis/table.py);
- the key suggestions of the command-line check (seqexp/apps/preflight.py), the key listing of
  `seqexp --help` (seqexp/apps/cli.py) and the reference section of docs/configuration.md
  (scripts/config_reference.py).

This module sits in seqexp.core so that the report, which must not import torch, the models or
the data pipeline, can ask `affects_results`. A choice whose options are defined by the code
that implements them (the trainer's optimisers, the recurrent cells, a reader's
layouts) names that list (`listed("cells")`) instead of copying it; seqexp/run/options.py, the
one module above all those layers, passes the lists in (`VALUE_LISTS`). A model's keys are
declared by its class (`config_keys`, seqexp/models/base.py) and handed in the same way
(`ModelTables`, from the registry of models, seqexp/run/registry.py), with the checks that
tie several of its keys together (`config_checks`: model.n_heads must divide
model.hidden_size).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from seqexp.core.errors import SeqexpError
from seqexp.core.rank_metrics import PER_EVENT

# {list name: its options}: the implementations' lists that `listed` rules name.
ValueLists = Mapping[str, Sequence[str]]
# A check that ties several keys of a model block together: the block (plain containers,
# each present key past its own rule) -> None, or one line naming the keys and what to do.
ModelCheck = Callable[[Mapping[str, Any]], str | None]


@dataclass(frozen=True)
class Rule:
    """What a key's value must be; `check(value)` is False when it is not. A rule with
    `listed` set is a choice among the options of that value list."""

    requirement: str  # completes "<key>=<value> must ..."
    check: Callable[[Any], bool]
    nullable: bool = False
    listed: str | None = None  # the name of the value list its options come from

    def bound(self, values: ValueLists) -> Rule:
        """The rule with a named list's options filled in."""
        if self.listed is None:
            return self
        return choice(*values[self.listed], nullable=self.nullable)

    def describe(self, values: ValueLists) -> str:
        """"must ..." as a text of its own, e.g. `be an integer >= 1 (or null)`."""
        rule = self.bound(values)
        return f"{rule.requirement}{' (or null)' if rule.nullable else ''}"

    def complain(self, key: str, value: Any, values: ValueLists) -> None:
        rule = self.bound(values)
        if value is None and rule.nullable:
            return
        if not rule.check(value):
            raise SeqexpError(f"{key}={value!r} must {rule.describe(values)}"
                              f"{_integer_hint(rule, value)}")


def _integer_hint(rule: Rule, value: Any) -> str:
    """For a whole number given as a float where an integer is due (Hydra reads 1e10 as a
    float), how to write it."""
    if isinstance(value, float) and value.is_integer() and "integer" in rule.requirement:
        return f"; write {int(value)}, without a decimal point or exponent"
    return ""


@dataclass(frozen=True)
class Key:
    """One config key: its rule, what it does (one line) and whether a different value can
    change what a run computes (False: where it runs, how fast, what it shows or logs)."""

    rule: Rule
    doc: str
    affects_results: bool = True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def integer(low: int, high: int | None = None, nullable: bool = False) -> Rule:
    bounds = f"be an integer >= {low}" if high is None else f"be an integer in [{low}, {high}]"
    return Rule(bounds, lambda v: _is_int(v) and v >= low and (high is None or v <= high),
                nullable)


def number(low: float = -math.inf, high: float = math.inf, low_open: bool = False,
           high_open: bool = False, nullable: bool = False) -> Rule:
    """A finite number (never nan or inf) within the bounds."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    if high == math.inf:
        text = f"be a finite number {'>' if low_open else '>='} {low:g}"
    else:
        text = f"be a number in {left}{low:g}, {high:g}{right}"

    def ok(v: Any) -> bool:
        return (_is_number(v) and (v > low if low_open else v >= low)
                and (v < high if high_open else v <= high))
    return Rule(text, ok, nullable)


def flag() -> Rule:
    return Rule("be true or false", lambda v: isinstance(v, bool))


def choice(*options: str, nullable: bool = False) -> Rule:
    return Rule(f"be one of {', '.join(options)}", lambda v: v in options, nullable)


def listed(name: str, nullable: bool = False) -> Rule:
    """One of the options of the value list `name` (see the module's docstring)."""
    return Rule(f"be one of {name}", lambda v: False, nullable, listed=name)


def text(nullable: bool = False, pattern: str | None = None, what: str = "be a text") -> Rule:
    return Rule(what, lambda v: isinstance(v, str) and v != "" and (
        pattern is None or re.fullmatch(pattern, v) is not None), nullable)


def integers(low: int) -> Rule:
    return Rule(f"be a non-empty list of integers >= {low}",
                lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                and all(_is_int(x) and x >= low for x in v))


def _speed(rule: Rule, doc: str) -> Key:
    """A key that says where or how fast a run runs, or what it shows: not its results."""
    return Key(rule, doc, affects_results=False)


# ------------------------------------------------------------------------------ the tables
TOP: dict[str, Key] = {
    "seed": Key(integer(0, 2**32 - 1), "seed of every random draw (data order, dropout, "
                "initialisation, sampling)"),
    "device": _speed(text(pattern="auto|cpu|cuda(:[0-9]+)?", what="be auto, cpu, cuda or cuda:N"),
                     "auto (CUDA when available, else CPU), cpu, cuda or cuda:N"),
    # a run id or "last" (seqexp/run/resume.py); a run id of digits only reaches here as an int
    "resume": _speed(Rule("be a run id or last", lambda v: (isinstance(v, str) and v != "")
                          or _is_int(v), nullable=True),
                     "continue an unfinished run: its MLflow run id, or last"),
}

# What train.monitor may name: a ranking metric of the evaluator at a cutoff (the pessimistic
# one, the headline; seqexp/core/rank_metrics.py defines them).
MONITORED = f"({'|'.join(PER_EVENT)})_at_[1-9][0-9]*"

TRAIN: dict[str, Key] = {
    "epochs": Key(integer(0), "maximum epochs (a model file may set its own)"),
    "batch_size": Key(integer(1), "sequences (RNNs), basket rows (dream) or events (BPR) per step"),
    "lr": Key(number(0.0, low_open=True), "learning rate"),
    "optimizer": Key(listed("optimizers"),
                     "torch.optim optimiser or lazy_adam, with lr and weight_decay"),
    "weight_decay": Key(number(0.0), "the optimiser's L2 term"),
    "grad_clip": Key(number(0.0, low_open=True, nullable=True),
                     "gradient-norm cap (null = none)"),
    "monitor": Key(text(pattern=MONITORED, what="be mrr_at_<k>, recall_at_<k> or ndcg_at_<k> "
                        "(k: one of eval.cutoffs)"),
                   "the validation metric that early stopping, the best checkpoint and "
                   "sweepers follow"),
    "patience": Key(integer(1), "epochs without improvement of the monitored metric before "
                    "early stopping"),
    "min_delta": Key(number(0.0), "least improvement of the monitored metric that resets "
                     "patience"),
    "progress": _speed(flag(), "progress bars, on a terminal only (a log gets one line per "
                                       "epoch)"),
    "num_threads": _speed(integer(1, nullable=True), "CPU threads for torch (null keeps "
                          "torch's default)"),
    "tf32": _speed(flag(), "TF32 tensor cores for float32 products on CUDA"),
    # changes results: the CPU dropout kernel draws other masks than the shared path
    "cpu_kernels": Key(flag(), "the CPU-only kernels of seqexp/models/cpu_kernels.py (false: "
                       "a CPU runs the code path CUDA takes)"),
    "amp": Key(flag(), "bf16 autocast of training (CUDA, CPUs with native bf16); "
               "evaluation stays float32"),
    "compile": _speed(flag(), "torch.compile of the training loss"),
    "keep_last": _speed(flag(), "keep checkpoints/last.pt once the run has finished (resuming "
                        "needs it only while a run is unfinished)"),
}

EVAL: dict[str, Key] = {
    "cutoffs": Key(integers(1), "the k of Recall@k, MRR@k and NDCG@k"),
    "monitor_cutoff": Key(integer(1), "the cutoff of the headline test metrics and of the "
                          "default train.monitor (mrr_at_<k>)"),
    "batch_users": _speed(integer(1, nullable=True), "users per evaluation batch (null: 256 "
                          "on a CPU, 8192 on CUDA)"),
    "max_block_elements": _speed(integer(1, nullable=True), "largest score block scored at "
                                 "once (null: chosen for the device)"),
    "basket_gap_s": Key(number(0.0, nullable=True), "gap in seconds that starts a new test "
                        "basket for next-basket metrics (null = none)"),
    "basket_k": Key(integer(1), "the k of next-basket F1@k and NDCG@k"),
    "exclude_seen": Key(flag(), "items seen before a prediction point are not ranked "
                        "(except the target)"),
    "val_max_scores": Key(integer(1, nullable=True), "validation ranks a fixed sample of "
                          "users (drawn with seed) whose validation events x items stay "
                          "within this many scores (null = every user); test ranks all"),
    "save_ranks": _speed(flag(), "log the per-event test ranks as test_ranks.parquet"),
}

SPLIT: dict[str, dict[str, Key]] = {
    "user_tail": {
        "name": Key(choice("user_tail"), "the split: each user's last events are test"),
        "test_frac": Key(number(0.0, 1.0, low_open=True, high_open=True),
                         "fraction of each user's last events that is test"),
        "val_frac": Key(number(0.0, 1.0, high_open=True), "fraction of the rest's last events "
                        "that is validation"),
    },
    "global_time": {
        "name": Key(choice("global_time"), "the split: events after a time cut are test"),
        "test_quantile": Key(number(0.0, 1.0, low_open=True, high_open=True),
                             "quantile of all timestamps after which events are test"),
        "val_quantile": Key(number(0.0, 1.0, low_open=True, high_open=True),
                            "quantile of the training timestamps after which events are "
                            "validation"),
    },
    "last_session": {
        "name": Key(choice("last_session"), "the split: each user's last session is test, the "
                    "one before it validation"),
        "session_gap_s": Key(number(0.0), "a gap above this many seconds between two events "
                             "of a user starts a session"),
    },
}

_LOCAL_FILE: dict[str, Key] = {
    "name": Key(text(), "the dataset's name (the report's column)"),
    "format": Key(text(), "the reader: movielens, lastfm, tabular or synthetic"),
    # the raw file's sha256 (the param data.sha256) tells which data a run had, wherever it was
    "path": _speed(text(nullable=True), "a local raw file (null = download the archive)"),
    "min_item_support": Key(integer(0), "items with fewer training events are dropped"),
    "drop_repeats": Key(flag(), "drop immediate repeats of the same item"),
}
_PUBLISHED_FILE: dict[str, Key] = _LOCAL_FILE | {
    "url": Key(text(nullable=True), "where the archive is downloaded from"),
    "archive_member": Key(text(nullable=True), "the raw file inside the archive"),
    "archive_size": Key(integer(1, nullable=True), "the archive's size in bytes, checked"),
    "archive_md5": Key(text(nullable=True, pattern="[0-9a-fA-F]{32}",
                            what="be 32 hex digits"), "the archive's md5, checked"),
    "verify": Key(flag(), "check the download's size and md5 (false: a warning)"),
}
DATASET: dict[str, dict[str, Key]] = {
    "movielens": _PUBLISHED_FILE | {
        "layout": Key(listed("movielens_layouts"), "the file's layout"),
        "basket_gap_s": Key(number(0.0), "what a basket is for dream: a gap above this many "
                            "seconds")},
    "lastfm": _PUBLISHED_FILE | {"item": Key(listed("lastfm_items"), "what an item is")},
    "tabular": _LOCAL_FILE | {
        "path": _speed(text(), "the table file (CSV, TSV or Parquet)"),
        "user_col": Key(text(), "the user column"), "item_col": Key(text(), "the item column"),
        "time_col": Key(text(), "the timestamp column"),
        "sep": Key(text(nullable=True), "field separator (null: from the extension)")},
    "synthetic": {
        "name": Key(text(), "the dataset's name (the report's column)"),
        "format": Key(text(), "the reader: synthetic"),
        "n_users": Key(integer(1), "users generated"),
        "n_items": Key(integer(1), "items generated"),
        "n_clusters": Key(integer(1), "item clusters users prefer among"),
        "min_events": Key(integer(1), "fewest events of a user"),
        "max_events": Key(integer(1), "most events of a user"),
        "p_successor": Key(number(0.0, 1.0), "probability that the next event is the "
                           "item's successor"),
        "p_favourite": Key(number(0.0, 1.0), "probability that it is one of the user's "
                           "favourites"),
        "n_favourites": Key(integer(1), "favourites per user"),
        "generator_seed": Key(integer(0), "seed of the generator"),
        "min_item_support": Key(integer(0), "items with fewer training events are dropped"),
        "drop_repeats": Key(flag(), "drop immediate repeats of the same item"),
    },
}

# Where a run is tracked and its files are: never what it computes.
MLFLOW: dict[str, Key] = {
    "tracking_uri": _speed(text(nullable=True), "the MLflow store (null: sqlite mlflow.db "
                           "where seqexp started)"),
    "experiment": _speed(text(), "the MLflow experiment"),
    "run_name": _speed(text(nullable=True), "the run's name (null: from model, dataset and "
                       "overrides)"),
    "log_checkpoint": _speed(flag(), "log the best checkpoint as an artifact where the run "
                             "logs no MLflow Model (which holds it)"),
    "log_model": _speed(flag(), "log the run's model as the MLflow Model runs:/<id>/model "
                        "(mlflow.pyfunc: serve it, register it, seqexp.load it)"),
    "register_model": _speed(text(nullable=True), "register the run's MLflow Model under this "
                             "name in the Model Registry (null: not registered)"),
    "system_metrics": _speed(flag(), "log CPU/GPU utilisation and memory with MLflow's "
                             "system metrics monitor"),
}
PATHS: dict[str, Key] = {
    "data_dir": _speed(text(), "downloads and caches ($SEQEXP_DATA_DIR, else ~/.cache/seqexp)"),
    "raw_dir": _speed(text(), "downloaded archives and raw files"),
    "cache_dir": _speed(text(), "preprocessed data"),
}

# The keys of every model's block; the rest of a model's table is its class's `config_keys`
# (seqexp/models/base.py), handed down by seqexp/run/registry.py as `ModelTables`.
MODEL_KEYS: dict[str, Key] = {
    "name": Key(text(), "the model: its file conf/model/<name>.yaml (the report's row)"),
    "_target_": Key(text(), "the model's class"),
    "_partial_": Key(flag(), "completed with n_items and n_users once the data is loaded"),
}


@dataclass(frozen=True)
class ModelTables:
    """The registered models, as the schema needs them: {name: its key table (MODEL_KEYS and
    its class's keys)}, {name: its class path} and {name: its class's checks of several keys
    together}. Built above the models layer (seqexp/run/registry.py) and handed down, as the
    value lists are."""

    tables: Mapping[str, Mapping[str, Key]]
    targets: Mapping[str, str]
    checks: Mapping[str, Sequence[ModelCheck]] = field(default_factory=dict)


NO_MODELS = ModelTables({}, {})


@dataclass(frozen=True)
class Group:
    """A config group's tables: one, or one per kind when `selector` (a key of the group)
    picks it (the dataset's format, the split's name)."""

    tables: Mapping[str, Mapping[str, Key]]
    selector: str | None = None
    affects_results: bool = True  # False: no key of it does, also one the schema lacks

    def table(self, name: str, node: Mapping) -> Mapping[str, Key]:
        """The table of the group `name` whose config is `node`."""
        if self.selector is None:
            return next(iter(self.tables.values()))
        kind = node.get(self.selector)
        if not isinstance(kind, str) or kind not in self.tables:
            raise SeqexpError(f"{name}.{self.selector}={kind!r} is unknown; choose one of "
                              f"{', '.join(self.tables)}")
        return self.tables[kind]


GROUPS: dict[str, Group] = {
    "train": Group({"": TRAIN}),
    "eval": Group({"": EVAL}),
    "mlflow": Group({"": MLFLOW}, affects_results=False),
    "paths": Group({"": PATHS}, affects_results=False),
    "dataset": Group(DATASET, "format"),
    "split": Group(SPLIT, "name"),
}


def model_table(node: Mapping, models: ModelTables) -> Mapping[str, Key]:
    """The key table of the model block `node`, picked by its name (the file stem of
    conf/model/<name>.yaml); its `_target_` must be that model's class."""
    name = node.get("name")
    if not isinstance(name, str) or name not in models.tables:
        raise SeqexpError(f"model.name={name!r} is not a registered model; choose one of "
                          f"{', '.join(sorted(models.tables))} (a model is named by its file "
                          f"conf/model/<name>.yaml: docs/adding-a-model.md)")
    target = node.get("_target_")
    if target != models.targets[name]:
        raise SeqexpError(f"model._target_={target!r} is not the class of model={name} "
                          f"({models.targets[name]}); select a model with model=<name>")
    return models.tables[name]


def group_table(cfg: Mapping, group: str, models: ModelTables) -> Mapping[str, Key]:
    """One group's key -> Key table for this config (the dataset's by its format, the split's
    by its name, the model's by its name: only this one asks for a model class's keys); {} for
    a name that is no group."""
    if group == "model":
        return model_table(cfg.get("model") or {}, models)
    kind = GROUPS.get(group)
    return kind.table(group, cfg.get(group) or {}) if kind is not None else {}


def group_tables(cfg: Mapping, models: ModelTables) -> dict[str, Mapping[str, Key]]:
    """{group: its key -> Key table} for this config; a group without a table is refused."""
    return {name: group_table(cfg, name, models) for name in [*GROUPS, "model"]}


def keys_of(cfg: Mapping, models: ModelTables) -> dict[str, Key]:
    """{dotted key: Key} of every key this config's tables have."""
    keys = dict(TOP)
    for group, table in group_tables(cfg, models).items():
        keys |= {f"{group}.{leaf}": entry for leaf, entry in table.items()}
    return keys


def key_of(cfg: Mapping, key: str, models: ModelTables) -> Key | None:
    """The entry of a dotted key (`train.lr`, `seed`) in this config, None when it has none."""
    group, _, leaf = key.rpartition(".")
    if not group:
        return TOP.get(leaf)
    return group_table(cfg, group, models).get(leaf)


def every_key(models: ModelTables) -> dict[str, list[Key]]:
    """{dotted key: its entries in every table of its group} (a leaf such as model.window is in
    several model tables)."""
    keys: dict[str, list[Key]] = {key: [entry] for key, entry in TOP.items()}
    tables = [(name, table) for name, group in GROUPS.items() for table in group.tables.values()]
    tables += [("model", table) for table in [MODEL_KEYS, *models.tables.values()]]
    for name, table in tables:
        for leaf, entry in table.items():
            keys.setdefault(f"{name}.{leaf}", []).append(entry)
    return keys


def affects_results(key: str, models: ModelTables = NO_MODELS) -> bool:
    """Whether runs that differ in this flattened key (`train.lr`, `paths.raw_dir`) can differ
    in their results: False for where and how fast a run runs and what it shows. A key the
    schema lacks counts as one that does, unless its whole group does not (paths.*, mlflow.*);
    a model key counts as one that does unless `models` marks it (the report, which loads no
    model class, reads a run's own mark: seqexp/run/tags.py RESULTS_FREE_TAG).
    Resume and the report both ask this, so they agree on what the same configuration is."""
    group, _, leaf = key.partition(".")
    if leaf and group in GROUPS and not GROUPS[group].affects_results:
        return False
    entries = every_key(models).get(key)
    # tests/test_options.py asserts that every table of a group marks a leaf alike
    return entries is None or entries[0].affects_results


def check_config(cfg: Mapping, values: ValueLists, models: ModelTables) -> None:
    """Every key with an entry, then the rules that tie keys together. `cfg`: the resolved
    config as plain containers; `values`: the value lists that `listed` rules name; `models`:
    the registered models' tables. Keys without an entry (an added `+model.x` a constructor
    takes) are left to their reader."""
    for key, entry in TOP.items():
        entry.rule.complain(key, cfg.get(key), values)
    # the model's keys last: its table is its class's, whose module imports torch
    for group in [*GROUPS, "model"]:
        if group == "model":
            _check_together(cfg)
        _check_node(group, cfg.get(group) or {}, group_table(cfg, group, models), values)
    check_model_together(cfg.get("model") or {}, models)


def check_model(node: Mapping, values: ValueLists, models: ModelTables) -> None:
    """A model block alone (a checkpoint's, before its model is built) by the rules the
    command line's goes through: its name's table, each key's type and range, then its
    class's checks of several keys together."""
    _check_node("model", node, model_table(node, models), values)
    check_model_together(node, models)


def check_model_together(node: Mapping, models: ModelTables) -> None:
    """The `config_checks` of the model block's class (its keys past their own rules)."""
    for check in models.checks.get(node.get("name"), ()):
        problem = check(node)
        if problem is not None:
            raise SeqexpError(problem)


def _check_node(group: str, node: Mapping, table: Mapping[str, Key], values: ValueLists
                ) -> None:
    for leaf, entry in table.items():
        if leaf in node:
            entry.rule.complain(f"{group}.{leaf}", node[leaf], values)


def _check_together(cfg: Mapping) -> None:
    mlflow = cfg.get("mlflow") or {}
    if mlflow.get("register_model") is not None and mlflow.get("log_model") is False:
        raise SeqexpError(f"mlflow.register_model={mlflow['register_model']} needs the run's "
                          f"MLflow Model: drop mlflow.log_model=false")
    evaluation, dataset = cfg["eval"], cfg["dataset"]
    if evaluation.get("monitor_cutoff") not in evaluation.get("cutoffs", []):
        raise SeqexpError(f"eval.monitor_cutoff={evaluation.get('monitor_cutoff')} must be one "
                          f"of eval.cutoffs={list(evaluation.get('cutoffs', []))}")
    monitored = [f"{name}_at_{k}" for k in evaluation.get("cutoffs", []) for name in PER_EVENT]
    monitor = (cfg.get("train") or {}).get("monitor")
    if monitor is not None and monitor not in monitored:
        raise SeqexpError(f"train.monitor={monitor!r} must be one of {', '.join(monitored)} "
                          f"(the validation metrics at eval.cutoffs)")
    if dataset.get("format") != "synthetic":
        return
    pairs = [("min_events", "max_events", "must not exceed"),
             ("n_clusters", "n_items", "must not exceed"),
             ("n_favourites", "n_items", "must not exceed")]
    for small, large, relation in pairs:
        if small in dataset and large in dataset and dataset[small] > dataset[large]:
            raise SeqexpError(f"dataset.{small}={dataset[small]} {relation} "
                              f"dataset.{large}={dataset[large]}")
    p_successor, p_favourite = dataset.get("p_successor", 0), dataset.get("p_favourite", 0)
    if p_successor + p_favourite > 1:
        raise SeqexpError(f"dataset.p_successor={p_successor} + dataset.p_favourite="
                          f"{p_favourite} must not exceed 1")
