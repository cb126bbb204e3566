"""What a file may make seqexp do: nothing but build one of the installed, registered models.

A checkpoint's config (and any model config read back from a file) is never handed to Hydra's
`instantiate`: its `model` block must name a registered model (seqexp's own or an installed
plugin's: the registry of models, seqexp/run/registry.py, hands them in as {name: class}) with
that model's class as `_target_`, and hold only plain values (numbers, strings, booleans, null,
lists of those) for keys that class's constructor takes. Anything else, a nested `_target_`,
`_args_`, `_partial_`, `_recursive_`, `_convert_`, a nested mapping or an interpolation, is
refused in one line; no module is imported here.

Imports only the standard library, omegaconf and seqexp.core.errors.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, NoReturn

from omegaconf import DictConfig, ListConfig, OmegaConf

from seqexp.core.errors import SeqexpError

# Keys through which Hydra's instantiate calls or configures something.
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")
# Given by the data when the model is built, never by a config.
SIZE_KEYS = ("n_items", "n_users")
_PLAIN = (str, int, float, bool, type(None))
_ADVICE = "seqexp loads only configs it wrote; use the checkpoint of a seqexp run"


def checkpoint_config(text: Any, where: object) -> DictConfig:
    """A checkpoint's resolved config (YAML text) as a DictConfig, or one line saying why not;
    OmegaConf's YAML loader builds plain values only (no Python tags)."""
    if not isinstance(text, str):
        raise SeqexpError(f"{where}: its config is a {type(text).__name__}, not YAML text; "
                          f"{_ADVICE}")
    try:
        config = OmegaConf.create(text)
    except Exception as exc:  # yaml's and OmegaConf's errors have no common base
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


def model_arguments(model_cfg: DictConfig | Mapping, allowed: Mapping[str, type],
                    where: object) -> tuple[type, dict[str, Any]]:
    """The class and the constructor arguments (less n_items and n_users) of a model config
    read from a file, checked against `allowed` ({model name: its registered class}): the
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
    cls = allowed[name]
    expected = f"{cls.__module__}.{cls.__qualname__}"
    if target != expected:
        raise SeqexpError(f"{where}: model._target_={target!r} is not the class of "
                          f"model={name} ({expected}); refused ({_ADVICE})")
    if spec.pop("_partial_", True) is not True:
        raise SeqexpError(f"{where}: model._partial_ must be true as seqexp writes it; "
                          f"refused ({_ADVICE})")
    for key in (*HYDRA_KEYS, *SIZE_KEYS):
        if key in spec:
            what = "is set from the data" if key in SIZE_KEYS else "would configure Hydra"
            raise SeqexpError(f"{where}: model.{key} {what}, not by a checkpoint's config; "
                              f"refused ({_ADVICE})")
    arguments = {str(key): _plain(value, str(key), where) for key, value in spec.items()}
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
