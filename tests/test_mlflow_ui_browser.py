"""The MLflow UI looked at in a browser (headless Chromium, driven by Playwright, through
scripts/ui_screenshots.py): the address seqexp prints after a run opens the runs table, and it
shows every run with its dataset and its MLflow Model."""

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


def _cell(page, run_id: str, column: str):
    """A run's cell in the runs table's column `column` (Run Name, Dataset, Models, ...)."""
    return page.locator(f'[row-id="{run_id}"] [col-id="attributes.`{column}`"]')


def test_the_runs_table_shows_each_run_with_its_dataset_and_model(tmp_path, empty_store):
    ui = _ui_screenshots()
    shutil.copy(empty_store, tmp_path / "mlflow.db")  # its schema: seconds saved
    uri = ui.store_uri(tmp_path)
    client = MlflowClient(uri)
    with ui.mlflow_ui(uri, tmp_path / "mlflow-ui.log") as answering:
        experiment_id, run_ids = ui.make_runs(uri, tmp_path, ("pop", "gru"))  # while it starts
        with ui.chromium_page() as page:
            ui.open_runs_table(page, answering(), experiment_id, run_ids)  # waits for the rows
            for run_id in run_ids:
                run = client.get_run(run_id)
                name = _cell(page, run_id, "Run Name").locator("a")
                assert name.inner_text().strip() == run.info.run_name
                assert name.get_attribute("href").endswith(f"/runs/{run_id}")
                # the first of its three inputs, with its context
                training = run.inputs.dataset_inputs[0]
                assert [t.value for t in training.tags if t.key == "mlflow.data.context"] == [
                    "training"]
                shown = _cell(page, run_id, "Dataset").inner_text()
                assert f"{training.dataset.name} ({training.dataset.digest})" in shown
                assert "Training" in shown
                logged, = client.search_logged_models([experiment_id],
                                                      filter_string=f"source_run_id = '{run_id}'")
                link = _cell(page, run_id, "Models").locator("a")
                assert link.inner_text().strip() == logged.name
                assert link.get_attribute("href").endswith(f"/models/{logged.model_id}")
