"""Every config key's rule, one table per group: `check_config` refuses a bad value before any
work starts, with one line naming the key and what it must be.

A key of conf/ without a rule here is a test failure (tests/test_options.py composes every model
and dataset and walks every key), so a new option cannot be added without its check. Model keys
have one table per model class (the `_target_` of conf/model/*.yaml), so nothing outside this
module branches on a model's name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from seqexp.core.errors import SeqexpError
from seqexp.data.lastfm import ITEM_KINDS
from seqexp.data.movielens import LAYOUTS
from seqexp.engine.trainer import OPTIMIZERS
from seqexp.models.cells import CELLS as RNN_CELLS
from seqexp.models.dream import CELLS as DREAM_CELLS
from seqexp.models.dream import POOLINGS
from seqexp.models.knn import DECAY_UNITS
from seqexp.models.recurrent import LOSSES


@dataclass(frozen=True)
class Rule:
    """What a key's value must be; `check(value)` is False when it is not."""

    requirement: str  # completes "<key>=<value> must ..."
    check: Callable[[Any], bool]
    nullable: bool = False

    def complain(self, key: str, value: Any) -> None:
        if value is None and self.nullable:
            return
        if not self.check(value):
            null = " (or null)" if self.nullable else ""
            raise SeqexpError(f"{key}={value!r} must {self.requirement}{null}")


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


def text(nullable: bool = False, pattern: str | None = None, what: str = "be a text") -> Rule:
    return Rule(what, lambda v: isinstance(v, str) and v != "" and (
        pattern is None or re.fullmatch(pattern, v) is not None), nullable)


def integers(low: int) -> Rule:
    return Rule(f"be a non-empty list of integers >= {low}",
                lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                and all(_is_int(x) and x >= low for x in v))


def anything() -> Rule:
    """A key whose value any later step accepts (Hydra's own bookkeeping)."""
    return Rule("", lambda v: True, True)


# ------------------------------------------------------------------------------ the tables
TOP = {"seed": integer(0, 2**32 - 1), "device": text(),
       # a run id or "last" (seqexp/run/resume.py); a run id of digits only reaches here as an int
       "resume": Rule("be a run id or last", lambda v: (isinstance(v, str) and v != "")
                      or _is_int(v), nullable=True)}

TRAIN = {
    "epochs": integer(0),
    "batch_size": integer(1),
    "lr": number(0.0, low_open=True),
    "optimizer": choice(*OPTIMIZERS),
    "weight_decay": number(0.0),
    "grad_clip": number(0.0, low_open=True, nullable=True),
    "patience": integer(1),
    "min_delta": number(0.0),
    "progress": flag(),
    "num_threads": integer(1, nullable=True),
    "tf32": flag(),
    "amp": flag(),
    "compile": flag(),
}

EVAL = {
    "cutoffs": integers(1),
    "monitor_cutoff": integer(1),
    "batch_users": integer(1, nullable=True),
    "max_block_elements": integer(1, nullable=True),
    "basket_gap_s": number(0.0, nullable=True),
    "basket_k": integer(1),
    "exclude_seen": flag(),
    "save_ranks": flag(),
}

SPLIT = {
    "user_tail": {"name": choice("user_tail"),
                  "test_frac": number(0.0, 1.0, low_open=True, high_open=True),
                  "val_frac": number(0.0, 1.0, high_open=True)},
    "global_time": {"name": choice("global_time"),
                    "test_quantile": number(0.0, 1.0, low_open=True, high_open=True),
                    "val_quantile": number(0.0, 1.0, low_open=True, high_open=True)},
}

_FILE_DATASET = {
    "name": text(), "format": text(),
    "path": text(nullable=True), "url": text(nullable=True),
    "archive_member": text(nullable=True),
    "archive_size": integer(1, nullable=True),
    "archive_md5": text(nullable=True, pattern="[0-9a-fA-F]{32}", what="be 32 hex digits"),
    "verify": flag(),
    "min_item_support": integer(0),
    "drop_repeats": flag(),
}
DATASET = {
    "movielens": _FILE_DATASET | {"layout": choice(*LAYOUTS),
                                  "basket_gap_s": number(0.0)},
    "lastfm": _FILE_DATASET | {"item": choice(*ITEM_KINDS)},
    "tabular": _FILE_DATASET | {"user_col": text(), "item_col": text(), "time_col": text(),
                                "sep": text(nullable=True)},
    "synthetic": {
        "name": text(), "format": text(),
        "n_users": integer(1), "n_items": integer(1), "n_clusters": integer(1),
        "min_events": integer(1), "max_events": integer(1),
        "p_successor": number(0.0, 1.0), "p_favourite": number(0.0, 1.0),
        "n_favourites": integer(1), "generator_seed": integer(0),
        "min_item_support": integer(0), "drop_repeats": flag(),
    },
}

MLFLOW = {"tracking_uri": text(nullable=True), "experiment": text(), "run_name": text(
    nullable=True), "log_checkpoint": flag(), "system_metrics": flag()}
PATHS = {"data_dir": text(), "raw_dir": text(), "cache_dir": text()}

_MODEL = {"name": text(), "_target_": text(), "_partial_": flag()}
_FRACTION = number(0.0, 1.0)
_RNN = _MODEL | {
    "hidden_size": integer(1), "window": integer(1), "dropout": _FRACTION,
    "dropout_is_keep_prob": flag(), "user_dropout": _FRACTION,
    "loss": choice(*LOSSES), "n_negatives": integer(1),
    "sample_alpha": number(0.0), "eval_chunk": integer(1),
    "cell": choice(*RNN_CELLS),
    # rectified_ugru's cell
    "threshold": choice("soft", "hard"), "temperature": number(0.0, low_open=True),
    "omega": number(0.0, 1.0, nullable=True),
}
_FACTORISATION = _MODEL | {"factors": integer(1), "item_bias": flag(),
                           "init_std": number(0.0, low_open=True), "l2": number(0.0),
                           "seen_bias": flag()}
MODEL = {
    "seqexp.models.recurrent.RecurrentRecommender": _RNN,
    "seqexp.models.dream.DREAM": _MODEL | {
        "hidden_size": integer(1), "pooling": choice(*POOLINGS), "cell": choice(*DREAM_CELLS),
        "basket_gap_s": number(0.0), "max_baskets": integer(2, nullable=True),
        "init_std": number(0.0, low_open=True)},
    "seqexp.models.knn.ItemKNN": _MODEL | {"neighbours": integer(1),
                                           "popularity_tiebreak": flag()},
    "seqexp.models.knn.ExpDecayKNN": _MODEL | {
        "neighbours": integer(1), "decay": number(0.0), "decay_unit": choice(*DECAY_UNITS),
        "time_unit_s": number(0.0, low_open=True), "window": integer(1, nullable=True),
        "popularity_tiebreak": flag(), "anchor_block": integer(1)},
    "seqexp.models.factorisation.MF": _FACTORISATION | {"window": integer(0)},
    "seqexp.models.factorisation.SeqMF": _FACTORISATION | {"window": integer(1)},
    "seqexp.models.popularity.Popularity": _MODEL,
}


def group_tables(cfg: Mapping) -> dict[str, Mapping[str, Rule]]:
    """{group: its key -> rule table} for this config (the dataset's table by its format, the
    model's by its class, the split's by its name); a group without a table is missing."""
    tables: dict[str, Mapping[str, Rule]] = {"train": TRAIN, "eval": EVAL, "mlflow": MLFLOW,
                                             "paths": PATHS}
    for group, table, selector in (("dataset", DATASET, "format"), ("split", SPLIT, "name"),
                                   ("model", MODEL, "_target_")):
        node = cfg.get(group) or {}
        kind = node.get(selector)
        if not isinstance(kind, str) or kind not in table:
            raise SeqexpError(f"{group}.{selector}={kind!r} is unknown; choose one of "
                              f"{', '.join(table)}")
        tables[group] = table[kind]
    return tables


def rule_of(cfg: Mapping, key: str) -> Rule | None:
    """The rule of a dotted key (`train.lr`, `seed`), None when it has none."""
    group, _, leaf = key.rpartition(".")
    if not group:
        return TOP.get(leaf)
    return group_tables(cfg).get(group, {}).get(leaf)


def check_config(cfg: Mapping) -> None:
    """Every key with a rule, then the rules that tie keys together. `cfg`: the resolved config
    as plain containers. Keys without a rule (an added `+model.x` a constructor takes) are left
    to their reader."""
    for key, rule in TOP.items():
        rule.complain(key, cfg.get(key))
    for group, table in group_tables(cfg).items():
        node = cfg.get(group) or {}
        for leaf, rule in table.items():
            if leaf in node:
                rule.complain(f"{group}.{leaf}", node[leaf])
    _check_together(cfg)


def _check_together(cfg: Mapping) -> None:
    evaluation, dataset = cfg["eval"], cfg["dataset"]
    if evaluation.get("monitor_cutoff") not in evaluation.get("cutoffs", []):
        raise SeqexpError(f"eval.monitor_cutoff={evaluation.get('monitor_cutoff')} must be one "
                          f"of eval.cutoffs={list(evaluation.get('cutoffs', []))}")
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
