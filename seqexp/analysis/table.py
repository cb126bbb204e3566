"""Table 2 from finished runs: the runs grouped into rows (models, one per configuration) and
cells (dataset x metric: mean ± std over seeds, beside the paper's value), the notes on settings
and data, and each cell's comparison with the baseline model on the same test events."""

from __future__ import annotations

import csv
import functools
import io
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from seqexp.analysis.significance import (
    holm,
    paired_bootstrap_ci,
    paired_randomisation_p,
    user_bootstrap_ci,
    user_randomisation_p,
)
from seqexp.core.flat_config import flatten
from seqexp.core.rank_metrics import event_values
from seqexp.core.resources import config_dir
from seqexp.core.schema import affects_results

METRICS = (("mrr_at_20", "MRR@20"), ("recall_at_20", "Recall@20"))
DATASET_TITLES = {"ml10m": "ML-10M", "lastfm": "LastFM-1K"}


# The params a run logs besides its config (seqexp.run.experiment: the data's statistics), and
# the one of them that tells which raw file it read: runs on different files are different
# configurations, wherever the file was (dataset.path does not count, its sha256 does).
_DATA_PREFIX = "data."
_DATA_FILE = "data.sha256"


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
    # the config keys the run marked as unable to change its results (its model's included)
    results_free: frozenset[str] = frozenset()


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
    level: str = "users"  # what the tests resample and permute: "users" or "events"

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

    def event_users(self) -> np.ndarray | None:
        """Each test event's user (the order of per_event), None when a run did not log it."""
        if not self.runs or any(r.users is None for r in self.runs):
            return None
        return self.runs[0].users


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
    baseline_row: str | None = None  # the label of the row every † is relative to

    def settings_mark(self, cell: Cell) -> str:
        """'a', 'b', ... for a cell whose runs used non-default settings (footnotes)."""
        if not cell.settings:
            return ""
        text = settings_text(cell.settings)
        if text not in self.settings_notes:
            self.settings_notes.append(text)
        return chr(ord("a") + self.settings_notes.index(text) % 26)


def settings_text(settings: Mapping[str, str]) -> str:
    """"key=value, ..." sorted by key: the text of a settings footnote."""
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


def _configuration(params: Mapping[str, str], results_free: frozenset[str] = frozenset()
                   ) -> dict[str, str]:
    """The params that make a configuration: runs with equal ones, differing only in the seed
    and in keys that cannot change results (the schema's `affects_results`, which resume asks
    too, and the model keys the run marked so), are seeds of one configuration."""
    return {k: v for k, v in params.items()
            if k == _DATA_FILE or (k != "seed" and not k.startswith(_DATA_PREFIX)
                                   and affects_results(k) and k not in results_free)}


def _configuration_key(run: RunRecord) -> frozenset:
    return frozenset(_configuration(run.params, run.results_free).items())


# Keys whose value changes what a model computes, compared with the model's defaults
# (conf/model/<name>.yaml over conf/config.yaml: Table 1 for the RNNs).
_SETTINGS_PREFIXES = ("model.", "train.", "split.", "eval.exclude_seen")


@functools.cache
def model_defaults(model: str, dataset: str | None = None) -> dict[str, str] | None:
    """The flattened default configuration of `seqexp model=<model> dataset=<dataset>`, as a run
    logs it, so that a preset's own values (the MovieLens presets' basket gap) count as
    defaults; `dataset` is left out when conf/dataset/ has no preset of that name (a CSV file's
    own name). None when it cannot be composed (a model this checkout does not know)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [f"model={model}"]
    if dataset is not None and (config_dir() / "dataset" / f"{dataset}.yaml").is_file():
        overrides.append(f"dataset={dataset}")
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        return flatten(OmegaConf.to_container(cfg, resolve=True))
    except Exception:  # a model this checkout does not know
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
NOT_A_PAPER_DATASET = "the paper reports ML-10M and LastFM-1K only"


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
            notes[run.run_id] = ("generated data" if (fmt == "synthetic" or run.dataset ==
                                                      "synthetic") else NOT_A_PAPER_DATASET)
        elif (_unset(run.params.get("dataset.path"))
              or run.params.get("data.sha256") in published[run.dataset]):
            notes[run.run_id] = None
        else:
            notes[run.run_id] = (f"dataset.path={run.params.get('dataset.path')}, a file that "
                                 f"is not the published {dataset_title(run.dataset)} file")
    return notes


def _unset(value: str | None) -> bool:
    return value in (None, "", "None", "null")


def deduplicate(runs: Sequence[RunRecord]) -> tuple[list[RunRecord], int]:
    """One run per (model, dataset, configuration, seed): the first listed (MLflow lists the
    newest first); and how many were left out."""
    kept, seen = [], set()
    for run in runs:
        key = (run.model, run.dataset, _configuration_key(run),
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
        groups[(run.model, run.dataset, _configuration_key(run))].append(run)

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
    model_default = {key: defaults(*key) for key in {(run.model, run.dataset) for run in runs}}
    rows: dict[tuple[str, str], Row] = {}
    for (model, dataset, config), members in groups.items():
        settings = dict(config)
        variant = ", ".join(f"{k}={settings.get(k, '-')}" for k in sorted(varying[model]))
        row = rows.setdefault((model, variant), Row(model, variant))
        differ = non_default_settings(settings, model_default[model, dataset])
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
        return f"{dataset_title(dataset)}: the paper's data (the published archive's file)"
    if None not in notes:
        return f"{dataset_title(dataset)}: not the paper's data ({'; '.join(bad)})"
    return f"{dataset_title(dataset)}: partly not the paper's data ({'; '.join(bad)})"


def add_significance(table: Table, resamples: int, rng: np.random.Generator) -> None:
    """Each cell against the baseline model's cell of its dataset and metric, on the same test
    events: the mean per-event difference, its paired bootstrap 95 % CI and the paired
    randomisation test's p-value, Holm-adjusted over the models of the column. Cells with
    several seeds are compared through their seed-averaged per-event values. Also each cell's
    own bootstrap CI (for the plot)."""
    baselines = [row for row in table.rows if row.model == table.baseline]
    base_row = min(baselines, key=lambda r: (r.variant != "", r.variant), default=None)
    table.baseline_row = None if base_row is None else base_row.label
    missing: dict[str, str] = {}
    for dataset in table.datasets:
        for metric, _ in METRICS:
            values = {id(row): row.cells[(dataset, metric)].per_event(metric)
                      for row in table.rows}
            for row in table.rows:
                if values[id(row)] is not None:
                    cell = row.cells[(dataset, metric)]
                    cell.ci = _bootstrap_ci(values[id(row)], cell.event_users(),
                                            max(resamples // 5, 200), rng)
            reference = values[id(base_row)] if base_row else None
            if reference is None:
                if base_row is not None:
                    ran = base_row.cells[(dataset, metric)].mean is not None
                    missing[dataset_title(dataset)] = (f"the {base_row.label} runs there have no "
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
                users = cell.event_users()  # the same events as the baseline's, so its users
                low, high = _bootstrap_ci(diff, users, max(resamples // 5, 200), rng)
                p = (paired_randomisation_p(diff, resamples, rng) if users is None
                     else user_randomisation_p(diff, users, resamples, rng))
                cell.comparison = Comparison(
                    base_row.label, float(diff.mean()), low, high, p,
                    seeds=(len(cell.runs), len(base.runs)), alpha=table.alpha,
                    level="events" if users is None else "users")
                compared.append(cell.comparison)
            for comparison, adjusted in zip(compared, holm([c.p for c in compared]),
                                            strict=True):
                comparison.p_holm = adjusted
    if base_row is None:
        table.notes.append(f"No significance tests: no {table.baseline} runs (--baseline).")
    for dataset, why in missing.items():
        table.notes.append(f"No significance tests for {dataset}: {why}.")


def _bootstrap_ci(values: np.ndarray, users: np.ndarray | None, resamples: int,
                  rng: np.random.Generator) -> tuple[float, float]:
    """The user-level (cluster) bootstrap where each event's user is known, else events'."""
    if users is None:
        return paired_bootstrap_ci(values, resamples, rng=rng)
    return user_bootstrap_ci(values, users, resamples, rng=rng)


def dataset_title(dataset: str) -> str:
    """The paper's name of a dataset (ML-10M, LastFM-1K), else its config name."""
    return DATASET_TITLES.get(dataset, dataset)
