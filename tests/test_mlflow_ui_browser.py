"""The MLflow UI looked at in a browser (headless Chromium, driven by Playwright, through
scripts/ui_screenshots.py): the address seqexp prints after a run opens the runs table on a
comparison: every run's model, dataset, seed and test MRR/Recall/NDCG@20 as columns, the best
MRR@20 first; MLflow's comparison of two runs shows their test MRR/NDCG/Recall@20 in its first
rows, and a run's chart page its per-epoch curves first."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ui_screenshots.py"
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.slow,  # a store, `mlflow ui` and a browser: about a minute
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason=f"no {CHROMIUM}: apt-get install chromium (.ci/run does)"),
]


def _ui_screenshots():
    spec = importlib.util.spec_from_file_location("ui_screenshots", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(page, run_id: str, column: str, kind: str = "attributes"):
    """A run's cell in the runs table's column `column` (Run Name, Dataset, Models, ...) of
    the column group `kind` (attributes, tags, metrics)."""
    return page.locator(f'[row-id="{run_id}"] [col-id="{kind}.`{column}`"]')


def test_the_runs_table_shows_each_runs_metrics_sorted_by_mrr(tmp_path, empty_store):
    ui = _ui_screenshots()
    shutil.copy(empty_store, tmp_path / "mlflow.db")  # its schema: seconds saved
    uri = ui.store_uri(tmp_path)
    client = MlflowClient(uri)
    with ui.mlflow_ui(uri, tmp_path / "mlflow-ui.log") as answering:
        experiment_id, run_ids = ui.make_runs(uri, tmp_path, ("pop", "gru"))  # while it starts
        with ui.chromium_page() as page:
            address = answering()
            ui.open_runs_table(page, address, experiment_id, run_ids)  # waits for the rows
            shown_mrr = {}
            for run_id in run_ids:
                run = client.get_run(run_id)
                for tag in ("model", "dataset", "seed"):
                    shown = _cell(page, run_id, tag, "tags").inner_text().strip()
                    assert shown == run.data.tags[tag]
                for metric in ("epoch/test/mrr_at_20", "epoch/test/recall_at_20",
                               "epoch/test/ndcg_at_20"):
                    text = _cell(page, run_id, metric, "metrics").inner_text().strip()
                    assert float(text) == pytest.approx(run.data.metrics[metric], rel=1e-9)
                shown_mrr[run_id] = run.data.metrics["epoch/test/mrr_at_20"]
                name = _cell(page, run_id, "Run Name").locator("a")
                assert name.inner_text().strip() == run.info.run_name
                assert name.get_attribute("href").endswith(f"/runs/{run_id}")
                logged, = client.search_logged_models([experiment_id],
                                                      filter_string=f"source_run_id = '{run_id}'")
                link = _cell(page, run_id, "Models").locator("a")
                assert link.inner_text().strip() == logged.name
                assert link.get_attribute("href").endswith(f"/models/{logged.model_id}")
            rows = page.locator('[role="row"][row-id]')
            index = {rows.nth(i).get_attribute("row-id"): int(rows.nth(i).get_attribute(
                "row-index")) for i in range(rows.count())}
            assert sorted(shown_mrr, key=index.get) == sorted(shown_mrr, key=shown_mrr.get,
                                                             reverse=True)
            assert len(set(shown_mrr.values())) == 2  # pop and gru differ: the order means it
            # the comparison of the two runs opens on their headline test metrics, before the
            # per-epoch ones, in the rows its metrics' box shows (MLflow: 300 px, 45 px a row)
            ui.open_comparison(page, address, experiment_id, run_ids)
            shown = ui.compared_metrics(page)
            assert [name for name, _ in shown] == [
                "epoch/test/mrr_at_20", "epoch/test/ndcg_at_20", "epoch/test/recall_at_20",
                "epoch/time/train_epoch_seconds", "epoch/time/train_events_per_s",
                "epoch/time/val_seconds"]
            for name, values in shown[:3]:
                stored = [client.get_run(run_id).data.metrics[name] for run_id in run_ids]
                assert [float(v) for v in values] == pytest.approx(stored, abs=5e-4)  # 0.113
            # while the gru run's chart page opens on its per-epoch curves, then the headline
            ui.open_run_charts(page, address, experiment_id, run_ids[-1])
            assert ui.chart_sections(page)[:4] == ["epoch", "epoch/test", "epoch/time", "run"]
