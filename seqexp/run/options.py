"""The value lists that the config schema's choices name (seqexp/core/schema.py, `listed`),
taken from the code that implements them, and the schema's checks bound to them: the one
place a run's config is checked, before any data is loaded.

The lists stay where they are implemented (the trainer's optimisers, the models' losses and
cells, the readers' layouts) so that a new option is one edit; the schema lives in seqexp.core,
below all of them, so that the report can ask `affects_results` without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping

from seqexp.core import schema
from seqexp.data.lastfm import ITEM_KINDS
from seqexp.data.movielens import LAYOUTS
from seqexp.engine.trainer import OPTIMIZERS
from seqexp.models.cells import CELLS as RNN_CELLS
from seqexp.models.dream import CELLS as DREAM_CELLS
from seqexp.models.dream import POOLINGS
from seqexp.models.knn import DECAY_UNITS
from seqexp.models.recurrent import LOSSES

VALUE_LISTS: dict[str, tuple[str, ...]] = {
    "optimizers": tuple(OPTIMIZERS),
    "losses": tuple(LOSSES),
    "rnn_cells": tuple(RNN_CELLS),
    "dream_cells": tuple(DREAM_CELLS),
    "dream_poolings": tuple(POOLINGS),
    "decay_units": tuple(DECAY_UNITS),
    "movielens_layouts": tuple(LAYOUTS),
    "lastfm_items": tuple(ITEM_KINDS),
}


def check_config(cfg: Mapping) -> None:
    """Every value of a resolved config (plain containers) against the schema; the first bad
    one is a SeqexpError of one line naming the key and what it must be."""
    schema.check_config(cfg, VALUE_LISTS)


def rule_of(cfg: Mapping, key: str) -> schema.Rule | None:
    """The rule of a dotted key (`train.lr`, `seed`) in this config, its choices filled in;
    None when the schema has no entry for it."""
    entry = schema.key_of(cfg, key)
    return None if entry is None else entry.rule.bound(VALUE_LISTS)
