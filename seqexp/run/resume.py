"""Which MLflow run a run continues: `resume=RUN_ID`, `resume=last` (the newest unfinished run
with the same configuration), or, for a job a cluster requeued, the unfinished run of the same
cluster job with the same configuration.

A run continues only with the configuration it was started with, except for keys that cannot
change its results (where and how fast it runs: `affects_results` of seqexp/core/schema.py, the
same notion the report's seeds-of-one-configuration use): the comparison is between the
flattened resolved configuration and the run's MLflow params, which are the same flattening."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from seqexp.core import liveness
from seqexp.core.errors import SeqexpError
from seqexp.core.metric_names import logged_name
from seqexp.run.registry import affects_results
from seqexp.run.tracking import OUTPUTS_TAG, with_lock_retry

# Params a run logs besides its configuration (seqexp.run.experiment: the data's statistics).
DATA_PREFIX = "data."
UNFINISHED = ("RUNNING", "KILLED", "FAILED", "SCHEDULED")
CLUSTER_JOB_TAG = "cluster_job"  # the SLURM / submitit job that ran it (cluster_job_key)
RESUMES_TAG = "resumes"  # how many times the run was continued


@dataclass
class RunToResume:
    run_id: str
    outputs_dir: Path
    resumes: int  # times continued before this one
    params: dict[str, str]
    logged_epochs: set[int]


def cluster_job_key(multirun_job: int | None = None) -> str | None:
    """The job a cluster requeues under the same id: SLURM's job (array task) id, or
    submitit_local's job id; with the Hydra job number in a sweep. None outside such a job."""
    suffix = "" if multirun_job is None else f":{multirun_job}"
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            return f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}{suffix}"
        return f"slurm:{env['SLURM_JOB_ID']}{suffix}"
    if env.get("SUBMITIT_LOCAL_JOB_ID"):
        return f"submitit_local:{env['SUBMITIT_LOCAL_JOB_ID']}{suffix}"
    return None


def differing_keys(config: Mapping[str, str], logged: Mapping[str, str]) -> list[str]:
    """Config keys (flattened) whose values differ from a run's params, or that only one has;
    keys that cannot change the results (where and how fast it runs) do not count; the data.*
    params are compared on their own (data_differences)."""
    logged = {k: v for k, v in logged.items() if not k.startswith(DATA_PREFIX)}
    keys = (set(config) | set(logged))
    return sorted(k for k in keys if affects_results(k) and config.get(k) != logged.get(k))


def data_differences(stats: Mapping[str, object], logged: Mapping[str, str]) -> list[str]:
    """data.* params (event counts, the raw file's sha256) that differ from the data now."""
    return sorted(f"{DATA_PREFIX}{k}" for k, v in stats.items()
                  if f"{DATA_PREFIX}{k}" in logged and logged[f"{DATA_PREFIX}{k}"] != str(v))


def _still_running_here(run) -> int | None:
    """The pid of a RUNNING run's process when it is alive on this host (tags `host` and
    `pid`), else None; elsewhere nothing can tell, and the run may be continued."""
    tags = run.data.tags
    if run.info.status != "RUNNING" or tags.get("host") != liveness.host():
        return None
    try:
        pid = int(tags.get("pid", ""))
    except ValueError:
        return None
    if pid <= 0 or pid == os.getpid() or liveness.is_gone(tags["host"], pid,
                                                            tags.get("pid_start", "")):
        return None
    return pid


def _describe(run) -> RunToResume:
    tags = run.data.tags
    folder = tags.get(OUTPUTS_TAG)
    if not folder:
        raise SeqexpError(f"resume: run {run.info.run_id} has no {OUTPUTS_TAG} tag (started by "
                          f"a seqexp without resumable runs); start a new run")
    return RunToResume(run.info.run_id, Path(folder), int(tags.get(RESUMES_TAG, "0")),
                       dict(run.data.params), set())


def find_run(tracker, resume: str | None, config: Mapping[str, str],
             job_key: str | None) -> RunToResume | None:
    """The run to continue, or None for a new one. `resume`: null, "last" or a run id."""
    if resume is None:
        if job_key is None:
            return None
        runs = _unfinished(tracker, f"tags.{CLUSTER_JOB_TAG} = '{job_key}'")
        match = next((r for r in runs if not differing_keys(config, r.data.params)), None)
        return None if match is None else _checked(tracker, match)
    if resume == "last":
        runs = _unfinished(tracker)
        match = next((r for r in runs if not differing_keys(config, r.data.params)), None)
        if match is None:
            raise SeqexpError(f"resume=last: no unfinished run with this configuration in "
                              f"experiment {tracker.experiment!r} of {tracker.tracking_uri}")
        return _checked(tracker, match)
    run = _get_run(tracker, resume)
    if run.info.status == "FINISHED":
        raise SeqexpError(f"resume={resume}: the run finished already; nothing to resume")
    differing = differing_keys(config, run.data.params)
    if differing:
        shown = ", ".join(f"{k} (run: {run.data.params.get(k, 'unset')}, now: "
                          f"{config.get(k, 'unset')})" for k in differing[:8])
        more = f" and {len(differing) - 8} more" if len(differing) > 8 else ""
        raise SeqexpError(f"resume={resume}: the configuration differs from the run's in "
                          f"{shown}{more}; resume with the run's values")
    return _checked(tracker, run)


def _get_run(tracker, run_id: str):
    try:
        return with_lock_retry(tracker.client.get_run, run_id)
    except Exception:  # MLflow's "not found" differs between stores
        raise SeqexpError(f"resume={run_id}: no such run in {tracker.tracking_uri}; check "
                          f"the run id and mlflow.tracking_uri") from None


def _unfinished(tracker, extra_filter: str = "") -> list:
    filters = ["attributes.status != 'FINISHED'", *([extra_filter] if extra_filter else [])]
    runs = [r for r in tracker.search(" AND ".join(filters)) if r.info.status in UNFINISHED]
    return sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)


def _checked(tracker, run) -> RunToResume:
    pid = _still_running_here(run)
    if pid is not None:
        raise SeqexpError(f"resume: run {run.info.run_id} is still running (process {pid} on "
                          f"this host); stop it first (kill {pid}) or start a new run")
    found = _describe(run)
    found.logged_epochs = set()
    for name in (logged_name("train_loss"), "train_loss"):  # an older store: the flat name
        history = with_lock_retry(tracker.client.get_metric_history, run.info.run_id, name)
        found.logged_epochs |= {m.step for m in history}
    return found
