"""Multirun = one MLflow parent run per sweep, every job a nested child run.

`SweepCallback` (registered in conf/config.yaml under hydra.callbacks) creates the parent run
before the sweeper launches anything and writes where it lives into the sweep folder
(`mlflow_sweep.json`). Each job, in whatever process or machine the launcher puts it (joblib's
worker processes, a SLURM node through submitit, a Ray worker), reads that file and tags its own
run with `mlflow.parentRunId` (which the MLflow UI nests) and `sweep_id` (which seqexp-report
selects by). A file rather than an environment variable, because a launcher may start its
workers before, or far away from, the process that started the sweep; the sweep folder is the
one place every launcher already shares with its jobs.

Opening the store in the parent process first also creates a SQLite schema and the experiment
once, before parallel jobs could race to do it.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from seqexp.core import liveness
from seqexp.core.atomic import write_json
from seqexp.core.errors import message_line
from seqexp.core.metric_names import flat_metrics
from seqexp.run.tags import (
    ERROR_TAG,
    PARENT_ROLE,
    PARENT_TAG,
    ROLE_TAG,
    SWEEP_ID_TAG,
    SWEEP_JOB_TAG,
)
from seqexp.run.tracking import (
    Tracker,
    default_tracking_uri,
    git_tags,
    process_tags,
    ui_hint,
    with_lock_retry,
)

log = logging.getLogger(__name__)

SWEEP_FILE = "mlflow_sweep.json"
# Files a sweeper leaves in the sweep folder that belong with the parent run.
_SWEEP_ARTIFACTS = ("multirun.yaml", "optimization_results.yaml")

# Parent runs started by this process and not ended yet: ended FAILED at exit when the sweep
# raised (Hydra calls on_multirun_end only after a sweep that returned).
_open_sweeps: dict[str, SweepInfo] = {}


@dataclass(frozen=True)
class SweepInfo:
    """Where a sweep's parent run lives; written to and read from the sweep folder."""

    sweep_id: str
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str

    def child_tags(self, job_num: int | str) -> dict[str, str]:
        return {PARENT_TAG: self.parent_run_id, SWEEP_ID_TAG: self.sweep_id,
                SWEEP_JOB_TAG: str(job_num)}

    def write(self, sweep_dir: Path) -> Path:
        path = sweep_dir / SWEEP_FILE
        write_json(path, asdict(self))
        return path

    @classmethod
    def read(cls, sweep_dir: Path) -> SweepInfo | None:
        path = sweep_dir / SWEEP_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


def new_sweep_id() -> str:
    """Sortable by start time and unique across machines: 20261128-015644-3fa9c1."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def tracking_uri_of(cfg: DictConfig, launch_dir: Path) -> str:
    """mlflow.tracking_uri, or the default SQLite file of the launch directory."""
    return cfg.mlflow.tracking_uri or default_tracking_uri(launch_dir)


def sweep_dir_of(hydra_cfg: Any) -> Path:
    """The sweep folder as an absolute path (it is relative to the launch directory)."""
    return Path(hydra_cfg.runtime.cwd) / str(hydra_cfg.sweep.dir)


def job_tags(hydra_cfg: Any, cfg: DictConfig) -> tuple[SweepInfo | None, dict[str, str]]:
    """The sweep a multirun job belongs to and the tags its run gets. A job tracked in another
    store or experiment than its parent (a sweep over mlflow.*) keeps the sweep_id but is not
    nested: MLflow nests runs only within one experiment."""
    info = SweepInfo.read(sweep_dir_of(hydra_cfg))
    if info is None:
        return None, {}
    tags = info.child_tags(hydra_cfg.job.num)
    if (tracking_uri_of(cfg, Path(hydra_cfg.runtime.cwd)) != info.tracking_uri
            or cfg.mlflow.experiment != info.experiment):
        log.warning("job %s is tracked outside its sweep's experiment; not nested under %s",
                    hydra_cfg.job.num, info.parent_run_id)
        del tags[PARENT_TAG]
    return info, tags


def record_failed_job(info: SweepInfo, tags: Mapping[str, str], name: str,
                      error: BaseException) -> None:
    """Make a failed job visible under its parent: the run it started (already ended FAILED)
    gets the error as a tag; a job that failed before creating a run (bad config) gets a FAILED
    run of its own. Never raises: the job's own error is what the sweeper must see."""
    message = message_line(error, limit=4000)
    try:
        tracker = Tracker(info.tracking_uri, info.experiment)
        found = tracker.search(f"tags.{SWEEP_ID_TAG} = '{info.sweep_id}' and "
                               f"tags.{SWEEP_JOB_TAG} = '{tags[SWEEP_JOB_TAG]}'")
        if found:
            tracker.run_id = found[0].info.run_id
            tracker.set_tags({ERROR_TAG: message})
            return
        tracker.start(name, {**tags, ERROR_TAG: message})
        tracker.end("FAILED")
    except Exception as exc:  # bookkeeping only
        log.warning("could not record the failed job in MLflow: %s", exc)


def _sweep_params(config: DictConfig) -> dict[str, str]:
    hydra_cfg = config.hydra
    params = {
        "sweep.overrides": " ".join(hydra_cfg.overrides.task),
        "sweep.sweeper": str(OmegaConf.select(hydra_cfg, "sweeper._target_")),
        "sweep.launcher": str(OmegaConf.select(hydra_cfg, "launcher._target_")),
    }
    search = OmegaConf.select(hydra_cfg, "sweeper.params")
    if search:
        params |= {f"sweep.params.{k}": str(v) for k, v in search.items()}
    for key in ("n_trials", "direction", "n_jobs"):
        value = OmegaConf.select(hydra_cfg, f"sweeper.{key}")
        if value is not None:
            params[f"sweep.{key}"] = str(value)
    n_jobs = OmegaConf.select(hydra_cfg, "launcher.n_jobs")
    if n_jobs is not None:
        params["sweep.launcher.n_jobs"] = str(n_jobs)
    return params


def _parent_name(config: DictConfig, sweep_id: str) -> str:
    choices = config.hydra.runtime.choices
    preset = choices.get("experiment") or choices.get("hparams_search") or "sweep"
    return f"{preset}-{sweep_id}"


def end_open_sweeps(status: str = "FAILED") -> None:
    """End the parent run of every sweep this process started and did not finish."""
    for sweep_id, info in list(_open_sweeps.items()):
        _open_sweeps.pop(sweep_id, None)
        try:
            Tracker(info.tracking_uri, info.experiment, info.parent_run_id).end(status)
            log.info("sweep %s ended %s", sweep_id, status)
        except Exception as exc:  # at exit, after the real error was shown
            log.warning("could not end the parent run of sweep %s: %s", sweep_id, exc)


atexit.register(end_open_sweeps)


def summarise_children(runs: Sequence[Any], monitor: str) -> tuple[dict[str, float], str | None]:
    """Counts by status and the best child by its monitored validation score."""
    counts = {"jobs_finished": 0.0, "jobs_failed": 0.0, "jobs_killed": 0.0}
    best_value, best_run = -math.inf, None
    for run in runs:
        key = f"jobs_{run.info.status.lower()}"
        if key in counts:
            counts[key] += 1
        value = flat_metrics(run.data.metrics).get(monitor)
        if run.info.status == "FINISHED" and value is not None and value > best_value:
            best_value, best_run = value, run.info.run_id
    if best_run is not None:
        counts[monitor] = best_value
    return counts, best_run


class SweepCallback(Callback):
    """Creates the sweep's MLflow parent run before any job starts and ends it after the last.
    Holds only plain data: launchers pickle callbacks to their workers."""

    def __init__(self) -> None:
        self.info: SweepInfo | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[liveness.SWEEP_PID_ENV] = str(os.getpid())  # for the workers it starts
        launch_dir = Path(config.hydra.runtime.cwd)
        sweep_dir = sweep_dir_of(config.hydra)
        tracker = Tracker(tracking_uri_of(config, launch_dir), config.mlflow.experiment)
        sweep_id = new_sweep_id()
        tracker.start(_parent_name(config, sweep_id), {
            SWEEP_ID_TAG: sweep_id, ROLE_TAG: PARENT_ROLE, "sweep_dir": str(sweep_dir),
            # host/pid: a parent whose process is killed is closed like a run (tracking.py)
            **git_tags(), **process_tags(),
        })
        tracker.log_params(_sweep_params(config))
        tracker.show_runs_view(config.eval.monitor_cutoff)
        self.info = SweepInfo(sweep_id, tracker.tracking_uri, tracker.experiment,
                              tracker.experiment_id, tracker.run_id)
        self.info.write(sweep_dir)
        _open_sweeps[sweep_id] = self.info
        log.info("sweep %s: MLflow parent run %s in %s", sweep_id, tracker.run_id,
                 tracker.tracking_uri)

    def report(self, tracker: Tracker, info: SweepInfo, name: str, sweep_dir: Path) -> None:
        """The sweep's comparison of its jobs, logged to its parent run (tracker.run_id) as
        files named `name`: none here; seqexp.apps.report.SweepReportCallback (the one
        conf/config.yaml registers) makes seqexp-report's tables and charts."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        info = self.info
        if info is None or info.sweep_id not in _open_sweeps:
            return
        tracker = Tracker(info.tracking_uri, info.experiment, info.parent_run_id)
        children = [run for run in tracker.search(f"tags.{SWEEP_ID_TAG} = '{info.sweep_id}'")
                    if run.info.run_id != info.parent_run_id]
        monitor = f"best_val_{config.train.monitor}"
        summary, best_run = summarise_children(children, monitor)
        tracker.log_metrics(summary | best_job_metrics(children, best_run),
                            headline_cutoff=config.eval.monitor_cutoff)
        if best_run is not None:
            tracker.set_tags({"best_run_id": best_run})
        sweep_dir = sweep_dir_of(config.hydra)
        for name in _SWEEP_ARTIFACTS:
            tracker.log_artifact(sweep_dir / name)
        try:
            self.report(tracker, info, _parent_name_of(tracker), sweep_dir)
        except Exception as exc:  # the jobs' runs are kept: said, not raised
            log.warning("sweep %s: no report in its parent run (%s); run seqexp-report "
                        "--sweep-id %s", info.sweep_id, message_line(exc), info.sweep_id)
        _open_sweeps.pop(info.sweep_id, None)
        tracker.end("FINISHED")
        print(sweep_summary(info, summary, best_run, monitor, config.eval.monitor_cutoff),
              flush=True)


def best_job_metrics(children: Sequence[Any], best_run: str | None) -> dict[str, float]:
    """The test metrics and the best epoch of the best job, for its parent: the runs table
    shows a sweep by its best job's numbers."""
    best = next((run for run in children if run.info.run_id == best_run), None)
    if best is None:
        return {}
    return {k: v for k, v in flat_metrics(best.data.metrics).items()
            if k.startswith(("test_", "best_epoch"))}


def _parent_name_of(tracker: Tracker) -> str:
    return with_lock_retry(tracker.client.get_run, tracker.run_id).info.run_name


def sweep_summary(info: SweepInfo, counts: Mapping[str, float], best_run: str | None,
                  monitor: str, cutoff: int | None = None) -> str:
    """The last lines of a multirun: what its jobs did, the best one, and what to run next."""
    jobs = ", ".join(f"{int(counts[f'jobs_{s}'])} {s}" for s in ("finished", "failed", "killed"))
    best = (f"; best {monitor.removeprefix('best_')}={counts[monitor]:.5f} (run {best_run})"
            if best_run is not None else "")
    return (f"seqexp: sweep {info.sweep_id} done: {jobs}{best}\n"
            f"  report: seqexp-report --sweep-id {info.sweep_id} "
            f"--tracking-uri {info.tracking_uri} --out report-{info.sweep_id}\n"
            f"  {ui_hint(info.tracking_uri, info.experiment_id, cutoff)}  "
            f"(experiment {info.experiment}, parent run {info.parent_run_id})")
