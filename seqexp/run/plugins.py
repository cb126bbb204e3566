"""Models from other packages: the entry point group `seqexp.models` and the config folders
that come with it (docs/adding-a-model.md, "A model in your own package").

A package registers a model class with an entry point,

    [project.entry-points."seqexp.models"]
    last_item = "my_models.last_item:LastItem"

and ships the class's model file(s) as `conf/model/<name>.yaml` in the folder of the class's
module (`my_models/conf/model/last_item.yaml`). That folder joins Hydra's config search path
(hydra_plugins/seqexp_models), so `seqexp model=last_item` composes it like one of conf/model/.

Reads only the installed packages' metadata: no model class is imported here, so `seqexp
--help` and the command-line checks stay light (the classes: seqexp/run/registry.py).
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from seqexp.core import resources
from seqexp.core.errors import SeqexpError

ENTRY_POINT_GROUP = "seqexp.models"


def model_entry_points() -> list[EntryPoint]:
    """The installed packages' entry points of the group `seqexp.models`, by name."""
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.name, ep.value))


def plugin_config_dir(entry: EntryPoint) -> Path:
    """The config folder of an entry point's package: `conf/` beside the class's module."""
    try:
        spec = importlib.util.find_spec(entry.module)
    except (ImportError, ValueError) as exc:
        raise SeqexpError(f"entry point {entry.name} = {entry.value} (group "
                          f"{ENTRY_POINT_GROUP}): cannot find its module ({exc})") from None
    if spec is None or spec.origin is None:
        raise SeqexpError(f"entry point {entry.name} = {entry.value} (group "
                          f"{ENTRY_POINT_GROUP}): its module {entry.module} is not installed")
    return Path(spec.origin).parent / "conf"


def config_dirs() -> list[Path]:
    """seqexp's config tree, then every plugin's config folder (each once, in entry point
    order): where model files are found."""
    dirs = [resources.config_dir()]
    for entry in model_entry_points():
        folder = plugin_config_dir(entry)
        if folder not in dirs:
            dirs.append(folder)
    return dirs


def model_files() -> dict[str, Path]:
    """{model name: its file}: every `model/<name>.yaml` of the config folders; the file stem
    is the model's one name. A name in two folders is refused."""
    files: dict[str, Path] = {}
    for folder in config_dirs():
        for file in sorted((folder / "model").glob("*.yaml")):
            if file.stem in files:
                raise SeqexpError(f"{file}: model {file.stem} is defined by {files[file.stem]} "
                                  f"already; rename one of the two files")
            files[file.stem] = file
    return files


def group_options(group: str) -> list[str]:
    """The choices of a config group in every config folder (plugins add models)."""
    if group == "model":
        return sorted(model_files())
    return sorted(p.stem for p in (resources.config_dir() / group).glob("*.yaml"))
