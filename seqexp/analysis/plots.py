"""Table 2 as charts (matplotlib, imported when a chart is drawn): the grouped bars beside the
paper, and MRR@20 by user history-length quartile."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seqexp.analysis.render import DAGGER
from seqexp.analysis.table import METRICS, Table, dataset_title
from seqexp.core.history import history_quartiles


def plot(table: Table, path: Path) -> list[str]:
    """Grouped bars, seqexp beside the paper, one panel per dataset and metric. Error bars: the
    bootstrap 95 % CI of the mean over test events where the runs' ranks are logged, else ±
    the standard deviation over seeds; the legend says which, below the panels (it hides no
    bar), and lists the paper only where a paper value is drawn. Returns the legend's
    entries."""
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
                   label=f"seqexp ({_error_bars(cells)})", color="C0")
            if not np.isnan(paper).all():
                ax.bar(x + 0.2, paper, 0.4, label="paper", color="C1")
            for i, cell in enumerate(cells):
                if cell.comparison is not None and cell.comparison.significant:
                    ax.annotate(DAGGER, (x[i] - 0.2, ours[i] + errors[1][i]), ha="center",
                                va="bottom", xytext=(0, 2), textcoords="offset points")
            ax.set_title(f"{dataset_title(dataset)} {title}")
            ax.set_xticks(x, [row.label for row in table.rows], rotation=35, ha="right",
                          fontsize=8)
            ax.grid(axis="y", alpha=0.3)
    series = {label: handle for ax in axes.flat
              for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(series.values(), series.keys(), loc="lower center", ncol=len(series),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07 if n_rows == 1 else 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return list(series)


def _error_bars(cells: list) -> str:
    """What a panel's error bars are: each cell's bootstrap CI where its runs logged their
    ranks, else the standard deviation over seeds."""
    with_ci = [cell.ci is not None for cell in cells if cell.mean is not None]
    if with_ci and all(with_ci):
        return "bootstrap 95 % CI"
    if not any(with_ci):
        return "± std over seeds"
    return "bootstrap 95 % CI; ± std over seeds without ranks"


def history_curves(table: Table, dataset: str, metric: str = "mrr_at_20"
                   ) -> tuple[list[tuple[str, np.ndarray]], np.ndarray | None]:
    """Per row with per-event ranks: the metric in each quartile of the users' history length
    (training events; seqexp.core.history.history_quartiles), and the quartile edges."""
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
        ax.set_title(f"{dataset_title(dataset)}: MRR@20 by user history length")
        ax.set_xlabel("quartile of training events per user (upper edge)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
