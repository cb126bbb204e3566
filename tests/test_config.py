"""Every config composes, and every model builds from its YAML file."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from helpers import compose_config, sequences
from seqexp.apps.cli import check_group_choices
from seqexp.core.resources import config_dir, group_options
from seqexp.models.base import Recommender
from seqexp.run.experiment import build_model

MODELS = group_options("model")
DATASETS = group_options("dataset")
SPLITS = group_options("split")


def test_groups_offer_the_spec_choices():
    assert {"gru", "itemknn"} <= set(MODELS)
    assert set(DATASETS) == {"ml100k", "ml1m", "ml10m", "ml20m", "lastfm", "synthetic", "csv"}
    assert set(SPLITS) == {"user_tail", "global_time", "last_session"}
    assert (config_dir() / "config.yaml").is_file()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("split", SPLITS)
def test_every_combination_composes_with_the_spec_keys(model, dataset, split):
    cfg = compose_config([f"model={model}", f"dataset={dataset}", f"split={split}"])
    assert cfg.model.name == model and cfg.dataset.name == dataset and cfg.split.name == split
    for key in ("train.epochs", "train.batch_size", "train.lr", "seed", "device",
                "eval.cutoffs", "mlflow.tracking_uri", "mlflow.experiment"):
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    if dataset != "synthetic":  # generated, no file
        assert "path" in list(cfg.dataset.keys())  # "in" skips ??? values
    if dataset != "csv":  # csv requires dataset.path (???) on purpose
        OmegaConf.to_container(cfg, resolve=True)


def test_defaults_are_the_embedded_synthetic_run():
    cfg = compose_config([])
    assert cfg.dataset.name == "synthetic" and cfg.split.name == "user_tail"
    assert cfg.device == "auto" and 20 in cfg.eval.cutoffs


def test_rnn_yaml_carries_table1_defaults():
    cfg = compose_config(["model=gru"])
    assert (cfg.model.hidden_size, cfg.model.window, cfg.model.dropout) == (1000, 20, 0.8)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.lr, cfg.train.grad_clip) == (
        1000, 10, 0.001, 5.0)
    # the command line still wins over the model file
    cfg = compose_config(["model=gru", "train.epochs=3", "model.hidden_size=8"])
    assert cfg.train.epochs == 3 and cfg.model.hidden_size == 8


@pytest.mark.parametrize("model", MODELS)
def test_every_model_builds_from_its_yaml(model):
    overrides = [f"model={model}"]
    if "hidden_size" in compose_config(overrides).model:
        overrides.append("model.hidden_size=8")
    cfg = compose_config(overrides)
    built = build_model(cfg.model, sequences([[0, 1, 2], [2, 1]], n_items=3))
    assert isinstance(built, Recommender)
    assert built.n_items == 3 and built.n_users == 2


def test_unknown_group_choices_get_one_line():
    assert check_group_choices(["model=gru", "dataset=synthetic"]) is None
    assert check_group_choices(["-m", "model=gru,itemknn"]) is None
    message = check_group_choices(["model=nope"])
    assert "model=nope" in message and "gru" in message and "\n" not in message
    assert "dataset=ml25m" in check_group_choices(["-m", "dataset=ml10m,ml25m"])


@pytest.mark.parametrize("dataset,gap", [("ml100k", 0), ("ml1m", 0), ("ml10m", 0), ("ml20m", 0),
                                         ("lastfm", 1800), ("synthetic", 1800)])
def test_dream_basket_gap_comes_from_the_dataset_else_1800(dataset, gap):
    cfg = compose_config(["model=dream", f"dataset={dataset}"])
    assert cfg.model.basket_gap_s == cfg.eval.basket_gap_s == gap
    cfg = compose_config(["model=dream", f"dataset={dataset}", "model.basket_gap_s=60"])
    assert cfg.model.basket_gap_s == cfg.eval.basket_gap_s == 60
