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
import functools
import io
import logging
import math
import os
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from seqexp.core.errors import SeqexpError

log = logging.getLogger(__name__)

METRICS = (("mrr_at_20", "MRR@20"), ("recall_at_20", "Recall@20"))
DATASET_TITLES = {"ml10m": "ML-10M", "lastfm": "LastFM-1K"}
REPORT_FILES = ("table2.md", "table2.csv", "table2.tex", "table2.png")
# MRR@20 by history-length quartile: written when runs logged their per-event ranks.
HISTORY_PLOT = "mrr_by_history.png"
RANKS_ARTIFACT = "test_ranks.parquet"
# Params that say where or how fast a run ran, not what it computed: runs differing only in
# these (and the seed) are repetitions of one configuration.
_NOT_CONFIGURATION = ("seed", "device", "mlflow.", "paths.", "data.", "train.progress",
                      "train.num_threads", "eval.batch_users", "eval.max_block_elements")


@dataclass
class RunRecord:
    """What the report needs of one finished run. `ranks`: its pessimistic test ranks in the
    order of test_ranks.parquet (sorted by user and position), `events`: a digest of those
    (user, position) keys (two runs ranked the same events iff their digests are equal),
    `users` and `history`: each event's user and that user's training events; all None
    without the artifact."""

    run_id: str
    model: str
    dataset: str
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    parent_id: str | None = None
    ranks: np.ndarray | None = None
    events: str | None = None
    history: np.ndarray | None = None
    users: np.ndarray | None = None


@dataclass
class Comparison:
    """A cell against the baseline's cell of its column, on per-event values."""

    baseline: str
    diff: float  # mean of (cell - baseline) per event
    ci_low: float
    ci_high: float
    p: float  # paired randomisation test
    p_holm: float | None = None  # Holm-adjusted over the models of the column
    seeds: tuple[int, int] = (1, 1)  # runs averaged per event: (cell, baseline)
    alpha: float = 0.05

    @property
    def significant(self) -> bool:
        return self.p_holm is not None and self.p_holm < self.alpha


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    paper: float | None = None
    runs: list[RunRecord] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)  # non-default keys of its runs
    data_note: str | None = None  # why its data is not the paper's; None: it is
    comparison: Comparison | None = None
    ci: tuple[float, float] | None = None  # bootstrap 95 % CI of the mean over events

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

    def per_event(self, metric: str) -> np.ndarray | None:
        """The metric per test event, averaged over the cell's runs (seeds); None unless every
        run has its ranks, all on the same events."""
        if not self.runs or any(r.ranks is None for r in self.runs):
            return None
        if len({r.events for r in self.runs}) != 1:
            return None
        return np.mean([event_values(r.ranks, metric) for r in self.runs], axis=0)


def event_values(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-event reciprocal rank (mrr_at_k) or hit (recall_at_k) from pessimistic ranks."""
    name, k = metric.rsplit("_at_", 1)
    hit = ranks <= int(k)
    if name == "mrr":
        return np.where(hit, 1.0 / np.maximum(ranks, 1), 0.0)
    if name == "recall":
        return hit.astype(np.float64)
    raise ValueError(f"no per-event form for {metric}")


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
    baseline: str = "gru"
    alpha: float = 0.05
    data: dict[str, str] = field(default_factory=dict)  # dataset -> what its data is
    notes: list[str] = field(default_factory=list)  # lines printed under the table
    duplicates: int = 0  # runs left out as repeats of a (configuration, seed)
    settings_notes: list[str] = field(default_factory=list)  # footnote i+1 -> its settings

    def settings_mark(self, cell: Cell) -> str:
        """'a', 'b', ... for a cell whose runs used non-default settings (footnotes)."""
        if not cell.settings:
            return ""
        text = _settings_text(cell.settings)
        if text not in self.settings_notes:
            self.settings_notes.append(text)
        return chr(ord("a") + self.settings_notes.index(text) % 26)


def _settings_text(settings: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))


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


# Keys whose value changes what a model computes, compared with the model's defaults
# (conf/model/<name>.yaml over conf/config.yaml: Table 1 for the RNNs).
_SETTINGS_PREFIXES = ("model.", "train.", "split.", "eval.exclude_seen")


@functools.cache
def model_defaults(model: str) -> dict[str, str] | None:
    """The flattened default configuration of `seqexp model=<model>`, as a run logs it; None
    when it cannot be composed (an unknown model)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from seqexp.core.resources import config_dir
    from seqexp.run.tracking import flatten

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"model={model}"])
        return flatten(OmegaConf.to_container(cfg, resolve=True))
    except Exception:  # noqa: BLE001 - a model this checkout does not know
        return None


def non_default_settings(params: Mapping[str, str], defaults: Mapping[str, str] | None
                         ) -> dict[str, str]:
    """The settings of a run that differ from its model's defaults (keys the defaults lack
    included), among the keys that change what is computed."""
    if defaults is None:
        return {}
    return {k: v for k, v in _configuration(params).items()
            if k.startswith(_SETTINGS_PREFIXES) and defaults.get(k) != v}


# sha256 of the data files inside the published archives, when known (the archives themselves
# are md5-checked on download); runs that downloaded the archive add theirs (data.sha256).
PUBLISHED_SHA256: dict[str, set[str]] = {"ml10m": set(), "lastfm": set()}


def data_notes(runs: Sequence[RunRecord]) -> dict[str, str | None]:
    """Per run id: why its data is not the paper's (None: it is). The paper's data is the file
    of the published archive: downloaded by seqexp (dataset.path unset) or a dataset.path whose
    sha256 equals that file's."""
    published = {name: set(hashes) for name, hashes in PUBLISHED_SHA256.items()}
    for run in runs:
        if run.dataset in published and _unset(run.params.get("dataset.path")) \
                and run.params.get("data.sha256"):
            published[run.dataset].add(run.params["data.sha256"])
    notes: dict[str, str | None] = {}
    for run in runs:
        fmt = run.params.get("dataset.format", "")
        if run.dataset not in published:
            notes[run.run_id] = "synthetic data" if (fmt == "synthetic" or run.dataset ==
                                                     "synthetic") else f"{run.dataset} data"
        elif (_unset(run.params.get("dataset.path"))
              or run.params.get("data.sha256") in published[run.dataset]):
            notes[run.run_id] = None
        else:
            notes[run.run_id] = (f"dataset.path={run.params.get('dataset.path')}, a file that "
                                 f"is not the published {_title(run.dataset)} file")
    return notes


def _unset(value: str | None) -> bool:
    return value in (None, "", "None", "null")


def deduplicate(runs: Sequence[RunRecord]) -> tuple[list[RunRecord], int]:
    """One run per (model, dataset, configuration, seed): the first listed (MLflow lists the
    newest first); and how many were left out."""
    kept, seen = [], set()
    for run in runs:
        key = (run.model, run.dataset, frozenset(_configuration(run.params).items()),
               run.params.get("seed"))
        if key not in seen:
            seen.add(key)
            kept.append(run)
    return kept, len(runs) - len(kept)


def build_table(runs: Sequence[RunRecord], paper: Mapping[tuple[str, str, str], float],
                baseline: str = "gru", alpha: float = 0.05, resamples: int = 5000,
                defaults: Any = model_defaults, seed: int = 0) -> Table:
    """Group runs into rows and cells. Runs of one model and dataset whose configurations differ
    only in the seed are one cell (mean ± std); a repeat of a configuration and seed counts once.
    A model that ran in several configurations gets one row per configuration, labelled by the
    params that vary within a dataset; params that vary only across datasets (dataset.*) do not
    split a row. Each cell is compared with `baseline`'s (see add_significance) and notes the
    settings that differ from `defaults(model)` and whether its data is the paper's."""
    runs, duplicates = deduplicate(runs)
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

    notes = data_notes(runs)
    model_default = {m: defaults(m) for m in {run.model for run in runs}}
    rows: dict[tuple[str, str], Row] = {}
    for (model, dataset, config), members in groups.items():
        settings = dict(config)
        variant = ", ".join(f"{k}={settings.get(k, '-')}" for k in sorted(varying[model]))
        row = rows.setdefault((model, variant), Row(model, variant))
        differ = non_default_settings(settings, model_default[model])
        reasons = sorted({notes[r.run_id] for r in members if notes[r.run_id]})
        for metric, _ in METRICS:
            cell = row.cells.setdefault((dataset, metric),
                                        Cell(paper=paper.get((model, dataset, metric))))
            cell.values.extend(r.metrics[f"test_{metric}"] for r in members
                               if f"test_{metric}" in r.metrics)
            cell.runs.extend(r for r in members if f"test_{metric}" in r.metrics)
            cell.settings |= differ
            if reasons:
                cell.data_note = "; ".join(reasons)

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
    table = Table(ordered, datasets, baseline=baseline, alpha=alpha, duplicates=duplicates)
    table.data = {d: _column_data(d, [notes[r.run_id] for r in runs if r.dataset == d])
                  for d in datasets}
    add_significance(table, resamples, np.random.default_rng(seed))
    return table


def _column_data(dataset: str, notes: Sequence[str | None]) -> str:
    bad = sorted({n for n in notes if n})
    if not bad:
        return f"{_title(dataset)}: the paper's data (the published archive's file)"
    if None not in notes:
        return f"{_title(dataset)}: not the paper's data ({'; '.join(bad)})"
    return f"{_title(dataset)}: partly not the paper's data ({'; '.join(bad)})"


def add_significance(table: Table, resamples: int, rng: np.random.Generator) -> None:
    """Each cell against the baseline model's cell of its dataset and metric, on the same test
    events: the mean per-event difference, its paired bootstrap 95 % CI and the paired
    randomisation test's p-value, Holm-adjusted over the models of the column. Cells with
    several seeds are compared through their seed-averaged per-event values. Also each cell's
    own bootstrap CI (for the plot)."""
    baselines = [row for row in table.rows if row.model == table.baseline]
    base_row = min(baselines, key=lambda r: (r.variant != "", r.variant), default=None)
    missing: dict[str, str] = {}
    for dataset in table.datasets:
        for metric, _ in METRICS:
            values = {id(row): row.cells[(dataset, metric)].per_event(metric)
                      for row in table.rows}
            for row in table.rows:
                if values[id(row)] is not None:
                    row.cells[(dataset, metric)].ci = paired_bootstrap_ci(
                        values[id(row)], max(resamples // 5, 200), rng=rng)
            reference = values[id(base_row)] if base_row else None
            if reference is None:
                if base_row is not None:
                    ran = base_row.cells[(dataset, metric)].mean is not None
                    missing[_title(dataset)] = (f"the {base_row.label} runs there have no "
                                                f"test_ranks.parquet" if ran else
                                                f"no {base_row.label} run")
                continue
            base = base_row.cells[(dataset, metric)]
            compared = []
            for row in table.rows:
                cell = row.cells[(dataset, metric)]
                if row is base_row or values[id(row)] is None \
                        or cell.runs[0].events != base.runs[0].events:
                    continue
                diff = values[id(row)] - reference
                low, high = paired_bootstrap_ci(diff, max(resamples // 5, 200), rng=rng)
                cell.comparison = Comparison(
                    base_row.label, float(diff.mean()), low, high,
                    paired_randomisation_p(diff, resamples, rng),
                    seeds=(len(cell.runs), len(base.runs)), alpha=table.alpha)
                compared.append(cell.comparison)
            for comparison, adjusted in zip(compared, holm([c.p for c in compared]),
                                            strict=True):
                comparison.p_holm = adjusted
    if base_row is None:
        table.notes.append(f"No significance tests: no {table.baseline} runs (--baseline).")
    for dataset, why in missing.items():
        table.notes.append(f"No significance tests for {dataset}: {why}.")


# ---- statistics ------------------------------------------------------------------------------
# Both resampling procedures work on the distinct values of the per-event differences and their
# counts: a bootstrap resample of n events is a multinomial draw of how often each distinct value
# is picked, and flipping the signs of the c events that share a value adds
# value * (2 * Binomial(c, 1/2) - c). Exact, and the cost grows with the number of distinct
# values (at most 21 x 21 for one seed's MRR@20), not with the millions of events.

def paired_bootstrap_ci(diff: np.ndarray, n_resamples: int = 2000, level: float = 0.95,
                        rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Percentile confidence interval of the mean of the paired differences, resampling events
    with replacement."""
    rng = rng or np.random.default_rng(0)
    values, counts = np.unique(np.asarray(diff, dtype=np.float64), return_counts=True)
    n = int(counts.sum())
    means = np.empty(n_resamples)
    step = max(1, _MAX_DRAWS // max(len(values), 1))
    for lo in range(0, n_resamples, step):
        size = min(step, n_resamples - lo)
        means[lo:lo + size] = rng.multinomial(n, counts / n, size=size) @ values / n
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_randomisation_p(diff: np.ndarray, n_resamples: int = 10000,
                           rng: np.random.Generator | None = None) -> float:
    """Two-sided p-value of the paired randomisation (sign-flip) test of mean difference 0:
    under the null hypothesis the two runs' values of an event are exchangeable, so each
    difference is as likely to have the opposite sign. Exact (all 2^n sign patterns) for up to
    12 nonzero differences, else Monte Carlo with p = (1 + #{|T*| >= |T|}) / (1 + resamples)."""
    rng = rng or np.random.default_rng(0)
    diff = np.asarray(diff, dtype=np.float64)
    diff = diff[diff != 0]
    if len(diff) == 0:
        return 1.0
    observed = abs(diff.sum())
    tolerance = 1e-9 * max(np.abs(diff).sum(), 1e-300)  # float sums of equal statistics
    if len(diff) <= 12:
        signs = 1 - 2 * ((np.arange(2 ** len(diff))[:, None] >> np.arange(len(diff))) & 1)
        return float((np.abs(signs @ diff) >= observed - tolerance).mean())
    values, counts = np.unique(diff, return_counts=True)
    extreme = 0
    step = max(1, _MAX_DRAWS // len(values))
    for lo in range(0, n_resamples, step):
        size = min(step, n_resamples - lo)
        flips = 2 * rng.binomial(counts, 0.5, size=(size, len(values))) - counts
        extreme += int((np.abs(flips @ values) >= observed - tolerance).sum())
    return (1 + extreme) / (1 + n_resamples)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out.tolist()


_MAX_DRAWS = 5_000_000  # resamples x distinct values per chunk (bounds the memory)


# ---- formats ---------------------------------------------------------------------------------

DAGGER, DOUBLE_DAGGER = "†", "‡"


def _num(value: float | None, digits: int = 5, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _ours(cell: Cell, pm: str = " ± ") -> str:
    if cell.mean is None:
        return "not run"
    text = _num(cell.mean)
    if cell.std is not None:
        text += f"{pm}{_num(cell.std)} (n={cell.n})"
    return text


def _marks(table: Table, cell: Cell) -> list[str]:
    """Footnote marks of a cell: † significant against the baseline, ‡ not the paper's data,
    a, b, ... settings other than the model's defaults."""
    marks = []
    if cell.comparison is not None and cell.comparison.significant:
        marks.append(DAGGER)
    if cell.mean is not None and cell.data_note:
        marks.append(DOUBLE_DAGGER)
    settings = table.settings_mark(cell) if cell.mean is not None else ""
    if settings:
        marks.append(f"[{settings}]")
    return marks


def _title(dataset: str) -> str:
    return DATASET_TITLES.get(dataset, dataset)


def _significance_note(table: Table) -> str:
    averaged = any(c.comparison is not None and max(c.comparison.seeds) > 1
                   for row in table.rows for c in row.cells.values())
    text = (f"{DAGGER} differs from {table.baseline} on the same test events: paired "
            f"randomisation test on per-event reciprocal rank (MRR@20) or hit (Recall@20), "
            f"Holm-corrected over the models of the column, p < {table.alpha:g}.")
    if averaged:
        text += (" Where a cell has several seeds, the test runs over the seed-averaged "
                 "per-event values (the CSV gives the CI, p-values and seeds).")
    return text


def footnotes(table: Table) -> list[str]:
    """The lines under the table: what each mark means, and what was left out."""
    lines = []
    if any(c.comparison is not None for row in table.rows for c in row.cells.values()):
        lines.append(_significance_note(table))
    if any(c.data_note and c.mean is not None for row in table.rows for c in row.cells.values()):
        lines.append(f"{DOUBLE_DAGGER} not the paper's data (see Data above).")
    for i, text in enumerate(table.settings_notes):
        lines.append(f"[{chr(ord('a') + i)}] settings other than the model's defaults: {text}")
    if table.duplicates:
        lines.append(f"{table.duplicates} repeated runs (same configuration and seed) counted "
                     f"once.")
    return lines + table.notes


def header_lines(table: Table) -> list[str]:
    return ["Data: " + "; ".join(table.data[d] for d in table.datasets) + "."]


def to_markdown(table: Table) -> str:
    table.settings_notes.clear()  # marks are numbered in the order they appear
    header = ["model"]
    for dataset in table.datasets:
        for _, title in METRICS:
            header += [f"{_title(dataset)} {title}", "paper", "Δ"]
    lines = [*header_lines(table), "",
             "| " + " | ".join(header) + " |",
             "| --- |" + " ---: |" * (len(header) - 1)]
    for row in table.rows:
        cells = [row.label]
        for dataset in table.datasets:
            for metric, _ in METRICS:
                cell = row.cells[(dataset, metric)]
                marks = _marks(table, cell)
                ours = _ours(cell) + (" " + " ".join(marks) if marks else "")
                cells += [ours, _num(cell.paper), _num(cell.diff, signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"{line}  " for line in footnotes(table)]
    return "\n".join(lines) + "\n"


_COMPARISON_PARTS = ("vs", "diff_vs", "ci_low", "ci_high", "p", "p_holm", "significant",
                     "seeds_averaged", "mean_ci_low", "mean_ci_high", "settings", "data")


def csv_columns(datasets: Iterable[str]) -> list[str]:
    columns = ["model", "variant"]
    for dataset in datasets:
        for metric, _ in METRICS:
            columns += [f"{dataset}_{metric}_{part}"
                        for part in ("mean", "std", "n", "paper", "diff", *_COMPARISON_PARTS)]
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
                c = cell.comparison
                values += ([c.baseline, _repr(c.diff), _repr(c.ci_low), _repr(c.ci_high),
                            _repr(c.p), _repr(c.p_holm), str(c.significant).lower(),
                            f"{c.seeds[0]}/{c.seeds[1]}"] if c else [""] * 8)
                values += [_repr(cell.ci[0]), _repr(cell.ci[1])] if cell.ci else ["", ""]
                values += [_settings_text(cell.settings), cell.data_note or ""]
        writer.writerow(values)
    return out.getvalue()


def _repr(value: float | None) -> str:
    return "" if value is None else repr(float(value))


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
                "$": r"\$", "{": r"\{", "}": r"\}", "<": r"$<$", ">": r"$>$",
                "≤": r"$\leq$", DAGGER: r"$^\dagger$", DOUBLE_DAGGER: r"$^\ddagger$"}


def _tex(text: str) -> str:
    return re.sub("|".join(map(re.escape, _TEX_ESCAPES)), lambda m: _TEX_ESCAPES[m.group()],
                  text)


def _tex_marks(marks: list[str]) -> str:
    symbols = {DAGGER: r"\dagger", DOUBLE_DAGGER: r"\ddagger"}
    return (f"$^{{{','.join(symbols.get(m, m.strip('[]')) for m in marks)}}}$" if marks
            else "")


def to_latex(table: Table) -> str:
    table.settings_notes.clear()
    per_dataset = 3 * len(METRICS)
    lines = [r"% Table 2: seqexp vs Donkers et al. (RecSys 2017); needs \usepackage{booktabs}",
             *(f"% {line}" for line in header_lines(table)),
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
                ours = _ours(cell, pm=r" $\pm$ ") + _tex_marks(_marks(table, cell))
                diff = _num(cell.diff, signed=True)
                cells += [ours, _num(cell.paper), f"${diff}$" if diff else ""]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip{\footnotesize"]
    lines += [_tex(line) + r"\par" for line in header_lines(table) + footnotes(table)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def plot(table: Table, path: Path) -> None:
    """Grouped bars, seqexp beside the paper, one panel per dataset and metric. Error bars: the
    bootstrap 95 % CI of the mean over test events where the runs' ranks are logged, else ±
    the standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(table.datasets), len(METRICS)
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False,
                             figsize=(max(6.0, 0.9 * len(table.rows) + 2) * n_cols / 1.6,
                                      3.4 * n_rows))
    x = np.arange(len(table.rows))
    for r, dataset in enumerate(table.datasets):
        for c, (metric, title) in enumerate(METRICS):
            ax = axes[r][c]
            cells = [row.cells[(dataset, metric)] for row in table.rows]
            ours = np.array([cell.mean if cell.mean is not None else np.nan for cell in cells])
            errors = np.array([
                [ours[i] - cell.ci[0], cell.ci[1] - ours[i]] if cell.ci is not None
                else [cell.std or 0.0, cell.std or 0.0] for i, cell in enumerate(cells)]).T
            paper = [cell.paper if cell.paper is not None else np.nan for cell in cells]
            ax.bar(x - 0.2, ours, 0.4, yerr=np.clip(errors, 0, None), capsize=3,
                   label="seqexp (95 % CI)")
            ax.bar(x + 0.2, paper, 0.4, label="paper")
            for i, cell in enumerate(cells):
                if cell.comparison is not None and cell.comparison.significant:
                    ax.annotate(DAGGER, (x[i] - 0.2, ours[i] + errors[1][i]), ha="center",
                                va="bottom", xytext=(0, 2), textcoords="offset points")
            ax.set_title(f"{_title(dataset)} {title}")
            ax.set_xticks(x, [row.label for row in table.rows], rotation=35, ha="right",
                          fontsize=8)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def history_curves(table: Table, dataset: str, metric: str = "mrr_at_20"
                   ) -> tuple[list[tuple[str, np.ndarray]], np.ndarray | None]:
    """Per row with per-event ranks: the metric in each quartile of the users' history length
    (training events; seqexp.engine.evaluator.history_quartiles), and the quartile edges."""
    from seqexp.engine.evaluator import history_quartiles

    curves, edges = [], None
    for row in table.rows:
        cell = row.cells[(dataset, metric)]
        values = cell.per_event(metric)
        if values is None or cell.runs[0].history is None:
            continue
        run = cell.runs[0]
        users = run.users if run.users is not None else np.arange(len(values))
        per_user = np.zeros(int(users.max()) + 1, dtype=np.int64)
        per_user[users] = run.history
        quartile, edges = history_quartiles(per_user, users)
        sums = np.bincount(quartile, values, minlength=4)
        counts = np.bincount(quartile, minlength=4)
        curves.append((row.label, np.divide(sums, counts, out=np.full(4, np.nan),
                                            where=counts > 0)))
    return curves, edges


def plot_history(table: Table, path: Path) -> bool:
    """MRR@20 by history-length quartile, one line per model and a panel per dataset; False
    (nothing written) when no run has per-event ranks."""
    panels = [(d, *history_curves(table, d)) for d in table.datasets]
    panels = [p for p in panels if p[1]]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(5.5 * len(panels), 3.8))
    for ax, (dataset, curves, edges) in zip(axes[0], panels, strict=True):
        labels = [f"Q{j + 1}\n≤ {edges[j + 1]:g}" for j in range(4)]
        for label, values in curves:
            ax.plot(labels, values, marker="o", label=label)
        ax.set_title(f"{_title(dataset)}: MRR@20 by user history length")
        ax.set_xlabel("quartile of training events per user (upper edge)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(table: Table, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, table_csv, tex, png = (out_dir / name for name in REPORT_FILES)
    md.write_text(to_markdown(table))
    table_csv.write_text(to_csv(table))
    tex.write_text(to_latex(table))
    plot(table, png)
    files = [md, table_csv, tex, png]
    if plot_history(table, out_dir / HISTORY_PLOT):
        files.append(out_dir / HISTORY_PLOT)
    return files


# ---- MLflow ----------------------------------------------------------------------------------

def _record(run: Any, client: Any = None) -> RunRecord:
    tags = run.data.tags
    from seqexp.run.sweep import PARENT_TAG

    record = RunRecord(run.info.run_id, tags.get("model", "?"), tags.get("dataset", "?"),
                       dict(run.data.params), dict(run.data.metrics), tags.get(PARENT_TAG))
    if client is not None:
        attach_ranks(record, client)
    return record


def attach_ranks(record: RunRecord, client: Any) -> None:
    """Read the run's test_ranks.parquet artifact, when it has one, into `record`."""
    import hashlib

    from seqexp.engine.evaluator import read_ranks
    from seqexp.run.tracking import with_lock_retry

    listed = {a.path for a in with_lock_retry(client.list_artifacts, record.run_id)}
    if RANKS_ARTIFACT not in listed:
        return
    with tempfile.TemporaryDirectory() as folder:
        local = with_lock_retry(client.download_artifacts, record.run_id, RANKS_ARTIFACT, folder)
        columns, _ = read_ranks(Path(local))
    keys = np.stack([columns["user"], columns["position"]])
    record.events = hashlib.sha256(keys.tobytes()).hexdigest()
    record.ranks = columns["rank_pessimistic"].astype(np.int32)
    record.users = columns["user"].astype(np.int32)
    record.history = columns["user_train_events"].astype(np.int32)


def collect(tracker: Any, experiment: str | None, sweep_id: str | None
            ) -> tuple[list[RunRecord], str | None, str, int]:
    """Finished runs of the experiment or sweep, the parent run to log the report to (None when
    the runs have no single parent), the experiment id, and how many runs were left out."""
    from seqexp.run.sweep import PARENT_ROLE, ROLE_TAG, SWEEP_ID_TAG

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
    records = [_record(r, tracker.client) for r in finished]
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
    from seqexp.run.sweep import ROLE_TAG

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
                        help="folder for table2.{md,csv,tex,png} and mrr_by_history.png "
                             "(default: report/)")
    parser.add_argument("--baseline", default="gru",
                        help="the reference model every other model is tested against "
                             "(default: gru)")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="significance level after Holm's correction (default: 0.05)")
    parser.add_argument("--resamples", type=int, default=5000,
                        help="randomisation-test resamples (the bootstrap draws a fifth of "
                             "that, at least 200; default: 5000)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the resampling (default: 0)")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1 or args.resamples < 1:
        parser.error("--alpha must be in (0, 1) and --resamples positive")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        from seqexp.run.tracking import Tracker, default_tracking_uri

        uri = args.tracking_uri or default_tracking_uri(Path.cwd())
        tracker = Tracker(uri, args.experiment, create=False)
        runs, parent, experiment_id, skipped = collect(tracker, args.experiment, args.sweep_id)
        table = build_table(runs, load_paper(), baseline=args.baseline, alpha=args.alpha,
                            resamples=args.resamples, seed=args.seed)
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
