"""The config schema bound to what the layers below define: the value lists that its choices
name (seqexp/core/schema.py, `listed`), taken from the code that implements them, and the key
tables of the registered models (seqexp/run/registry.py). The one place a run's config is
checked, before any data is loaded.

The lists stay where they are implemented (the trainer's optimisers, the readers' layouts) and
a model's keys with its class, so that a new option is one edit; the schema lives in
seqexp.core, below all of them, so that the report can ask `affects_results` without importing
torch.
"""

from __future__ import annotations

from collections.abc import Mapping

from seqexp.core import schema
from seqexp.data.lastfm import ITEM_KINDS
from seqexp.data.movielens import LAYOUTS
from seqexp.engine.trainer import OPTIMIZERS
from seqexp.run.registry import registry

VALUE_LISTS: dict[str, tuple[str, ...]] = {
    "optimizers": tuple(OPTIMIZERS),
    "movielens_layouts": tuple(LAYOUTS),
    "lastfm_items": tuple(ITEM_KINDS),
}


def model_tables() -> schema.ModelTables:
    """The registered models' key tables (seqexp/run/registry.py)."""
    return registry().tables()


def check_config(cfg: Mapping) -> None:
    """Every value of a resolved config (plain containers) against the schema; the first bad
    one is a SeqexpError of one line naming the key and what it must be."""
    schema.check_config(cfg, VALUE_LISTS, model_tables())


def check_model(node: Mapping) -> None:
    """A model block alone (plain containers: a checkpoint's) against the same rules."""
    schema.check_model(node, VALUE_LISTS, model_tables())


def keys_of(cfg: Mapping) -> dict[str, schema.Key]:
    """{dotted key: Key} of every key this config's tables have (its model's included)."""
    return schema.keys_of(cfg, model_tables())


def affects_results(key: str) -> bool:
    """schema.affects_results with the registered models' marks."""
    return schema.affects_results(key, model_tables())


def results_free_keys(params: Mapping[str, object]) -> list[str]:
    """The flattened keys of a run's params that cannot change its results: logged with the
    run (RESULTS_FREE_TAG), so that the report, which loads no model class, knows them."""
    return sorted(key for key in params if not affects_results(key))


def rule_of(cfg: Mapping, key: str) -> schema.Rule | None:
    """The rule of a dotted key (`train.lr`, `seed`) in this config, its choices filled in;
    None when the schema has no entry for it."""
    entry = schema.key_of(cfg, key, model_tables())
    return None if entry is None else entry.rule.bound(VALUE_LISTS)
