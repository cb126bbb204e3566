"""The names a run's metrics have in MLflow, in one place.

Inside seqexp a metric has a flat name (`test_mrr_at_20`, `val_mrr_at_20`, `train_loss`,
`test_hist_q1_mrr_at_20`); MLflow gets it as `<section>/<name>` (`epoch/test/mrr_at_20`,
`epoch/val_mrr_at_20`, `epoch/train_loss`, `test/mrr_at_5`, `test_by_history/q1_mrr_at_20`), so
that its chart pages show one section per group instead of one alphabetical list. Older stores
hold the headline test metrics under `test/` and the epochs' timing under `epoch/`, or every
metric under its flat name: `flat_metrics` reads each, so readers (the report, a sweep's
summary, resuming) take them all.

How MLflow 3.17's UI orders them (its mlflow/server/js/src/experiment-tracking/components):
a run's chart page sorts its sections by name and the charts of a section by metric name
(runs-charts/runs-charts.types.ts, getBaseChartAndSectionConfigs; a section is the name up to
its last `/`), while the comparison of runs sorts the full names (CompareRunUtil.getKeys) into
a box 300 px tall, 6 rows of 45 px (CompareRunMetricTable.tsx). Both sort by name, but a
section sorts before the sections its name is the beginning of: `epoch` (the per-epoch curves)
before `epoch/test` on the chart page, while the full name `epoch/test/mrr_at_20` sorts before
`epoch/train_loss` in the comparison. So the chart page opens on the curves and the comparison
on the headline test metrics, MRR, NDCG and Recall at eval.monitor_cutoff.
"""

from __future__ import annotations

from collections.abc import Mapping

# The headline test metrics (the runs table's columns, the end-of-run line): these metrics at
# eval.monitor_cutoff, logged as epoch/test/<metric>_at_<k>; their other cutoffs go to test/.
HEADLINE_SECTION = "epoch/test/"
HEADLINE_METRICS = ("mrr", "recall", "ndcg")
# (flat prefix, section, flat prefix kept in the logged name), most specific first; the
# sections' names give their order on a run's chart page: the per-epoch curves (epoch/, the
# training loss first), the headline (epoch/test/), the epochs' timing (epoch/time/), the run's
# summary (run/), the test metrics at every cutoff (test/), then the breakdowns
# (test_by_history/, test_ties/, val_ties/). A name matching none keeps its flat form.
SECTIONS: tuple[tuple[str, str, bool], ...] = (
    ("train_epoch_seconds", "epoch/time/", True),
    ("train_events_per_s", "epoch/time/", True),
    ("val_seconds", "epoch/time/", True),
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


def headline_metric(metric: str, cutoff: int) -> str:
    """The MLflow name of a headline test metric: mrr, 20 -> epoch/test/mrr_at_20."""
    return f"{HEADLINE_SECTION}{metric}_at_{int(cutoff)}"


def logged_name(flat: str, headline_cutoff: int | None = None) -> str:
    """The name under which MLflow holds the metric `flat`, the headline test metrics being
    those at `headline_cutoff` (eval.monitor_cutoff): test_mrr_at_20 -> epoch/test/mrr_at_20 at
    cutoff 20, test_mrr_at_5 -> test/mrr_at_5, val_mrr_at_20 -> epoch/val_mrr_at_20,
    test_mrr_at_20_optimistic -> test_ties/mrr_at_20_optimistic, val_mrr_at_20_expected ->
    val_ties/mrr_at_20_expected."""
    if headline_cutoff is not None and flat in (
            f"test_{metric}_at_{int(headline_cutoff)}" for metric in HEADLINE_METRICS):
        return HEADLINE_SECTION + flat.removeprefix("test_")
    if flat.endswith(TIES_SUFFIXES) and flat.startswith(TIES_PREFIXES):
        kind, rest = flat.split("_", 1)
        return f"{kind}{TIES_SECTION}{rest}"
    for prefix, section, kept in SECTIONS:
        if flat.startswith(prefix):
            return section + (flat if kept else flat[len(prefix):])
    return flat


def flat_name(logged: str) -> str:
    """The inverse of logged_name, also for the names of older stores: a headline test metric
    under test/ (test/mrr_at_20), a flat name (returned as it is)."""
    if logged.startswith(HEADLINE_SECTION):
        return "test_" + logged.removeprefix(HEADLINE_SECTION)
    section, slash, rest = logged.partition("/")
    if not slash:
        return logged
    if f"{section}/".endswith(TIES_SECTION) and f"{section.split('_')[0]}_" in TIES_PREFIXES:
        return f"{section.split('_')[0]}_{rest}"
    for prefix, known, kept in SECTIONS:
        name = logged.removeprefix(known)
        if name != logged and (not kept or name.startswith(prefix)):
            return name if kept else prefix + name
    return logged


def flat_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's metrics by their flat names, whichever names the store holds them under."""
    return {flat_name(k): v for k, v in metrics.items()}
