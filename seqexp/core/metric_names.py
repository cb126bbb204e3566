"""The names a run's metrics have in MLflow, in one place.

Inside seqexp a metric has a flat name (`test_mrr_at_20`, `val_mrr_at_20`, `train_loss`,
`test_hist_q1_mrr_at_20`); MLflow gets it as `<section>/<name>` (`test/mrr_at_20`,
`val/mrr_at_20`, `train/loss`, `test_by_history/q1_mrr_at_20`), so that its chart pages show one
section per group instead of one alphabetical list. Stores written before the sections hold the
flat names: `flat_metrics` reads either, so readers (the report, a sweep's summary, resuming)
take both.
"""

from __future__ import annotations

from collections.abc import Mapping

# (flat prefix, section, flat prefix kept in the logged name), most specific first; MLflow's
# chart pages and its comparison list sort by name, so the sections' names give their order:
# the per-epoch curves (epoch/), the run's summary (run/), the test metrics (test/), then the
# breakdowns (test_by_history/, test_ties/, val_ties/). A name matching none keeps its flat form.
SECTIONS: tuple[tuple[str, str, bool], ...] = (
    ("test_hist_", "test_by_history/", False),
    ("test_oov_", "run/", True),
    ("best_", "run/", True),
    ("epochs_run", "run/", True),
    ("jobs_", "sweep/", True),
    ("train_", "epoch/", True),
    ("val_", "epoch/", True),
    ("test_", "test/", False),
)
# Tie-breaking variants of a metric (seqexp.engine.metrics): sections of their own, test_ties/
# and val_ties/, named to sort after the test metrics, so that the headline numbers lead.
TIES_SUFFIXES = ("_optimistic", "_expected")
TIES_PREFIXES = ("test_", "val_")
TIES_SECTION = "_ties/"


def logged_name(flat: str) -> str:
    """The name under which MLflow holds the metric `flat`: test_mrr_at_20 -> test/mrr_at_20,
    val_mrr_at_20 -> epoch/val_mrr_at_20, test_mrr_at_20_optimistic ->
    test_ties/mrr_at_20_optimistic, val_mrr_at_20_expected -> val_ties/mrr_at_20_expected."""
    if flat.endswith(TIES_SUFFIXES) and flat.startswith(TIES_PREFIXES):
        kind, rest = flat.split("_", 1)
        return f"{kind}{TIES_SECTION}{rest}"
    for prefix, section, kept in SECTIONS:
        if flat.startswith(prefix):
            return section + (flat if kept else flat[len(prefix):])
    return flat


def flat_name(logged: str) -> str:
    """The inverse of logged_name; a flat name (an older store's) is returned as it is."""
    section, slash, rest = logged.partition("/")
    if not slash:
        return logged
    if f"{section}/".endswith(TIES_SECTION) and f"{section.split('_')[0]}_" in TIES_PREFIXES:
        return f"{section.split('_')[0]}_{rest}"
    for prefix, known, kept in SECTIONS:
        if known == f"{section}/" and (not kept or rest.startswith(prefix)):
            return rest if kept else prefix + rest
    return logged


def logged_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {logged_name(k): v for k, v in metrics.items()}


def flat_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's metrics by their flat names, whichever names the store holds them under."""
    return {flat_name(k): v for k, v in metrics.items()}


def test_metric(metric: str) -> str:
    """The MLflow name of a test metric: mrr_at_20 -> test/mrr_at_20."""
    return logged_name(f"test_{metric}")


def val_metric(metric: str) -> str:
    """The MLflow name of a per-epoch validation metric: mrr_at_20 -> val/mrr_at_20."""
    return logged_name(f"val_{metric}")
