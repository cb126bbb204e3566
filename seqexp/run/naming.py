"""A run's deterministic name: `<model>-<dataset>` plus the command-line overrides that change
its results. Its own module because it reads seqexp.run.resume's keys, and seqexp.run.resume
imports seqexp.run.tracking."""

from __future__ import annotations

from collections.abc import Sequence

from seqexp.run.resume import IGNORED_KEYS, IGNORED_PREFIXES

# Keys that do not change a run's results and stay out of its name: resume's keys that may
# differ between a run and its continuation (where and how fast it runs, what it shows:
# train.progress is one), and what it writes besides its metrics (eval.save_ranks). The config
# schema's "does not change results" mark is to replace both.
NAME_EXCLUDED_KEYS = IGNORED_KEYS | {"eval.save_ranks"}
# The group choices are in the name already; hydra.* says how Hydra runs, not what.
NAME_EXCLUDED_PREFIXES = (*IGNORED_PREFIXES, "hydra.")
NAME_EXCLUDED_GROUPS = frozenset({"model", "dataset"})


def override_key(override: str) -> str:
    """`train.lr` of `train.lr=0.1`, `+train.x=1`, `++train.x=1` and `~train.x`."""
    return override.lstrip("+~").split("=", 1)[0]


def names_the_run(override: str) -> bool:
    key = override_key(override)
    return not (key in NAME_EXCLUDED_KEYS or key in NAME_EXCLUDED_GROUPS
                or key.startswith(NAME_EXCLUDED_PREFIXES))


def run_name(model: str, dataset: str, overrides: Sequence[str] = ()) -> str:
    """Deterministic: `model-dataset` plus the overrides that change results, sorted."""
    extra = sorted(o.lstrip("+~") for o in overrides if names_the_run(o))
    return "-".join([model, dataset]) + (f"-{','.join(extra)}" if extra else "")
