"""The config schema bound to what the layers below define: the value lists that its choices
name (seqexp/core/schema.py, `listed`), taken from the code that implements them, and the key
tables of the registered models (seqexp/run/registry.py). The one place a run's config is
checked in full, before any data is loaded.

The lists stay where they are implemented (the trainer's optimisers, the recurrent cells, the
readers' layouts), so that a new option is one edit; the schema lives in seqexp.core, below all
of them, so that the report can ask `affects_results` without importing torch. The command
line's check (seqexp/apps/preflight.py) runs before torch is imported, so it leaves the keys of
these lists to this one.
"""

from __future__ import annotations

from collections.abc import Mapping

from seqexp.core import schema
from seqexp.data.lastfm import ITEM_KINDS
from seqexp.data.movielens import LAYOUTS
from seqexp.engine.trainer import OPTIMIZERS
from seqexp.models.cells import CELLS
from seqexp.run.registry import model_tables

VALUE_LISTS: dict[str, tuple[str, ...]] = {
    "optimizers": tuple(OPTIMIZERS),
    "cells": tuple(CELLS),
    "movielens_layouts": tuple(LAYOUTS),
    "lastfm_items": tuple(ITEM_KINDS),
}


def check_config(cfg: Mapping) -> None:
    """Every value of a resolved config (plain containers) against the schema; the first bad
    one is a SeqexpError of one line naming the key and what it must be."""
    schema.check_config(cfg, VALUE_LISTS, model_tables())


def check_model(node: Mapping) -> None:
    """A model block alone (plain containers: a checkpoint's) against the same rules."""
    schema.check_model(node, VALUE_LISTS, model_tables())


def rule_of(cfg: Mapping, key: str) -> schema.Rule | None:
    """The rule of a dotted key (`train.lr`, `seed`) in this config, its choices filled in;
    None when the schema has no entry for it."""
    entry = schema.key_of(cfg, key, model_tables())
    return None if entry is None else entry.rule.bound(VALUE_LISTS)
