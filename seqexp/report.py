"""seqexp-report: Table 2 of Donkers et al. from the runs of an MLflow experiment or sweep.

Models are rows; MRR@20 and Recall@20 per dataset are columns, each as seqexp's value (mean ± std
over the runs that differ only in their seed), the paper's value and the difference. Written as
Markdown, CSV and LaTeX with a PNG bar chart, and logged as artifacts (`report/`) of the sweep's
parent run.

    seqexp-report --experiment table2 --out table2/
    seqexp-report --sweep-id 20261128-020346-660e10 --tracking-uri http://mlflow.team:5000
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from seqexp.errors import SeqexpError

log = logging.getLogger(__name__)

METRICS = (("mrr_at_20", "MRR@20"), ("recall_at_20", "Recall@20"))
DATASET_TITLES = {"ml10m": "ML-10M", "lastfm": "LastFM-1K"}
REPORT_FILES = ("table2.md", "table2.csv", "table2.tex", "table2.png")
# Params that say where or how fast a run ran, not what it computed: runs differing only in
# these (and the seed) are repetitions of one configuration.
_NOT_CONFIGURATION = ("seed", "device", "mlflow.", "paths.", "data.", "train.progress",
                      "train.num_threads", "eval.batch_users", "eval.max_block_elements")


@dataclass
class RunRecord:
    """What the report needs of one finished run."""

    run_id: str
    model: str
    dataset: str
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    parent_id: str | None = None


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    paper: float | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds; None for fewer than two runs."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def diff(self) -> float | None:
        """seqexp minus paper."""
        if self.mean is None or self.paper is None:
            return None
        return self.mean - self.paper


@dataclass
class Row:
    model: str
    variant: str  # "" or "train.lr=0.003, ..." when a model ran in several configurations
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.model} ({self.variant})" if self.variant else self.model


@dataclass
class Table:
    rows: list[Row]
    datasets: list[str]


def load_paper(path: Path | None = None) -> dict[tuple[str, str, str], float]:
    """{(model, dataset, metric): value} from table2_paper.csv (shipped in the package)."""
    text = (path.read_text() if path is not None
            else resources.files("seqexp").joinpath("table2_paper.csv").read_text())
    paper = {}
    for record in csv.DictReader(io.StringIO(text)):
        for metric, _ in METRICS:
            paper[(record["model"], record["dataset"], metric)] = float(record[metric])
    return paper


def paper_order(paper: Mapping[tuple[str, str, str], float]) -> tuple[list[str], list[str]]:
    models, datasets = [], []
    for model, dataset, _ in paper:
        if model not in models:
            models.append(model)
        if dataset not in datasets:
            datasets.append(dataset)
    return models, datasets


def _configuration(params: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in params.items()
            if not (k in _NOT_CONFIGURATION or k.startswith(_NOT_CONFIGURATION))}


def build_table(runs: Sequence[RunRecord], paper: Mapping[tuple[str, str, str], float]) -> Table:
    """Group runs into rows and cells. Runs of one model and dataset whose configurations differ
    only in the seed are one cell (mean ± std). A model that ran in several configurations gets
    one row per configuration, labelled by the params that vary within a dataset; params that
    vary only across datasets (dataset.*) do not split a row."""
    groups: dict[tuple[str, str, frozenset], list[RunRecord]] = defaultdict(list)
    for run in runs:
        groups[(run.model, run.dataset, frozenset(_configuration(run.params).items()))].append(run)

    varying: dict[str, set[str]] = defaultdict(set)  # model -> keys that split its rows
    by_model_dataset: dict[tuple[str, str], list[frozenset]] = defaultdict(list)
    for model, dataset, config in groups:
        by_model_dataset[(model, dataset)].append(config)
    for (model, _), configs in by_model_dataset.items():
        if len(configs) > 1:
            dicts = [dict(c) for c in configs]
            keys = set().union(*dicts)
            varying[model] |= {k for k in keys if len({d.get(k) for d in dicts}) > 1}

    rows: dict[tuple[str, str], Row] = {}
    for (model, dataset, config), members in groups.items():
        settings = dict(config)
        variant = ", ".join(f"{k}={settings.get(k, '-')}" for k in sorted(varying[model]))
        row = rows.setdefault((model, variant), Row(model, variant))
        for metric, _ in METRICS:
            cell = row.cells.setdefault((dataset, metric),
                                        Cell(paper=paper.get((model, dataset, metric))))
            cell.values.extend(r.metrics[f"test_{metric}"] for r in members
                               if f"test_{metric}" in r.metrics)

    paper_models, paper_datasets = paper_order(paper)
    seen_datasets = {run.dataset for run in runs}
    datasets = ([d for d in paper_datasets if d in seen_datasets]
                + sorted(seen_datasets - set(paper_datasets)))
    model_rank = {m: i for i, m in enumerate(paper_models)}
    ordered = sorted(rows.values(), key=lambda r: (model_rank.get(r.model, len(model_rank)),
                                                    r.model, r.variant))
    for row in ordered:  # the paper's value beside every row, also where seqexp has none
        for dataset in datasets:
            for metric, _ in METRICS:
                row.cells.setdefault((dataset, metric),
                                     Cell(paper=paper.get((row.model, dataset, metric))))
    return Table(ordered, datasets)


# ---- formats ---------------------------------------------------------------------------------

def _num(value: float | None, digits: int = 5, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _ours(cell: Cell, pm: str = " ± ") -> str:
    if cell.mean is None:
        return ""
    text = _num(cell.mean)
    if cell.std is not None:
        text += f"{pm}{_num(cell.std)} (n={cell.n})"
    return text


def _title(dataset: str) -> str:
    return DATASET_TITLES.get(dataset, dataset)


def to_markdown(table: Table) -> str:
    header = ["model"]
    for dataset in table.datasets:
        for _, title in METRICS:
            header += [f"{_title(dataset)} {title}", "paper", "Δ"]
    lines = ["| " + " | ".join(header) + " |",
             "| --- |" + " ---: |" * (len(header) - 1)]
    for row in table.rows:
        cells = [row.label]
        for dataset in table.datasets:
            for metric, _ in METRICS:
                cell = row.cells[(dataset, metric)]
                cells += [_ours(cell), _num(cell.paper), _num(cell.diff, signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_columns(datasets: Iterable[str]) -> list[str]:
    columns = ["model", "variant"]
    for dataset in datasets:
        for metric, _ in METRICS:
            columns += [f"{dataset}_{metric}_{part}"
                        for part in ("mean", "std", "n", "paper", "diff")]
    return columns


def to_csv(table: Table) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(csv_columns(table.datasets))
    for row in table.rows:
        values: list[Any] = [row.model, row.variant]
        for dataset in table.datasets:
            for metric, _ in METRICS:
                cell = row.cells[(dataset, metric)]
                values += [_repr(cell.mean), _repr(cell.std), cell.n, _repr(cell.paper),
                           _repr(cell.diff)]
        writer.writerow(values)
    return out.getvalue()


def _repr(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _tex(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"),
                          ("#", r"\#"), ("$", r"\$"), ("{", r"\{"), ("}", r"\}")):
        text = text.replace(char, escaped)
    return text


def to_latex(table: Table) -> str:
    per_dataset = 3 * len(METRICS)
    lines = [r"% Table 2: seqexp vs Donkers et al. (RecSys 2017); needs \usepackage{booktabs}",
             r"\begin{tabular}{l" + ("r" * per_dataset) * len(table.datasets) + "}",
             r"\toprule"]
    top, rules = [""], []
    for i, dataset in enumerate(table.datasets):
        top.append(rf"\multicolumn{{{per_dataset}}}{{c}}{{{_tex(_title(dataset))}}}")
        start = 2 + i * per_dataset
        rules.append(rf"\cmidrule(lr){{{start}-{start + per_dataset - 1}}}")
    lines += [" & ".join(top) + r" \\", "".join(rules)]
    middle = [""] + [rf"\multicolumn{{3}}{{c}}{{{title}}}"
                     for _ in table.datasets for _, title in METRICS]
    lines.append(" & ".join(middle) + r" \\")
    lines.append(" & ".join(["Model"] + ["seqexp", "paper", r"$\Delta$"]
                            * len(METRICS) * len(table.datasets)) + r" \\")
    lines.append(r"\midrule")
    for row in table.rows:
        cells = [_tex(row.label)]
        for dataset in table.datasets:
            for metric, _ in METRICS:
                cell = row.cells[(dataset, metric)]
                ours = _ours(cell, pm=r" $\pm$ ")
                diff = _num(cell.diff, signed=True)
                cells += [ours, _num(cell.paper), f"${diff}$" if diff else ""]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def plot(table: Table, path: Path) -> None:
    """Grouped bars, seqexp (± std) beside the paper, one panel per dataset and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_rows, n_cols = len(table.datasets), len(METRICS)
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False,
                             figsize=(max(6.0, 0.9 * len(table.rows) + 2) * n_cols / 1.6,
                                      3.4 * n_rows))
    x = np.arange(len(table.rows))
    for r, dataset in enumerate(table.datasets):
        for c, (metric, title) in enumerate(METRICS):
            ax = axes[r][c]
            cells = [row.cells[(dataset, metric)] for row in table.rows]
            ours = [cell.mean if cell.mean is not None else np.nan for cell in cells]
            errors = [cell.std or 0.0 for cell in cells]
            paper = [cell.paper if cell.paper is not None else np.nan for cell in cells]
            ax.bar(x - 0.2, ours, 0.4, yerr=errors, capsize=3, label="seqexp")
            ax.bar(x + 0.2, paper, 0.4, label="paper")
            ax.set_title(f"{_title(dataset)} {title}")
            ax.set_xticks(x, [row.label for row in table.rows], rotation=35, ha="right",
                          fontsize=8)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(table: Table, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, table_csv, tex, png = (out_dir / name for name in REPORT_FILES)
    md.write_text(to_markdown(table))
    table_csv.write_text(to_csv(table))
    tex.write_text(to_latex(table))
    plot(table, png)
    return [md, table_csv, tex, png]


# ---- MLflow ----------------------------------------------------------------------------------

def _record(run: Any) -> RunRecord:
    tags = run.data.tags
    from seqexp.sweep import PARENT_TAG

    return RunRecord(run.info.run_id, tags.get("model", "?"), tags.get("dataset", "?"),
                     dict(run.data.params), dict(run.data.metrics), tags.get(PARENT_TAG))


def collect(tracker: Any, experiment: str | None, sweep_id: str | None
            ) -> tuple[list[RunRecord], str | None, str, int]:
    """Finished runs of the experiment or sweep, the parent run to log the report to (None when
    the runs have no single parent), the experiment id, and how many runs were left out."""
    from seqexp.sweep import PARENT_ROLE, ROLE_TAG, SWEEP_ID_TAG

    if sweep_id is not None:
        runs = tracker.search(f"tags.{SWEEP_ID_TAG} = '{sweep_id}'",
                              experiment_ids=tracker.all_experiment_ids())
        where = f"sweep {sweep_id}"
    else:
        runs = tracker.search()
        where = f"experiment {experiment!r}"
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == PARENT_ROLE]
    jobs = [r for r in runs if ROLE_TAG not in r.data.tags]
    finished = [r for r in jobs if r.info.status == "FINISHED"
                and any(f"test_{m}" in r.data.metrics for m, _ in METRICS)]
    if not finished:
        raise SeqexpError(f"no finished seqexp runs with test metrics in {where} "
                          f"(--tracking-uri {tracker.tracking_uri})")
    records = [_record(r) for r in finished]
    parent_ids = {r.parent_id for r in records}
    if sweep_id is not None and len(parents) == 1:
        parent = parents[0].info.run_id
    elif len(parent_ids) == 1 and None not in parent_ids:
        parent = next(iter(parent_ids))
    else:
        parent = None
    return records, parent, finished[0].info.experiment_id, len(jobs) - len(finished)


def log_report(tracker: Any, files: Sequence[Path], parent: str | None,
               experiment_id: str) -> str:
    """Log the files under report/ of the parent run; runs with no single parent (an
    experiment of several sweeps, or of single runs) get a run of their own for the report."""
    from seqexp.sweep import ROLE_TAG

    tracker.experiment_id = experiment_id
    if parent is None:
        tracker.start(f"report-{datetime.now():%Y%m%d-%H%M%S}", {ROLE_TAG: "report"})
    else:
        tracker.run_id = parent
    for path in files:
        tracker.log_artifact(path, "report")
    if parent is None:
        tracker.end("FINISHED")
    return tracker.run_id


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="seqexp-report",
        description="Table 2 (MRR@20, Recall@20 per dataset, beside the paper's) from the MLflow "
                    "runs of an experiment or sweep, as Markdown, CSV, LaTeX and PNG.")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: sqlite mlflow.db in this directory, "
                             "as for seqexp)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="MLflow experiment name (mlflow.experiment)")
    which.add_argument("--sweep-id", help="the sweep_id tag of a multirun's runs")
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="folder for table2.{md,csv,tex,png} (default: report/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        from seqexp.tracking import Tracker, default_tracking_uri

        uri = args.tracking_uri or default_tracking_uri(Path.cwd())
        tracker = Tracker(uri, args.experiment, create=False)
        runs, parent, experiment_id, skipped = collect(tracker, args.experiment, args.sweep_id)
        table = build_table(runs, load_paper())
        files = write_report(table, args.out)
        run_id = log_report(tracker, files, parent, experiment_id)
    except SeqexpError as exc:
        print(f"seqexp-report: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(to_markdown(table), end="")
    print(f"\n{len(runs)} runs in {len(table.rows)} rows"
          + (f"; {skipped} unfinished runs left out" if skipped else ""))
    print(f"wrote {', '.join(str(f) for f in files)}; logged under report/ of run {run_id}")


if __name__ == "__main__":
    main()
