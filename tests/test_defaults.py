"""One source for each default: conf/ holds it, the code that reads a configured key takes
it without a default of its own, and seqexp.run.presets builds objects with conf/'s values."""

from __future__ import annotations

import inspect

import pytest

from seqexp.data.lastfm import read_lastfm
from seqexp.data.movielens import read_movielens
from seqexp.data.preprocess import build_sequences
from seqexp.data.tabular import read_table
from seqexp.engine.evaluator import Evaluator
from seqexp.engine.trainer import Trainer
from seqexp.models.cells import CELLS
from seqexp.models.hrnn import HierarchicalGRUCell
from seqexp.run import presets
from seqexp.run.registry import registry


def _defaulted(function, names) -> list[str]:
    parameters = inspect.signature(function).parameters
    return [name for name in names if name in parameters
            and parameters[name].default is not inspect.Parameter.empty]


@pytest.mark.parametrize("name", sorted(registry().models))
def test_no_model_constructor_repeats_its_model_files_defaults(name):
    cls = registry().model_class(name)
    assert _defaulted(cls.__init__, cls.config_keys) == []


@pytest.mark.parametrize("cell", [*CELLS.values(), HierarchicalGRUCell])
def test_no_cell_option_has_a_default(cell):
    options = list(inspect.signature(cell).parameters)[1:]
    assert _defaulted(cell, options) == []


@pytest.mark.parametrize(("function", "keys"), [
    (Evaluator.__init__, ["cutoffs", "batch_users", "max_block_elements", "exclude_seen",
                          "progress", "val_max_scores", "seed"]),
    (build_sequences, ["min_item_support", "drop_repeats"]),
    (read_movielens, ["layout"]),
    (read_lastfm, ["item"]),
    (read_table, ["user_col", "item_col", "time_col", "sep"]),
    (Trainer.__init__, ["seed"]),
])
def test_no_reader_of_a_configured_key_has_a_default(function, keys):
    assert set(keys) <= set(inspect.signature(function).parameters)
    assert _defaulted(function, keys) == []


def test_the_evaluator_takes_each_setting_from_the_config():
    cfg = presets.config(["eval.cutoffs=[3,1]", "eval.batch_users=7", "eval.exclude_seen=true",
                          "eval.max_block_elements=900", "eval.val_max_scores=50",
                          "train.progress=false", "seed=5"])
    evaluator = Evaluator.from_config(cfg)
    assert (evaluator.cutoffs, evaluator.batch_users, evaluator.max_block_elements,
            evaluator.exclude_seen, evaluator.progress, evaluator.val_max_scores,
            evaluator.seed) == ([1, 3], 7, 900, True, False, 50, 5)
    assert Evaluator.from_config(cfg, batch_users=2).batch_users == 2


def test_a_preset_model_has_its_model_files_values_and_the_changes():
    model_cfg = presets.config(["model=sasrec"])["model"]
    model = presets.model("sasrec", 10, 2)
    assert (model.hidden_size, model.max_len, model.eval_points) == (
        model_cfg["hidden_size"], model_cfg["max_len"], model_cfg["eval_points"])
    assert presets.model("sasrec", 10, 2, hidden_size=8).hidden_size == 8
    # the defaults list of a model file is followed (gru: conf/rnn/table1.yaml)
    assert presets.model("gru", 10, 2, hidden_size=4).window == presets.options("gru")["window"]
