"""A run's metric names in MLflow: one section per group, the flat name read back from either;
the order MLflow 3.17's UI gives them (seqexp/core/metric_names.py says where in its source):
a run's chart page sorts sections by name, the comparison of runs sorts the full names."""

from __future__ import annotations

import pytest

from seqexp.core.metric_names import (
    HEADLINE_METRICS,
    flat_metrics,
    flat_name,
    headline_metric,
    logged_name,
)


@pytest.mark.parametrize(("flat", "logged"), [
    ("train_loss", "epoch/train_loss"),
    ("train_epoch_seconds", "epoch/time/train_epoch_seconds"),
    ("train_events_per_s", "epoch/time/train_events_per_s"),
    ("val_seconds", "epoch/time/val_seconds"),
    ("val_mrr_at_20", "epoch/val_mrr_at_20"),
    ("val_recall_at_5_expected", "val_ties/recall_at_5_expected"),
    ("test_mrr_at_20", "epoch/test/mrr_at_20"),
    ("test_recall_at_20", "epoch/test/recall_at_20"),
    ("test_ndcg_at_20", "epoch/test/ndcg_at_20"),
    ("test_mrr_at_5", "test/mrr_at_5"),
    ("test_n_events", "test/n_events"),
    ("test_mrr_at_20_optimistic", "test_ties/mrr_at_20_optimistic"),
    ("test_hist_q1_mrr_at_20", "test_by_history/q1_mrr_at_20"),
    ("test_basket_f1_at_20", "test/basket_f1_at_20"),
    ("best_val_mrr_at_20", "run/best_val_mrr_at_20"),
    ("best_epoch", "run/best_epoch"),
    ("epochs_run", "run/epochs_run"),
    ("test_oov_dropped", "run/test_oov_dropped"),
    ("jobs_finished", "sweep/jobs_finished"),
])
def test_each_metric_has_its_section_and_its_flat_name_back(flat, logged):
    assert logged_name(flat, headline_cutoff=20) == logged
    assert flat_name(logged) == flat


def test_the_headline_is_the_test_metrics_at_the_monitored_cutoff():
    assert logged_name("test_mrr_at_10", headline_cutoff=10) == "epoch/test/mrr_at_10"
    assert logged_name("test_mrr_at_20", headline_cutoff=10) == "test/mrr_at_20"
    assert logged_name("test_mrr_at_20") == "test/mrr_at_20"  # no cutoff, no headline
    assert [headline_metric(m, 20) for m in HEADLINE_METRICS] == [
        logged_name(f"test_{m}_at_20", headline_cutoff=20) for m in HEADLINE_METRICS]


def _run_metrics(cutoffs=(5, 10, 20)) -> list[str]:
    """The flat names a gru run logs (its kinds of metric, at `cutoffs`)."""
    at_k = [f"{m}_at_{k}" for m in HEADLINE_METRICS for k in cutoffs]
    return ["train_loss", "train_epoch_seconds", "train_events_per_s", "val_seconds",
            "val_n_events", "best_epoch", "epochs_run", "test_oov_dropped", "test_n_events",
            *(f"val_{name}" for name in at_k), *(f"test_{name}" for name in at_k),
            *(f"{kind}_{name}{ties}" for kind in ("val", "test") for name in at_k
              for ties in ("_optimistic", "_expected")),
            *(f"test_hist_q{q}_{name}" for q in (1, 2, 3, 4) for name in at_k),
            *(f"best_val_{name}" for name in at_k[:1])]


@pytest.mark.parametrize("cutoffs", [(5, 10, 20), (1, 5, 10, 20, 50)])
def test_the_comparison_of_runs_opens_on_the_headline(cutoffs):
    # CompareRunUtil.getKeys: the full names sorted (JavaScript's sort: by UTF-16 code units,
    # which for these ASCII names is Python's order); the box shows 6 rows (300 px / 45 px)
    names = sorted(logged_name(flat, headline_cutoff=20) for flat in _run_metrics(cutoffs))
    assert names[:3] == ["epoch/test/mrr_at_20", "epoch/test/ndcg_at_20",
                         "epoch/test/recall_at_20"]


def _chart_sections(names: list[str]) -> list[str]:
    """getBaseChartAndSectionConfigs: a chart's section is its name up to the last '/' (none:
    "Model metrics", last); the sections sorted by name."""
    sections = {name.rpartition("/")[0] for name in names}
    return sorted(sections - {""}) + (["Model metrics"] if "" in sections else [])


def test_a_runs_chart_page_opens_on_the_per_epoch_curves_then_the_headline():
    names = [logged_name(flat, headline_cutoff=20) for flat in _run_metrics()]
    assert _chart_sections(names) == ["epoch", "epoch/test", "epoch/time", "run", "test",
                                      "test_by_history", "test_ties", "val_ties"]
    curves = sorted(name for name in names if name.rpartition("/")[0] == "epoch")
    assert curves[:3] == ["epoch/train_loss", "epoch/val_mrr_at_10", "epoch/val_mrr_at_20"]
    assert "epoch/val_recall_at_20" in curves


def test_every_name_an_older_store_holds_is_read_as_its_flat_name():
    # before: the headline under test/ and the timing under epoch/; before the sections:
    # every metric flat
    assert flat_metrics({"test_mrr_at_20": 0.5, "system/cpu_utilization_percentage": 3.0,
                         "test/recall_at_20": 0.7, "epoch/test/ndcg_at_20": 0.6,
                         "epoch/val_mrr_at_20": 0.4, "val_mrr_at_10": 0.3,
                         "epoch/train_epoch_seconds": 2.0}) == {
        "test_mrr_at_20": 0.5, "system/cpu_utilization_percentage": 3.0,
        "test_recall_at_20": 0.7, "test_ndcg_at_20": 0.6, "val_mrr_at_20": 0.4,
        "val_mrr_at_10": 0.3, "train_epoch_seconds": 2.0}
