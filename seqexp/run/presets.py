"""The configured defaults as Python objects, for scripts, tests and library code: the
default config composed from conf/ (with Hydra overrides), an evaluator and a model preset
built from it. conf/ is the one source of every default; the classes these build take no
default of their own for a configured key.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seqexp.core.resources import config_dir
from seqexp.engine.evaluator import Evaluator
from seqexp.models.base import Recommender
from seqexp.run.experiment import model_factory


def config(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The config `seqexp <overrides>` runs with, resolved into plain containers (a copy: the
    caller may change it)."""
    return copy.deepcopy(_composed(tuple(overrides)))


@functools.cache
def _composed(overrides: tuple[str, ...]) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def evaluator(overrides: Sequence[str] = (), **changes: Any) -> Evaluator:
    """The evaluator of the config of `overrides`, with `changes` (Evaluator arguments)."""
    return Evaluator.from_config(config(overrides), **changes)


def options(name: str) -> dict[str, Any]:
    """The constructor arguments model `name` has in the default config (its model.* keys
    without name, _target_ and _partial_): for a subclass of its class, say."""
    spec = config([f"model={name}"])["model"]
    return {key: value for key, value in spec.items()
            if key not in ("name", "_target_", "_partial_")}


def model(name: str, n_items: int, n_users: int, **changes: Any) -> Recommender:
    """Model `name` (conf/model/<name>.yaml, as the default config composes it) for this
    catalogue and these users, with `changes` to its model.* keys (checked by the
    constructor's own types only: the command line checks the rules of config_keys)."""
    spec = config([f"model={name}"])["model"] | changes
    factory, _ = model_factory(spec)
    return factory(n_items=n_items, n_users=n_users)
