"""The registry of models: seqexp's own classes and those of installed plugins (entry point
group `seqexp.models`, seqexp/run/plugins.py), and the model files that name them.

A model has one name, the stem of its file `conf/model/<name>.yaml` (or a plugin's
`conf/model/<name>.yaml`); that file sets `model.name` to the same name and `model._target_` to
a registered class. The schema's model tables are assembled here from the classes'
`config_keys` and handed down to seqexp/core/schema.py (`ModelTables`); the safe loader of
checkpoints (seqexp/core/safe_config.py) is handed the registered classes. Several files may
name one class (the four RNN models, mf and mf_seen).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from seqexp.core import schema
from seqexp.core.errors import SeqexpError
from seqexp.models.base import Recommender
from seqexp.models.dream import DREAM
from seqexp.models.factorisation import MF, SeqMF
from seqexp.models.hrnn import HRNN
from seqexp.models.knn import ExpDecayKNN, ItemKNN
from seqexp.models.popularity import Popularity
from seqexp.models.recurrent import RecurrentRecommender
from seqexp.models.sasrec import SASRec
from seqexp.run.plugins import ENTRY_POINT_GROUP, model_entry_points, model_files

# seqexp's own model classes; a plugin's come from its entry points.
BUILTIN_CLASSES: tuple[type[Recommender], ...] = (
    RecurrentRecommender, HRNN, SASRec, DREAM, ItemKNN, ExpDecayKNN, MF, SeqMF, Popularity)


def class_path(cls: type) -> str:
    """What a model file's `_target_` says for `cls`."""
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class Registry:
    classes: Mapping[str, type[Recommender]]  # {class path: class}
    models: Mapping[str, str]  # {model name: class path}
    files: Mapping[str, Path]  # {model name: its file}

    def model_class(self, name: str) -> type[Recommender]:
        return self.classes[self.models[name]]

    def tables(self) -> schema.ModelTables:
        """The schema's view: {name: MODEL_KEYS and its class's keys}, {name: class path}."""
        tables = {name: schema.MODEL_KEYS | dict(self.classes[target].config_keys)
                  for name, target in self.models.items()}
        return schema.ModelTables(tables, dict(self.models))


def _plugin_classes() -> dict[str, type[Recommender]]:
    classes = {}
    for entry in model_entry_points():
        cls = entry.load()
        if not (isinstance(cls, type) and issubclass(cls, Recommender)):
            raise SeqexpError(f"entry point {entry.name} = {entry.value} (group "
                              f"{ENTRY_POINT_GROUP}) is not a seqexp Recommender class")
        classes[class_path(cls)] = cls
    return classes


def _declared_target(name: str, file: Path, classes: Mapping[str, type]) -> str:
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
    a plugin in-process)."""
    classes = {class_path(cls): cls for cls in BUILTIN_CLASSES} | _plugin_classes()
    files = model_files()
    models = {name: _declared_target(name, file, classes) for name, file in files.items()}
    return Registry(classes, models, files)
