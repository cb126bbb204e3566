"""Screenshots of seqexp's runs in the MLflow UI, taken in headless Chromium.

Usage: python scripts/ui_screenshots.py [--store FOLDER] [--out docs/img]

Makes three tiny runs (models pop, itemknn and gru on a small synthetic data set, each with
its MLflow Model) and a two-job sweep (pop, itemknn) in FOLDER/mlflow.db, kept there (without
--store, a temporary folder), serves the store with `mlflow ui`, opens the experiment's runs
table at the address seqexp prints in headless Chromium (/usr/bin/chromium, Debian's `chromium`
package, driven by Playwright) and writes

- OUT/mlflow-runs-table.png: the runs table, with each run's model, dataset, seed and test
  metrics, sorted by test MRR@20;
- OUT/mlflow-run-charts.png: the gru run's charts, the per-epoch curves first;
- OUT/mlflow-compare.png: MLflow's comparison of the pop and the gru run;
- OUT/mlflow-sweep-report.png: the sweep's parent run with its report's chart.

tests/test_mlflow_ui_browser.py uses the same functions to check what the page shows.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from playwright.sync_api import Page, sync_playwright

from seqexp.core.metric_names import headline_metric
from seqexp.core.resources import config_dir
from seqexp.run.experiment import run_experiment
from seqexp.run.tracking import RUNS_TABLE_QUERY, Tracker, experiment_page

CHROMIUM = Path("/usr/bin/chromium")
# Headless Chromium on a machine without a network: without the background-networking flags it
# keeps dialling Google's services, whose refused connections slow the page down.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1720, "height": 800}
COMPARE_VIEWPORT = {"width": 1720, "height": 960}
MODELS = ("pop", "itemknn", "gru")
# Small enough to make in seconds: ~40 users, 2 epochs, hidden size 16, one thread.
TINY_RUN = ["dataset.n_users=40", "dataset.n_items=50", "dataset.min_events=10",
            "dataset.max_events=20", "train.epochs=2", "train.batch_size=16",
            "train.progress=false", "train.num_threads=1", "mlflow.log_model=true"]
SERVER_START_S = 180.0  # `mlflow ui` imports for a while on a busy machine
PAGE_TIMEOUT_MS = 60_000
VIEW_CUTOFF = 20  # eval.monitor_cutoff of the runs: the view the address opens on


def store_uri(folder: Path) -> str:
    return f"sqlite:///{folder.resolve() / 'mlflow.db'}"


def make_runs(uri: str, folder: Path, models: tuple[str, ...] = MODELS) -> tuple[str, list[str]]:
    """One tiny run per model in the store `uri`, its data and outputs in `folder`: the
    experiment's id and the runs' ids."""
    experiment_id, run_ids = "", []
    for model in models:
        overrides = [f"model={model}", *TINY_RUN, f"paths.data_dir={folder / 'data'}",
                     f"mlflow.tracking_uri={uri}"]
        if model == "gru":
            overrides.append("model.hidden_size=16")
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        result = run_experiment(cfg, launch_dir=folder, output_dir=folder / "outputs" / model)
        experiment_id = result.experiment_id
        run_ids.append(result.run_id)
    return experiment_id, run_ids


def make_sweep(uri: str, folder: Path, models: tuple[str, ...] = ("pop", "itemknn")
               ) -> tuple[str, str]:
    """A multirun of one job per model through seqexp's command line, in the store `uri`: its
    parent run's id and name."""
    sweep_dir = folder / "sweep"
    command = [sys.executable, "-m", "seqexp.apps.cli", "-m", f"model={','.join(models)}",
               *TINY_RUN, f"paths.data_dir={folder / 'data'}", f"mlflow.tracking_uri={uri}",
               f"hydra.sweep.dir={sweep_dir}"]
    subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True)
    parent_id = json.loads((sweep_dir / "mlflow_sweep.json").read_text())["parent_run_id"]
    return parent_id, Tracker(uri, None).client.get_run(parent_id).info.run_name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def mlflow_ui(tracking_uri: str, log: Path) -> Iterator[Callable[[], str]]:
    """`mlflow ui` serving the store on a free port of 127.0.0.1 (its output in `log`) while
    the block runs: a function that waits until the server answers and gives its address. The
    server starts in the background, so that the block can make its runs meanwhile; the store
    must have its schema already (two processes making it at once fail). The server and its
    worker are ended afterwards."""
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    with open(log, "w") as output:
        # its own process group, so that the worker uvicorn starts ends with it
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_S

    def answering() -> str:
        while True:
            try:
                urllib.request.urlopen(f"{address}/health", timeout=2)
                return address
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow ui did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)

    try:
        yield answering
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@contextmanager
def chromium_page() -> Iterator[Page]:
    """A page of headless Chromium with a fresh profile: the UI remembers choices (its
    GenAI / Model training switch) in the browser, which a fresh profile has not made."""
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True,
            viewport=VIEWPORT)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            yield page
        finally:
            context.close()


def close_assistant(page: Page) -> None:
    """Closes MLflow's assistant panel, which takes a third of the page, where it is open."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def open_runs_table(page: Page, address: str, experiment_id: str, run_ids: list[str]) -> None:
    """The experiment's runs table, at the address seqexp prints, once every run's row is
    drawn."""
    page.goto(experiment_page(address, experiment_id, VIEW_CUTOFF))
    for run_id in run_ids:
        page.locator(f'[role="row"][row-id="{run_id}"]').first.wait_for()
    close_assistant(page)


def open_comparison(page: Page, address: str, experiment_id: str, run_ids: list[str]) -> None:
    """MLflow's comparison of the runs: its plots and parameters folded away, the metrics side
    by side."""
    runs, experiments = json.dumps(run_ids), json.dumps([experiment_id])
    page.goto(f"{address}/#/compare-runs?runs={runs}&experiments={experiments}"
              f"&{RUNS_TABLE_QUERY.lstrip('?')}")
    page.get_by_text("Run details").first.wait_for()
    close_assistant(page)
    for section in ("Visualizations", "Parameters"):
        page.get_by_role("button", name=section).first.click()
    page.get_by_text("Comparing ").first.scroll_into_view_if_needed()  # the clicks scrolled


def compared_metrics(page: Page) -> list[tuple[str, list[str]]]:
    """The rows of the comparison's metrics box that show without scrolling it: each metric's
    name and its value per run, as drawn. The box is two react-virtualized grids (names,
    values) 300 px tall, whose cells are placed by their offset: read in one pass, since a
    grid scrolled by a script may show values beside the wrong names until redrawn."""
    grids = page.locator(".ReactVirtualized__Grid")
    grids.nth(1).locator("span").first.wait_for()
    names, values = (grids.nth(i).evaluate(
        """grid => [grid.clientHeight, [...grid.querySelectorAll(
            '.ReactVirtualized__Grid__innerScrollContainer > div')].map(
            cell => [cell.offsetTop + cell.offsetHeight, cell.offsetLeft, cell.innerText])]""")
        for i in (0, 1))
    rows: dict[int, tuple[str, list[str]]] = {}
    for bottom, _, name in sorted(names[1]):
        if bottom <= names[0]:
            rows[bottom] = (name.strip(), [])
    for bottom, _, value in sorted(values[1]):
        if bottom in rows:
            rows[bottom][1].append(value.strip())
    return [rows[bottom] for bottom in sorted(rows)]


def open_run_charts(page: Page, address: str, experiment_id: str, run_id: str) -> None:
    """A run's page on its metric charts, once the first section is drawn (MLflow fetches
    every metric's history first: slow on a busy machine)."""
    page.goto(f"{address}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics")
    page.get_by_text("train_loss", exact=True).first.wait_for(timeout=3 * PAGE_TIMEOUT_MS)
    page.get_by_text("Step").first.wait_for(timeout=3 * PAGE_TIMEOUT_MS)  # a drawn curve
    close_assistant(page)


def chart_sections(page: Page) -> list[str]:
    """The sections of a run's chart page, in the order drawn: each is headed by its name and
    its number of charts, `(14)`."""
    return page.evaluate("""() => [...document.querySelectorAll('div, span')].filter(
        node => node.children.length === 0 && /^[(][0-9]+[)]$/.test(node.innerText.trim()))
        .map(count => count.parentElement.innerText.split('\\n')[0].trim())""")


def open_sweep_report(page: Page, address: str, experiment_id: str, parent: tuple[str, str]
                      ) -> None:
    """The sweep's parent run (id, name) on its report's chart (report/<name>.png)."""
    parent_id, name = parent
    page.goto(f"{address}/#/experiments/{experiment_id}/runs/{parent_id}/artifacts/report/"
              f"{name}.png{RUNS_TABLE_QUERY}")
    page.get_by_text(f"report/{name}.png").first.wait_for()
    page.locator("img[src^='blob:']").first.wait_for(state="attached")  # MLflow's preview
    page.wait_for_timeout(2000)  # the picture drawn
    close_assistant(page)


def screenshots(page: Page, address: str, experiment_id: str, run_ids: list[str],
                compared: list[str], parent: tuple[str, str], out: Path) -> list[Path]:
    """The runs table, the last run's charts, the comparison of the runs `compared` and the
    sweep's parent with its report, as PNG files in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    shots = {name: out / f"mlflow-{name}.png"
             for name in ("runs-table", "run-charts", "compare", "sweep-report")}
    open_runs_table(page, address, experiment_id, run_ids)
    page.screenshot(path=shots["runs-table"])
    open_run_charts(page, address, experiment_id, run_ids[-1])
    page.screenshot(path=shots["run-charts"])
    open_comparison(page, address, experiment_id, compared)
    page.set_viewport_size(COMPARE_VIEWPORT)  # down to the bottom of the metrics' box
    page.get_by_text(headline_metric("mrr", VIEW_CUTOFF), exact=True).first.wait_for()
    page.screenshot(path=shots["compare"])
    page.set_viewport_size(VIEWPORT)
    open_sweep_report(page, address, experiment_id, parent)
    page.screenshot(path=shots["sweep-report"])
    return list(shots.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--store", type=Path, help="folder of the runs (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"ui_screenshots: no {CHROMIUM}; install Debian's package: "
                 "apt-get install chromium")
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.store or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        uri = store_uri(folder)
        Tracker(uri, None)  # the schema, before the server and the runs use the store
        with mlflow_ui(uri, folder / "mlflow-ui.log") as answering:
            experiment_id, run_ids = make_runs(uri, folder)
            parent = make_sweep(uri, folder)
            address = answering()
            with chromium_page() as page:
                written = screenshots(page, address, experiment_id, run_ids,
                                      [run_ids[0], run_ids[-1]], parent, args.out)
    for path in written:
        print(f"ui_screenshots: wrote {path}")


if __name__ == "__main__":
    main()
