"""A nested configuration as flat "a.b.c" keys with string values: how a run logs its resolved
config as MLflow params, and how the report compares a run with its model's defaults."""

from __future__ import annotations

from collections.abc import Mapping

# MLflow's limit on the length of a param value.
MAX_PARAM_LENGTH = 6000


def flatten(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.001}} -> {"train.lr": "0.001"}; lists become their repr."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat
