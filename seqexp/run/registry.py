"""The registry of models: seqexp's own classes and those of installed plugins (entry point
group `seqexp.models`, seqexp/run/plugins.py), and the model files that name them.

A model has one name, the stem of its file `conf/model/<name>.yaml` (or a plugin's
`conf/model/<name>.yaml`); that file sets `model.name` to the same name and `model._target_` to
a registered class. The schema's model tables are assembled here from the classes'
`config_keys` and handed down to seqexp/core/schema.py (`ModelTables`); the safe loader of
checkpoints (seqexp/core/safe_config.py) is handed the registered classes. Several files may
name one class (the four RNN models, mf and mf_seen).

A class is known by its path and imported only when a model of it is built or its keys are
asked for the first time (its `config_keys` sit next to its constructor, in its module): the
model modules import torch, which `seqexp --help`'s model list and the command line's check of
every key outside `model.*` do without.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from seqexp.core import schema
from seqexp.core.errors import SeqexpError
from seqexp.run.plugins import ENTRY_POINT_GROUP, model_entry_points, model_files

# The base class every model class subclasses, by name: comparing names needs no torch.
RECOMMENDER = "seqexp.models.base.Recommender"
# seqexp's own model classes, by the path a model file's `_target_` says (a plugin's: its entry
# point).
BUILTIN_CLASSES = (
    "seqexp.models.recurrent.RecurrentRecommender",
    "seqexp.models.hrnn.HRNN",
    "seqexp.models.sasrec.SASRec",
    "seqexp.models.dream.DREAM",
    "seqexp.models.knn.ItemKNN",
    "seqexp.models.knn.ExpDecayKNN",
    "seqexp.models.factorisation.MF",
    "seqexp.models.factorisation.SeqMF",
    "seqexp.models.popularity.Popularity",
)


def class_path(cls: type) -> str:
    """What a model file's `_target_` says for `cls`."""
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class ModelClass:
    """A registered model class, by its path; `entry` is a plugin's entry point (None: one of
    seqexp's own, BUILTIN_CLASSES)."""

    path: str
    entry: EntryPoint | None = None

    def load(self) -> type:
        """The class itself (imports its module, and torch)."""
        return _load_class(self)

    def config_keys(self) -> Mapping[str, schema.Key]:
        """The class's own key table (imports it)."""
        return self.load().config_keys

    def config_checks(self) -> Sequence[schema.ModelCheck]:
        """The class's checks of several keys together (imports it)."""
        return tuple(self.load().config_checks)


@functools.cache
def _load_class(model_class: ModelClass) -> type:
    entry = model_class.entry
    if entry is None:
        module, _, name = model_class.path.rpartition(".")
        return getattr(importlib.import_module(module), name)
    where = f"entry point {entry.name} = {entry.value} (group {ENTRY_POINT_GROUP})"
    cls = entry.load()
    if not (isinstance(cls, type) and RECOMMENDER in map(class_path, cls.__mro__)):
        raise SeqexpError(f"{where} is not a seqexp Recommender class")
    if class_path(cls) != model_class.path:
        raise SeqexpError(f"{where}: the class is defined as {class_path(cls)}; name it there "
                          f"in the entry point and in model files' _target_")
    return cls


class _ByModel(Mapping):
    """{model name: what `read(name)` gives}, each read when it is first asked for (its class
    is imported then): the key tables, the checks."""

    def __init__(self, registry: Registry, read: Callable[[str], Any]) -> None:
        self._registry = registry
        self._read = read

    def __getitem__(self, name: str) -> Any:
        if name not in self._registry.models:
            raise KeyError(name)
        return self._read(name)

    def __contains__(self, name: object) -> bool:
        return name in self._registry.models

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.models)

    def __len__(self) -> int:
        return len(self._registry.models)


@dataclass(frozen=True)
class Registry:
    classes: Mapping[str, ModelClass]  # {class path: the registered class}
    models: Mapping[str, str]  # {model name: class path}
    files: Mapping[str, Path]  # {model name: its file}

    def model_class(self, name: str) -> type:
        """The class of model `name` (imports it, and torch)."""
        return self.classes[self.models[name]].load()

    def model_keys(self, name: str) -> Mapping[str, schema.Key]:
        """Model `name`'s key table: MODEL_KEYS and its class's keys."""
        return schema.MODEL_KEYS | dict(self.classes[self.models[name]].config_keys())

    def model_checks(self, name: str) -> Sequence[schema.ModelCheck]:
        """Model `name`'s checks of several keys together (its class's `config_checks`)."""
        return self.classes[self.models[name]].config_checks()

    def tables(self) -> schema.ModelTables:
        """The schema's view: {name: its key table}, {name: class path}, {name: its checks}."""
        return schema.ModelTables(_ByModel(self, self.model_keys), dict(self.models),
                                  _ByModel(self, self.model_checks))


def _plugin_classes() -> dict[str, ModelClass]:
    classes = {}
    for entry in model_entry_points():
        if not entry.attr:
            raise SeqexpError(f"entry point {entry.name} = {entry.value} (group "
                              f"{ENTRY_POINT_GROUP}) names no class; write module:Class")
        path = f"{entry.module}.{entry.attr}"
        classes[path] = ModelClass(path, entry)
    return classes


def _declared_target(name: str, file: Path, classes: Mapping[str, ModelClass]) -> str:
    """The class a model file names; its own `model.name` and `model._target_` must say the
    file's name and a registered class (no defaults list is followed)."""
    node = OmegaConf.load(file)
    model = node.get("model") if isinstance(node, DictConfig) else None
    if not isinstance(model, DictConfig) or model.get("name") != name:
        found = model.get("name") if isinstance(model, DictConfig) else None
        raise SeqexpError(f"{file}: model.name={found!r} must be {name!r}, the file's name")
    target = model.get("_target_")
    if target not in classes:
        raise SeqexpError(f"{file}: model._target_={target!r} is not a registered model class "
                          f"(seqexp's, or one of an entry point of the group "
                          f"{ENTRY_POINT_GROUP}: docs/adding-a-model.md)")
    return str(target)


@functools.cache
def registry() -> Registry:
    """The installed models (read once per process; `registry.cache_clear()` after installing
    a plugin in-process). Imports no model class."""
    classes = {path: ModelClass(path) for path in BUILTIN_CLASSES} | _plugin_classes()
    files = model_files()
    models = {name: _declared_target(name, file, classes) for name, file in files.items()}
    return Registry(classes, models, files)


def model_tables() -> schema.ModelTables:
    """The registered models' key tables."""
    return registry().tables()


def key_of(cfg: Mapping, key: str) -> schema.Key | None:
    """The entry of one dotted key in this config (a model's class is imported only for a
    `model.*` key)."""
    return schema.key_of(cfg, key, model_tables())


def check_model_together(node: Mapping) -> None:
    """The checks of model block `node`'s class that tie several of its keys together (imports
    the class)."""
    schema.check_model_together(node, model_tables())


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
