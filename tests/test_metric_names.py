"""A run's metric names in MLflow: one section per group, the flat name read back from either."""

from __future__ import annotations

import pytest

from seqexp.core.metric_names import flat_metrics, flat_name, logged_name


@pytest.mark.parametrize(("flat", "logged"), [
    ("train_loss", "epoch/train_loss"),
    ("val_mrr_at_20", "epoch/val_mrr_at_20"),
    ("val_recall_at_5_expected", "val_ties/recall_at_5_expected"),
    ("test_mrr_at_20", "test/mrr_at_20"),
    ("test_n_events", "test/n_events"),
    ("test_mrr_at_20_optimistic", "test_ties/mrr_at_20_optimistic"),
    ("test_hist_q1_mrr_at_20", "test_by_history/q1_mrr_at_20"),
    ("test_basket_f1_at_5", "test/basket_f1_at_5"),
    ("best_val_mrr_at_20", "run/best_val_mrr_at_20"),
    ("best_epoch", "run/best_epoch"),
    ("epochs_run", "run/epochs_run"),
    ("test_oov_dropped", "run/test_oov_dropped"),
    ("jobs_finished", "sweep/jobs_finished"),
])
def test_each_metric_has_its_section_and_its_flat_name_back(flat, logged):
    assert logged_name(flat) == logged
    assert flat_name(logged) == flat


def test_the_sections_sort_the_per_epoch_curves_first_and_test_before_its_breakdowns():
    # MLflow's chart pages and comparison list order by name
    names = [logged_name(f) for f in ("test_hist_q1_mrr_at_20", "test_mrr_at_20_optimistic",
                                      "val_mrr_at_20_expected", "test_mrr_at_20", "best_epoch",
                                      "train_loss")]
    assert sorted(names) == ["epoch/train_loss", "run/best_epoch", "test/mrr_at_20",
                             "test_by_history/q1_mrr_at_20", "test_ties/mrr_at_20_optimistic",
                             "val_ties/mrr_at_20_expected"]


def test_an_older_stores_flat_names_and_other_metrics_are_read_as_they_are():
    assert flat_metrics({"test_mrr_at_20": 0.5, "system/cpu_utilization_percentage": 3.0,
                         "test/recall_at_20": 0.7}) == {
        "test_mrr_at_20": 0.5, "system/cpu_utilization_percentage": 3.0,
        "test_recall_at_20": 0.7}
