"""What a file may make seqexp do: nothing but build one of seqexp's own models.

A checkpoint's config (and any model config read back from a file) is never handed to Hydra's
`instantiate`: its `model` block must name one of the classes of conf/model/*.yaml (looked up
by the model's name) and hold only plain values (numbers, strings, booleans, null, lists of
those) for keys that class's constructor takes. Anything else, a nested `_target_`, `_args_`,
`_partial_`, `_recursive_`, `_convert_`, a nested mapping or an interpolation, is refused in
one line before any class is imported.

Imports only the standard library, omegaconf and seqexp.core.errors.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, ListConfig, OmegaConf

from seqexp.core.errors import SeqexpError

# Keys through which Hydra's instantiate calls or configures something.
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")
# Given by the data when the model is built, never by a config.
SIZE_KEYS = ("n_items", "n_users")
_PLAIN = (str, int, float, bool, type(None))
_ADVICE = "seqexp loads only configs it wrote; use the checkpoint of a seqexp run"


# ------------------------------------------------------------------------- the model allowlist
def model_targets(config_dir: Path) -> dict[str, str]:
    """{model name: the class its conf/model/<name>.yaml builds}: the file's own
    `model._target_`, else the one of the file its defaults list names (conf/rnn/table1.yaml
    for the RNN models)."""
    targets = {}
    for file in sorted((Path(config_dir) / "model").glob("*.yaml")):
        target = _declared_target(file, Path(config_dir))
        if target is not None:
            targets[file.stem] = target
    return targets


def _declared_target(file: Path, root: Path, depth: int = 0) -> str | None:
    node = OmegaConf.load(file)
    model = node.get("model") if isinstance(node, DictConfig) else None
    if isinstance(model, DictConfig) and isinstance(model.get("_target_"), str):
        return model["_target_"]
    found = None
    defaults = node.get("defaults") if isinstance(node, DictConfig) and depth < 4 else None
    for entry in defaults or []:
        if not isinstance(entry, str) or entry == "_self_":
            continue
        name = entry.removeprefix("/")
        base = root if entry.startswith("/") else file.parent
        included = base / f"{name}.yaml"
        if included.is_file():
            found = _declared_target(included, root, depth + 1) or found
    return found


def checkpoint_config(text: Any, where: object) -> DictConfig:
    """A checkpoint's resolved config (YAML text) as a DictConfig, or one line saying why not;
    OmegaConf's YAML loader builds plain values only (no Python tags)."""
    if not isinstance(text, str):
        raise SeqexpError(f"{where}: its config is a {type(text).__name__}, not YAML text; "
                          f"{_ADVICE}")
    try:
        config = OmegaConf.create(text)
    except Exception as exc:  # noqa: BLE001 - yaml's and OmegaConf's errors have no common base
        reason = " ".join(str(exc).split())[:200]
        raise SeqexpError(f"{where}: its config is not valid YAML ({reason}); {_ADVICE}"
                          ) from None
    if not isinstance(config, DictConfig) or not isinstance(config.get("model"), DictConfig):
        raise SeqexpError(f"{where}: its config has no model block; {_ADVICE}")
    return config


def _plain(value: Any, key: str, where: object, in_list: bool = False) -> Any:
    """`value` if it is a plain value or a list of them (an interpolation is not), else one
    line naming the key."""
    if isinstance(value, str) and "${" in value:
        raise SeqexpError(f"{where}: model.{key}={value!r} is an interpolation, and a "
                          f"checkpoint's config is resolved; refused ({_ADVICE})")
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)) and not in_list:
        return [_plain(item, f"{key}[{i}]", where, True) for i, item in enumerate(value)]
    _refuse(value, key, where)


def _refuse(value: Any, key: str, where: object) -> NoReturn:
    if isinstance(value, Mapping):
        hydra = [k for k in HYDRA_KEYS if k in value]
        if hydra:
            shown = f" ({value['_target_']})" if isinstance(value.get("_target_"), str) else ""
            raise SeqexpError(f"{where}: model.{key} holds {hydra[0]}{shown}, which would make "
                              f"loading call or configure code; refused ({_ADVICE})")
        raise SeqexpError(f"{where}: model.{key} is a mapping where a plain value (number, text, "
                          f"true/false, null or a list of those) belongs; refused ({_ADVICE})")
    if isinstance(value, (list, tuple)):
        raise SeqexpError(f"{where}: model.{key} is a list inside a list, where a plain value "
                          f"belongs; refused ({_ADVICE})")
    raise SeqexpError(f"{where}: model.{key} is a {type(value).__name__}, not a plain value; "
                      f"refused ({_ADVICE})")


def model_arguments(model_cfg: DictConfig | Mapping, allowed: Mapping[str, str],
                    where: object) -> tuple[type, dict[str, Any]]:
    """The class and the constructor arguments (less n_items and n_users) of a model config
    read from a file, checked against `allowed` ({name: class path}, `model_targets`): the
    name's class only, plain values only, keys its constructor takes only (a constructor with
    **options checks those keys itself)."""
    spec = (OmegaConf.to_container(model_cfg, resolve=False)
            if isinstance(model_cfg, (DictConfig, ListConfig)) else dict(model_cfg))
    if not isinstance(spec, dict):
        raise SeqexpError(f"{where}: its model config is not a mapping; {_ADVICE}")
    name, target = spec.pop("name", None), spec.pop("_target_", None)
    if not isinstance(name, str) or name not in allowed:
        raise SeqexpError(f"{where}: model.name={name!r} is not a model of this seqexp (one of "
                          f"{', '.join(sorted(allowed))}); refused ({_ADVICE})")
    if target != allowed[name]:
        raise SeqexpError(f"{where}: model._target_={target!r} is not the class of "
                          f"model={name} ({allowed[name]}); refused ({_ADVICE})")
    if spec.pop("_partial_", True) is not True:
        raise SeqexpError(f"{where}: model._partial_ must be true as seqexp writes it; "
                          f"refused ({_ADVICE})")
    for key in (*HYDRA_KEYS, *SIZE_KEYS):
        if key in spec:
            what = "is set from the data" if key in SIZE_KEYS else "would configure Hydra"
            raise SeqexpError(f"{where}: model.{key} {what}, not by a checkpoint's config; "
                              f"refused ({_ADVICE})")
    arguments = {str(key): _plain(value, str(key), where) for key, value in spec.items()}
    module, _, attribute = target.rpartition(".")
    cls = getattr(importlib.import_module(module), attribute)
    parameters = inspect.signature(cls).parameters
    takes = [p for p in parameters if p not in SIZE_KEYS and parameters[p].kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    # A constructor with **options (the RNN's cell options) refuses the keys it does not know
    # itself, with a SeqexpError naming them.
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key in arguments:
        if key not in takes and not open_ended:
            raise SeqexpError(f"{where}: model.{key} is not an option of model={name} (it takes "
                              f"{', '.join(takes) or 'none'}); refused ({_ADVICE})")
    return cls, arguments
