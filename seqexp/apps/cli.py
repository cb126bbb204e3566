"""The `seqexp` command: Hydra composes the config, run_experiment does the work.

Returns the best value of the monitored validation metric (train.monitor) so that sweepers
(Optuna) can maximise it.
"""

from __future__ import annotations

import importlib.util
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue

from seqexp.apps.preflight import check_command_line, sweeper_ranks_jobs
from seqexp.core import liveness, run_folder
from seqexp.core.errors import SeqexpError, message_line
from seqexp.core.resources import config_dir
from seqexp.core.stopping import TrainingStopped, exit_code
from seqexp.run.naming import run_name
from seqexp.run.plugins import group_options, model_files
from seqexp.run.registry import keys_of
from seqexp.run.resume import cluster_job_key
from seqexp.run.sweep import end_open_sweeps, job_tags, record_failed_job, tracking_uri_of
from seqexp.run.tracking import ui_hint

if TYPE_CHECKING:
    from seqexp.run.experiment import RunResult

log = logging.getLogger("seqexp")
CHECKED_GROUPS = ("model", "dataset", "split", "train", "eval", "mlflow", "paths", "experiment",
                  "hparams_search")
# Presets whose Hydra plugin comes with an extra: (group, choice; None = any) -> (module, extra).
_SUBMITIT = ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "seqexp[slurm]")
_RAY = ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher", "seqexp[ray]")
PLUGIN_PRESETS = {
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher",
                                   "seqexp"),
    ("hydra/launcher", "slurm"): _SUBMITIT,
    ("hydra/launcher", "submitit_slurm"): _SUBMITIT,
    ("hydra/launcher", "submitit_local"): _SUBMITIT,
    ("hydra/launcher", "ray_cluster"): _RAY,
    ("hydra/launcher", "ray"): _RAY,
    ("hparams_search", None): ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper",
                               "seqexp[optuna]"),
}


def config_keys_help(cfg: DictConfig) -> str:
    """The `seqexp --help` lines of every key of this config (its model's, dataset's and
    split's tables) with the one-line doc of the schema (seqexp/core/schema.py)."""
    try:
        keys = keys_of(cfg)
    except SeqexpError as exc:
        return f"  (no key listing: {exc})"
    width = max(len(key) for key in keys) + 1
    return "\n".join(f"  {key:<{width}}{' ' if entry.affects_results else '~'} {entry.doc}"
                     for key, entry in keys.items())


def _help_keys(*, _root_: DictConfig) -> str:
    # The page goes through string.Template, where $ starts a placeholder.
    return config_keys_help(_root_).replace("$", "$$")


def models_help() -> str:
    """The `seqexp --help` lines of every registered model: its name and the first comment
    line of its file (after `# @package`)."""
    lines = []
    for name, file in model_files().items():
        comments = [line.lstrip("# ").strip() for line in file.read_text().splitlines()
                    if line.startswith("#") and "@package" not in line]
        lines.append(f"  {name:<18}{comments[0] if comments else ''}")
    return "\n".join(lines).replace("$", "$$")


# conf/hydra/help/seqexp.yaml's ${seqexp_config_keys:}: the listing is made from the schema
# when the page is shown, for the config that `seqexp --help [overrides]` composes; its
# ${seqexp_models:} from the registered model files.
OmegaConf.register_new_resolver("seqexp_config_keys", _help_keys, replace=True)
# conf/config.yaml's ${seqexp_run_token:} in hydra.run.dir / hydra.sweep.dir: a fresh token per
# run, cached like Hydra's ${now:} so that every read of the folder's name (and a sweep's jobs,
# which get the cache copied) sees the same one.
OmegaConf.register_new_resolver("seqexp_run_token", run_folder.run_token, use_cache=True,
                                replace=True)
OmegaConf.register_new_resolver("seqexp_models", models_help, replace=True)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _run(cfg: DictConfig) -> float:
    # The one lazy import of the CLI, for start-up speed: the experiment loads torch, the data
    # pipeline, the engine and MLflow, which `seqexp --help` and a refused command line never
    # need (docs/architecture.md; the schema's model keys come from the registry without
    # importing a model class: seqexp/run/registry.py).
    from seqexp.run.experiment import run_experiment

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep, tags = job_tags(hydra_cfg, cfg) if multirun else (None, {})
    if multirun:  # parallel jobs (joblib) write to one terminal: say whose line it is
        prefix_job_lines(hydra_cfg.job.num)
        liveness.end_with_sweep()  # a worker of a killed sweep does not live on
    # As typed: iterating the ListConfig would resolve a `${...}` in an override's text.
    overrides = list(OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False))
    try:
        result = run_experiment(
            cfg, launch_dir=Path(hydra_cfg.runtime.cwd), output_dir=output_dir,
            overrides=overrides, tags=tags,
            hydra_dir=output_dir / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None,
            job_key=cluster_job_key(hydra_cfg.job.num if multirun else None),
        )
    except TrainingStopped as stopped:
        stop_after_signal(stopped, overrides, multirun)
    except KeyboardInterrupt:
        print("seqexp: interrupted; the MLflow run is marked KILLED", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if multirun:
            # The sweeper records the failed job and decides whether the sweep goes on
            # (Optuna: hydra.sweeper.max_failure_rate); MLflow shows it under the parent.
            log.error("job %s failed: %s", hydra_cfg.job.num, message_line(exc))
            if sweep is not None:
                name, identity = _job_identity(cfg, overrides)
                record_failed_job(sweep, {**identity, **tags}, name, exc)
            raise
        if not isinstance(exc, (SeqexpError, MissingMandatoryValue, ConfigKeyError)):
            raise
        if isinstance(exc, MissingMandatoryValue):
            exc = f"{exc.full_key} must be set: pass {exc.full_key}=..."
        elif isinstance(exc, ConfigKeyError):  # a key the run reads, deleted (~key)
            exc = f"{exc.full_key} is not in the config, and the run reads it; keep the key"
        print(f"seqexp: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if result.val_score is None and multirun and sweeper_ranks_jobs(hydra_cfg):
        # The sweeper would rank this job by a score it does not have.
        raise SeqexpError(f"job {hydra_cfg.job.num} has no validation events to score it by; "
                          f"set split.val_frac > 0 or use a larger dataset")
    print(run_summary(result, cfg, Path(hydra_cfg.runtime.cwd), output_dir,
                      f"[job {hydra_cfg.job.num}] " if multirun else ""), flush=True)
    return result.val_score


def stop_after_signal(stopped: Exception, overrides: list[str], multirun: bool) -> None:
    """The end of a run stopped by a signal: say how to resume it, let a launcher's handler
    of the signal act (submitit: requeue the job), else exit with 128 + the signal's number."""

    run_id = getattr(stopped, "run_id", "?")
    kept = [o for o in overrides if not o.lstrip("+~").startswith("resume=")]
    command = shlex.join(["seqexp", *kept, f"resume={run_id}"])
    print(f"seqexp: {stopped}; the MLflow run {run_id} is marked KILLED; resume with: "
          f"{command}", file=sys.stderr, flush=True)
    pass_on = getattr(stopped, "pass_on", None)
    if pass_on is not None:
        pass_on()
    sys.exit(exit_code(stopped.signal_name))


class _JobPrefix(logging.Filter):
    def __init__(self, job: int | str) -> None:
        super().__init__()
        self.prefix = f"[job {job}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = f"{self.prefix}{record.msg}"
        return True


def prefix_job_lines(job: int | str) -> None:
    """Every log line of this process starts with `[job N] `."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_JobPrefix(job))


def run_summary(result: RunResult, cfg: DictConfig, launch_dir: Path, output_dir: Path,
                prefix: str = "") -> str:
    """The last lines of a run: its id, model, dataset and best epoch, the test metrics at the
    monitored cutoff, where its outputs are and how to look at it in the MLflow UI."""
    from seqexp.run.experiment import headline_metrics  # loads torch: see _run

    shown = ", ".join(f"{k}={result.metrics[k]:.5f}" for k in headline_metrics(cfg)
                      if k in result.metrics)
    output_dir = result.output_dir or output_dir
    cutoff = cfg.eval.monitor_cutoff
    try:
        where = output_dir.relative_to(launch_dir)
    except ValueError:
        where = output_dir
    what = f"{cfg.model.name} on {cfg.dataset.name}"
    best, epochs = result.metrics.get("best_epoch"), result.metrics.get("epochs_run", 0)
    if best is not None and epochs:  # a model without epochs (pop, itemknn) has none
        what += f", best epoch {int(best)} of {int(epochs)}"
    if prefix:  # a sweep's job: the sweep's own summary says where to look
        return (f"{prefix}seqexp: run {result.run_id} finished ({what}): {shown} "
                f"(outputs: {where})")
    return (f"seqexp: run {result.run_id} finished ({what}): {shown}\n"
            f"  outputs: {where}\n"
            f"  {ui_hint(tracking_uri_of(cfg, launch_dir), result.experiment_id, cutoff)}  "
            f"(experiment {result.experiment})")


def _job_identity(cfg: DictConfig, overrides: list[str]) -> tuple[str, dict[str, str]]:
    """Run name and model/dataset/seed tags of a job, from a config that may not resolve."""

    def pick(key: str) -> str:
        try:
            return str(OmegaConf.select(cfg, key, default="?", throw_on_missing=False))
        except Exception:  # an interpolation error is why the job failed
            return "?"

    tags = {"model": pick("model.name"), "dataset": pick("dataset.name"), "seed": pick("seed")}
    name = pick("mlflow.run_name")
    if name in ("?", "None"):
        name = run_name(tags["model"], tags["dataset"], overrides)
    return name, tags


def check_group_choices(args: list[str]) -> str | None:
    """One-line message for an unknown config-group option (Hydra's own is several lines)."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.lstrip("+~").split("=", 1)
        if key not in CHECKED_GROUPS or "(" in value or value in ("", "null"):
            continue
        options = group_options(key)
        for choice in value.split(","):
            if choice not in options:
                return (f"{key}={choice} is not a known {key}; choose one of "
                        f"{', '.join(options)} ({config_dir() / key}/*.yaml)")
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the hydra_plugins namespace itself is missing
        return False


def check_plugins(args: list[str]) -> str | None:
    """One-line message for a preset whose Hydra plugin is not installed (Hydra's own names a
    missing config, not the package)."""
    for arg in args:
        key, _, value = arg.lstrip("+~").partition("=")
        for (group, choice), (module, package, extra) in PLUGIN_PRESETS.items():
            if key != group or not value or (choice is not None and choice not in
                                              value.split(",")):
                continue
            if not _importable(module):
                return f"{key}={value} needs {package}: pip install '{extra}'"
    return None


def check_flags(args: list[str]) -> str | None:
    """One-line message for flags Hydra takes only one of (its own is a traceback)."""
    shows = [a for a in args if a.split("=", 1)[0] in ("--cfg", "-c", "--info", "-i")]
    if shows and any(a in ("-m", "--multirun") for a in args):
        return (f"{shows[0].split('=', 1)[0]} shows one run's config and -m runs a sweep; "
                f"drop -m to see the config of one job of it")
    return None


def main() -> None:
    args = sys.argv[1:]
    problem = (check_flags(args) or check_group_choices(args) or check_plugins(args)
               or check_command_line(args))
    if problem:
        for line in problem.splitlines():  # a multirun's missing datasets: one line each
            print(f"seqexp: error: {line}", file=sys.stderr)
        sys.exit(2)
    try:
        _run()
    except KeyboardInterrupt:
        end_open_sweeps("KILLED")
        raise
    except SystemExit as exc:
        # a job of a sequential sweep was interrupted (Ctrl-C: 130) or stopped by a signal
        if exc.code in (130, 138, 140, 143):
            end_open_sweeps("KILLED")
        raise


if __name__ == "__main__":
    main()
