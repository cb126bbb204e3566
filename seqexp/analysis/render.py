"""Table 2 as text: Markdown (with its footnotes), CSV and LaTeX."""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable
from typing import Any

from seqexp.analysis.table import METRICS, Cell, Table, dataset_title, settings_text

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


def _significance_note(table: Table) -> str:
    comparisons = [c.comparison for row in table.rows for c in row.cells.values()
                   if c.comparison is not None]
    averaged = any(max(c.seeds) > 1 for c in comparisons)
    by_events = any(c.level == "events" for c in comparisons)
    # the row itself: a model that ran in several settings has several rows
    baseline = f"the row {table.baseline_row or table.baseline}"
    text = (f"{DAGGER} differs from {baseline} (unmarked itself) on the same test events: paired "
            f"randomisation test on per-event reciprocal rank (MRR@20) or hit (Recall@20) "
            f"that permutes users (all of a user's test events together), Holm-corrected "
            f"over the models of the column, p < {table.alpha:g}.")
    if by_events:
        text += (" Runs that did not log each event's user are tested event by event, which "
                 "overstates significance (the CSV's level column says which).")
    if averaged:
        text += (" Where a cell has several seeds, the test runs over the seed-averaged "
                 "per-event values: its CI and p-value leave the seed-to-seed spread out, "
                 "which the ± std shows (the CSV gives the CI, p-values and seeds).")
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
            header += [f"{dataset_title(dataset)} {title}", "paper", "Δ"]
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
                     "seeds_averaged", "level", "mean_ci_low", "mean_ci_high", "settings", "data")


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
                            f"{c.seeds[0]}/{c.seeds[1]}", c.level] if c else [""] * 9)
                values += [_repr(cell.ci[0]), _repr(cell.ci[1])] if cell.ci else ["", ""]
                values += [settings_text(cell.settings), cell.data_note or ""]
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
        top.append(rf"\multicolumn{{{per_dataset}}}{{c}}{{{_tex(dataset_title(dataset))}}}")
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
