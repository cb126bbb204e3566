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
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from seqexp.analysis.plots import plot, plot_history
from seqexp.analysis.render import to_csv, to_latex, to_markdown
from seqexp.analysis.table import METRICS, RunRecord, Table, build_table, load_paper
from seqexp.core.errors import SeqexpError
from seqexp.core.metric_names import flat_metrics
from seqexp.core.ranks_file import RANKS_FILE, read_ranks
from seqexp.run.sweep import SweepCallback, SweepInfo
from seqexp.run.tags import (
    PARENT_ROLE,
    PARENT_TAG,
    RESULTS_FREE_TAG,
    ROLE_TAG,
    SWEEP_ID_TAG,
)
from seqexp.run.tracking import (
    Tracker,
    WriteForbidden,
    default_tracking_uri,
    with_lock_retry,
)

log = logging.getLogger(__name__)

REPORT_SUFFIXES = (".md", ".csv", ".tex", ".png")
# MRR@20 by history-length quartile: written when runs logged their per-event ranks.
HISTORY_PLOT = "_mrr_by_history.png"


def report_files(name: str) -> list[str]:
    """The report's files for an experiment or sweep `name`: NAME.md, .csv, .tex, .png."""
    return [f"{name}{suffix}" for suffix in REPORT_SUFFIXES]


def write_report(table: Table, out_dir: Path, name: str) -> list[Path]:
    """Table 2 as Markdown, CSV, LaTeX and PNG in `out_dir`, named after the experiment or
    sweep `name`, with the history chart when the runs logged their ranks; the files written.
    They are made in a temporary folder inside `out_dir` and moved into place, so a failure
    leaves no half-written report; a folder that cannot be written is one line naming it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SeqexpError(f"--out {out_dir} is a file; name a folder (it is created if need be)")
    staging: Path | None = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".report.", dir=out_dir))
        md, table_csv, tex, png = (staging / file for file in report_files(name))
        md.write_text(to_markdown(table))
        table_csv.write_text(to_csv(table))
        tex.write_text(to_latex(table))
        plot(table, png)
        made = [md, table_csv, tex, png]
        if plot_history(table, staging / f"{name}{HISTORY_PLOT}"):
            made.append(staging / f"{name}{HISTORY_PLOT}")
        for path in made:
            os.replace(path, out_dir / path.name)
    except OSError as exc:
        raise SeqexpError(f"--out {out_dir}: cannot write the report there "
                          f"({exc.strerror or exc}); name a folder you can write to") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / path.name for path in made]


def _record(run: Any, client: Any = None) -> RunRecord:
    tags = run.data.tags
    results_free = frozenset(filter(None, tags.get(RESULTS_FREE_TAG, "").split(",")))
    record = RunRecord(run.info.run_id, tags.get("model", "?"), tags.get("dataset", "?"),
                       dict(run.data.params), flat_metrics(run.data.metrics), tags.get(PARENT_TAG),
                       results_free=results_free)
    if client is not None:
        attach_ranks(record, client)
    return record


def attach_ranks(record: RunRecord, client: Any) -> None:
    """Read the run's test_ranks.parquet artifact, when it has one, into `record`."""
    import hashlib

    listed = {a.path for a in with_lock_retry(client.list_artifacts, record.run_id)}
    if RANKS_FILE not in listed:
        return
    with tempfile.TemporaryDirectory() as folder:
        local = with_lock_retry(client.download_artifacts, record.run_id, RANKS_FILE, folder)
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
                and any(f"test_{m}" in flat_metrics(r.data.metrics) for m, _ in METRICS)]
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
    experiment of several sweeps, or of single runs) get a run of their own for the report.
    A server that refuses the writes (WriteForbidden: the user may only read) keeps no report
    run half-made."""
    tracker.experiment_id = experiment_id
    if parent is None:
        tracker.start(f"report-{datetime.now():%Y%m%d-%H%M%S}", {ROLE_TAG: "report"})
    else:
        tracker.run_id = parent
    try:
        for path in files:
            tracker.log_artifact(path, "report")
    except WriteForbidden:
        if parent is None:
            tracker.client.delete_run(tracker.run_id)
        raise
    if parent is None:
        tracker.end("FINISHED")
    return tracker.run_id


def logged_where(tracker: Any, files: Sequence[Path], parent: str | None, experiment_id: str,
                 no_log: bool) -> str:
    """Log the report unless no_log; the line that says where it went, or why nowhere."""
    if no_log:
        return "logged nothing (--no-log)"
    try:
        return f"logged under report/ of run {log_report(tracker, files, parent, experiment_id)}"
    except WriteForbidden as exc:
        return f"logged nothing: {exc}; the files above are the report"


def _parser() -> argparse.ArgumentParser:
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
                        help="folder for NAME.{md,csv,tex,png} and NAME_mrr_by_history.png, "
                             "NAME the experiment or sweep-ID (default: report/)")
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
    parser.add_argument("--no-log", action="store_true",
                        help="write the files only; log nothing to MLflow (without it, the "
                             "report is logged where the user may write, else nowhere)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1 or args.resamples < 1:
        parser.error("--alpha must be in (0, 1) and --resamples positive")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        uri = args.tracking_uri or default_tracking_uri(Path.cwd())
        tracker = Tracker(uri, args.experiment, create=False)
        runs, parent, experiment_id, skipped = collect(tracker, args.experiment, args.sweep_id)
        table = build_table(runs, load_paper(), baseline=args.baseline, alpha=args.alpha,
                            resamples=args.resamples, seed=args.seed)
        files = write_report(table, args.out, args.experiment or f"sweep-{args.sweep_id}")
        where = logged_where(tracker, files, parent, experiment_id, args.no_log)
    except SeqexpError as exc:
        print(f"seqexp-report: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(to_markdown(table), end="")
    print(f"\n{len(runs)} runs in {len(table.rows)} rows"
          + (f"; {skipped} unfinished runs left out" if skipped else ""))
    print(f"wrote {', '.join(str(f) for f in files)}; {where}")


class SweepReportCallback(SweepCallback):
    """The sweep callback conf/config.yaml registers: at the end of a multirun its parent run
    gets this report of its jobs (under report/), as seqexp-report --sweep-id would make it."""

    def report(self, tracker: Tracker, info: SweepInfo, name: str, sweep_dir: Path) -> None:
        runs, _, _, _ = collect(tracker, None, info.sweep_id)
        table = build_table(runs, load_paper())
        for path in write_report(table, sweep_dir / "report", name):
            tracker.log_artifact(path, "report")
        log.info("sweep %s: report logged under report/ of its parent run", info.sweep_id)


if __name__ == "__main__":
    main()
