"""A run's deterministic name: `<model>-<dataset>` plus the command-line overrides that change
its results (the config schema's mark, seqexp.run.registry.affects_results)."""

from __future__ import annotations

from collections.abc import Sequence

from seqexp.run.registry import affects_results

# The group choices are in the name already; hydra.* says how Hydra runs, not what.
NAME_EXCLUDED_PREFIXES = ("hydra.",)
NAME_EXCLUDED_GROUPS = frozenset({"model", "dataset"})


def override_key(override: str) -> str:
    """`train.lr` of `train.lr=0.1`, `+train.x=1`, `++train.x=1` and `~train.x`."""
    return override.lstrip("+~").split("=", 1)[0]


def names_the_run(override: str) -> bool:
    key = override_key(override)
    return not (key in NAME_EXCLUDED_GROUPS or key.startswith(NAME_EXCLUDED_PREFIXES)
                or not affects_results(key))


def run_name(model: str, dataset: str, overrides: Sequence[str] = ()) -> str:
    """Deterministic: `model-dataset` plus the overrides that change results, sorted."""
    extra = sorted(o.lstrip("+~") for o in overrides if names_the_run(o))
    return "-".join([model, dataset]) + (f"-{','.join(extra)}" if extra else "")
