"""One run, and the only place that wires the parts: data -> model -> train -> evaluate -> track."""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seqexp.core import run_folder
from seqexp.core.atomic import remove_temporaries, write_json, write_text
from seqexp.core.errors import UNWRITABLE_ERRNOS, SeqexpError, message_line, unwritable
from seqexp.core.flat_config import flatten
from seqexp.core.metric_names import HEADLINE_METRICS
from seqexp.core.ranks_file import ID_MAPS_FILE, RANKS_FILE
from seqexp.core.stopping import EvaluationStopped, StopSignals, TrainingStopped
from seqexp.data.loading import load_dataset
from seqexp.data.sequences import SequenceData
from seqexp.engine.evaluator import Evaluator
from seqexp.engine.memory import ModelBuild, run_estimate
from seqexp.engine.metrics import RankCounts
from seqexp.engine.trainer import (
    BestCheckpoint,
    ResumableState,
    StopCheck,
    Trainer,
    TrainingCallback,
    TrainSettings,
    no_stop_signal,
)
from seqexp.models import cpu_kernels
from seqexp.models.base import Recommender
from seqexp.run.artifacts import checkpoint_contents, write_id_maps, write_ranks
from seqexp.run.datasets import split_datasets
from seqexp.run.mlflow_model import link_to_model, log_model
from seqexp.run.naming import run_name
from seqexp.run.options import check_config
from seqexp.run.registry import results_free_keys
from seqexp.run.resume import (
    CLUSTER_JOB_TAG,
    OUTPUTS_TAG,
    RESUMES_TAG,
    RunToResume,
    data_differences,
    find_run,
)
from seqexp.run.tags import ERROR_TAG, RESULTS_FREE_TAG
from seqexp.run.tracking import (
    Tracker,
    close_abandoned_runs,
    default_tracking_uri,
    environment_tags,
    git_tags,
    process_tags,
    record_unrecorded_failure,
)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_id: str
    experiment_id: str  # the run's MLflow experiment (a resumed run keeps its own)
    experiment: str  # that experiment's name
    val_score: float | None  # None without validation events: nothing for a sweeper to rank
    metrics: dict[str, float]
    output_dir: Path | None = None  # the run's outputs folder (a resumed run keeps its own)


def resolve_device(name: str) -> torch.device:
    """The torch device of `device` (auto, cpu, cuda or cuda:N: the schema checks the name)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SeqexpError("device=cuda but CUDA is not available here; use device=auto or cpu")
    return torch.device(name)


def configure_torch(train: Mapping) -> None:
    """CPU threads (`train.num_threads`), TF32 tensor cores for float32 matrix products on
    CUDA (`train.tf32`: several times faster on Ampere and later, products rounded to ~1e-3)
    and the CPU-only kernels (`train.cpu_kernels`)."""
    cpu_kernels.set_enabled(bool(train["cpu_kernels"]))
    if train["num_threads"]:
        torch.set_num_threads(int(train["num_threads"]))
    tf32 = bool(train["tf32"])
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
        if hasattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision"):
            torch.backends.cudnn.rnn.fp32_precision = "tf32" if tf32 else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_factory(model_cfg: Mapping) -> tuple[ModelBuild, dict[str, Any]]:
    """(the `_partial_` target of conf/model/<name>.yaml, instantiated: it builds the model
    given n_items and n_users; the config values it holds)."""
    spec = dict(OmegaConf.to_container(model_cfg, resolve=True)) if isinstance(
        model_cfg, DictConfig) else dict(model_cfg)
    name = spec.pop("name", "?")
    try:
        factory = instantiate(spec)
        # Keys the constructor does not take are the config's fault; a TypeError raised inside
        # the constructor is a bug, and keeps its traceback.
        inspect.signature(factory).bind(n_items=1, n_users=1)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, SeqexpError):
            raise cause from None
        reason = message_line(cause, which=-1)
        raise SeqexpError(f"model={name}: cannot build the model ({reason}); "
                          f"check the model.* keys") from None
    except (TypeError, ValueError) as exc:  # ValueError: a partial with a key it cannot take
        reason = exc.__cause__ or exc
        raise SeqexpError(f"model={name}: {message_line(reason, which=-1)}; check the model.* keys"
                          ) from None
    return factory, dict(getattr(factory, "keywords", {}))


def build_model(model_cfg: Mapping, data: SequenceData) -> Recommender:
    """Instantiate conf/model/<name>.yaml (a `_partial_` target) with the sizes of the data."""
    factory, _ = model_factory(model_cfg)
    model = factory(n_items=data.n_items, n_users=data.n_users)
    if not isinstance(model, Recommender):
        raise SeqexpError(f"model={model_cfg.get('name', '?')}: model._target_ must build a "
                          f"seqexp Recommender")
    return model


def checked_model(cfg: DictConfig, data: SequenceData, evaluator: Evaluator,
                  device: torch.device) -> tuple[Recommender | None, SeqexpError | None]:
    """The run's model on `device`, once the estimate of what the run allocates
    (seqexp.engine.memory, logged in one line) fits the device's memory; else (None, the
    one line that names the key to lower), nothing of the model allocated."""
    factory, options = model_factory(cfg.model)
    n_events = int((data.train_end - data.offsets[:-1]).sum())
    estimate = run_estimate(factory, {"n_items": data.n_items, "n_users": data.n_users},
                            options, (str(cfg.train.optimizer), int(cfg.train.batch_size),
                                      n_events), evaluator, device)
    log.info("%s", estimate.line())
    refused = estimate.refusal(flatten(OmegaConf.to_container(cfg, resolve=True)))
    if refused is not None:
        return None, refused
    return build_model(cfg.model, data).to(device), None


def build_evaluator(cfg: DictConfig) -> Evaluator:
    return Evaluator.from_config(cfg)


def build_trainer(cfg: DictConfig, evaluator: Evaluator, checkpoint: Path | None = None,
                  state: ResumableState | None = None, *,
                  checkpoint_contents: Mapping[str, Any] | None = None,
                  stop_requested: StopCheck = no_stop_signal,
                  callbacks: Sequence[TrainingCallback] = ()) -> Trainer:
    """The trainer of cfg.train (TrainSettings reads every key by its name), monitoring
    val_<train.monitor>; the best weights go to `checkpoint` with
    `checkpoint_contents` beside them, the resumable state to `state`."""
    return Trainer(evaluator, TrainSettings.from_config(cfg.train),
                   seed=cfg.seed,
                   best_checkpoint=BestCheckpoint(checkpoint, checkpoint_contents), state=state,
                   stop_requested=stop_requested, callbacks=callbacks)


def validate(cfg: DictConfig) -> None:
    """Check every key a run reads (seqexp/run/options.py), so that bad values fail before any work
    starts."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:  # e.g. ${oc.env:VAR} of an unset variable
        key = getattr(exc, "full_key", None) or "the config"
        reason = message_line(exc)
        raise SeqexpError(f"{key}: cannot resolve ({reason})") from None
    check_config(resolved)


def run_experiment(cfg: DictConfig, launch_dir: Path, output_dir: Path,
                   overrides: Sequence[str] = (), hydra_dir: Path | None = None,
                   tags: Mapping[str, str] | None = None,
                   job_key: str | None = None) -> RunResult:
    """Train and evaluate one configuration, tracked as one MLflow run; `tags` are added to the
    run's own (a sweep's job: mlflow.parentRunId, sweep_id). `resume` (config) or a cluster
    `job_key` whose unfinished run has this configuration (a requeued job) continue that run,
    in its outputs folder, from its resumable training state (seqexp.run.resume)."""
    validate(cfg)
    seed_everything(cfg.seed)
    configure_torch(cfg.train)
    device = resolve_device(str(cfg.device))
    evaluator = build_evaluator(cfg)
    # Everything that can fail on bad input happens before the MLflow run exists, except a
    # run too large for the memory: refused before its model is allocated, but recorded as
    # a FAILED run with its reason (a sweep's job that cannot fit shows why).
    data = load_dataset(cfg.dataset, cfg.split, Path(cfg.paths.raw_dir),
                        Path(cfg.paths.cache_dir), progress=cfg.train.progress)
    model, too_large = checked_model(cfg, data, evaluator, device)

    tracker = Tracker(cfg.mlflow.tracking_uri or default_tracking_uri(launch_dir),
                      cfg.mlflow.experiment)
    close_abandoned_runs_quietly(tracker)
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    resume = cfg.get("resume")
    resumed = find_run(tracker, None if resume is None else str(resume), params, job_key)
    state = ResumableState(output_dir / "checkpoints" / "last.pt")
    if resumed is not None:
        output_dir = _check_resumable(resumed, data)
        state = _saved_state(resumed, output_dir)  # refused here, the run is left as it was
        for leftover in remove_temporaries(output_dir):  # a write the kill cut short
            log.info("removed %s, left by the killed process", leftover)
    run_tags = {"device": str(device), **environment_tags(str(device))}
    if resumed is not None:
        run_id = tracker.resume(resumed.run_id, {
            **run_tags, RESUMES_TAG: str(resumed.resumes + 1),
            **process_tags()})  # this process runs it now
        log.info("continuing run %s in %s", run_id, output_dir)
    else:
        run_id = _start_run(tracker, cfg, params, output_dir, overrides,
                            {**run_tags, **({CLUSTER_JOB_TAG: job_key} if job_key else {}),
                             **(tags or {})})
    tracker.show_runs_view(cfg.eval.monitor_cutoff)
    checkpoint = output_dir / "checkpoints" / "best.pt"
    with tracked_run(tracker, output_dir, resumed is not None,
                     checkpoint if cfg.mlflow.log_checkpoint else None):
        if cfg.mlflow.system_metrics:
            tracker.monitor_system(resumed=resumed is not None)
        if resumed is None:
            log_inputs(tracker, cfg, data, params, output_dir, hydra_dir)
        if too_large is not None:  # a FAILED run with its reason, as a sweep's job shows it
            raise too_large
        run = RunParts(cfg, model, data, evaluator, tracker, output_dir, checkpoint)
        best_score, metrics = train_and_test(run, state)
        return RunResult(run_id, tracker.experiment_id, tracker.experiment, best_score,
                         metrics, output_dir)


def _start_run(tracker: Tracker, cfg: DictConfig, params: Mapping[str, Any], output_dir: Path,
               overrides: Sequence[str], tags: Mapping[str, str]) -> str:
    """A new MLflow run: its name (mlflow.run_name, else from the model, the dataset and the
    overrides that change results) and its tags."""
    model_name, dataset_name = str(cfg.model.get("name")), str(cfg.dataset.get("name"))
    name = cfg.mlflow.run_name or run_name(model_name, dataset_name, overrides)
    return _start_in_own_folder(tracker, output_dir, name, {
        "model": model_name, "dataset": dataset_name, "split": str(cfg.split.name),
        "seed": str(cfg.seed), **git_tags(), **tags, **process_tags(),
        OUTPUTS_TAG: str(Path(output_dir).resolve()),
        RESULTS_FREE_TAG: ",".join(results_free_keys(params)),
    })


@contextmanager
def tracked_run(tracker: Tracker, output_dir: Path, resumed: bool,
                checkpoint_on_kill: Path | None) -> Iterator[None]:
    """The run's status bookkeeping: FINISHED when the block ends, KILLED on an interrupt or
    a stop signal (with `checkpoint_on_kill` logged), FAILED otherwise, with its error in the
    tag `error` and a disk-full or unwritable file said in one line."""
    status, error = "FAILED", None
    try:
        yield
        status = "FINISHED"
    except (KeyboardInterrupt, TrainingStopped):
        status = "KILLED"
        if checkpoint_on_kill is not None:
            tracker.log_artifact(checkpoint_on_kill, "checkpoints")
        raise
    except OSError as exc:
        if exc.errno not in UNWRITABLE_ERRNOS:
            error = exc
            raise
        error = _unwritable(exc, output_dir, resumed)
        raise error from None
    except Exception as exc:
        error = tracker.failure(exc)
        if error is None:
            error = exc
            raise
        raise error from None
    finally:
        _end_run(tracker, status, error, output_dir)


def _start_in_own_folder(tracker: Tracker, output_dir: Path, name: str,
                         tags: Mapping[str, str]) -> str:
    """Start the MLflow run in an outputs folder no other run has (seqexp.core.run_folder):
    claimed before the run exists, so that a refused folder leaves no run behind."""
    run_folder.claim(output_dir)
    try:
        run_id = tracker.start(name, tags)
    except BaseException:
        run_folder.release(output_dir)
        raise
    run_folder.record_owner(output_dir, run_id)
    return run_id


def log_inputs(tracker: Tracker, cfg: DictConfig, data: SequenceData,
               params: Mapping[str, Any], output_dir: Path, hydra_dir: Path | None) -> None:
    """What a new run starts from: params, dataset inputs and statistics, the configuration
    (first, so that a failed or killed run still shows it) and Hydra's folder."""
    tracker.log_params(params)
    tracker.log_datasets(split_datasets(cfg.dataset, cfg.split, Path(cfg.paths.raw_dir), data))
    tracker.log_params({f"data.{k}": v for k, v in data.stats.items()})
    tracker.log_metrics({"test_oov_dropped": data.stats.get("test_oov_dropped", 0)})
    write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_artifact(output_dir / "config.yaml")
    if hydra_dir is not None:
        tracker.log_artifact(hydra_dir, ".hydra")


@dataclass
class RunParts:
    """What a run's training and test need, built by run_experiment."""

    cfg: DictConfig
    model: Recommender
    data: SequenceData
    evaluator: Evaluator
    tracker: Tracker
    output_dir: Path
    checkpoint: Path


def train_and_test(run: RunParts, state: ResumableState) -> tuple[float | None, dict]:
    """(best validation score, logged metrics) of training, then testing and logging the
    results. Stop signals end the run KILLED at any moment from here on: within a training or
    evaluation batch, and between the steps that log the results."""
    cfg, tracker = run.cfg, run.tracker
    with StopSignals() as stop_signals:
        epochs_done = 0
        try:
            trainer = build_trainer(cfg, run.evaluator, run.checkpoint, state,
                                    checkpoint_contents=checkpoint_contents(cfg, run.data),
                                    stop_requested=stop_signals)
            result = trainer.fit(run.model, run.data, tracker.log_metrics)
            epochs_done = result.epochs_run
            if result.interrupted:
                raise KeyboardInterrupt
            summary = {"epochs_run": result.epochs_run}
            if result.best_score is not None:
                summary |= {"best_epoch": result.best_epoch,
                            f"best_val_{cfg.train.monitor}": result.best_score}

            def stop_if_asked() -> None:
                if stop_signals() is not None:
                    raise TrainingStopped(str(stop_signals()), epochs_done, 0)

            metrics = test_and_log(run, summary, stop_signals, stop_if_asked)
        except EvaluationStopped as stopped:  # the test evaluation, cut short
            raise _stopped(TrainingStopped(stopped.signal_name, epochs_done, 0),
                           tracker.run_id, stop_signals) from None
        except TrainingStopped as stopped:
            raise _stopped(stopped, tracker.run_id, stop_signals) from None
    return result.best_score, metrics


def test_and_log(run: RunParts, summary: Mapping[str, Any], stop_signals: StopSignals,
                 stop_if_asked: Callable[[], None]) -> dict:
    """The test metrics (and next-basket ones), logged with `summary`, then the ranks,
    metrics.json, the checkpoint and the MLflow Model, checking for a stop between steps."""
    cfg, model, data, evaluator, tracker = run.cfg, run.model, run.data, run.evaluator, run.tracker
    counts = evaluator.rank_counts(model, data, "test", stop_signals)
    test = {f"test_{k}": v for k, v in evaluator.full_metrics(counts, data).items()}
    if cfg.eval.basket_gap_s is not None:
        baskets = evaluator.next_basket_metrics(
            model, data, "test", cfg.eval.basket_gap_s, cfg.eval.basket_k)
        test |= {f"test_{k}": v for k, v in baskets.items()}
    stop_if_asked()
    metrics = test | dict(summary)
    tracker.log_metrics(metrics, headline_cutoff=cfg.eval.monitor_cutoff)
    log.info("test: %s", ", ".join(f"{k}={v:.5f}" for k, v in test.items()
                                  if k in headline_metrics(cfg)))
    log_ranks(tracker, counts, data, cfg, run.output_dir)
    stop_if_asked()
    write_json(run.output_dir / "metrics.json", metrics | {"data": data.stats})
    tracker.log_artifact(run.output_dir / "metrics.json")
    logs_model = cfg.mlflow.log_model and run.checkpoint.is_file()
    if cfg.mlflow.log_checkpoint and not logs_model:  # else the model holds it
        tracker.log_artifact(run.checkpoint, "checkpoints")
    stop_if_asked()
    if logs_model:
        model_uri = log_model(tracker, run.checkpoint, example_user(data),
                              cfg.mlflow.register_model)
        link_to_model(tracker, model_uri, run.checkpoint)  # the best weights stored once
    stop_if_asked()
    if not cfg.train.keep_last:  # only an unfinished run resumes from it
        run.checkpoint.with_name("last.pt").unlink(missing_ok=True)
    return metrics


def _stopped(stopped: TrainingStopped, run_id: str, stop_signals: StopSignals
             ) -> TrainingStopped:
    """The stop, with what the CLI needs to end it: the run to resume and the launcher's
    handler of the signal (submitit requeues the job)."""
    stopped.run_id = run_id
    stopped.pass_on = stop_signals.pass_on
    return stopped


def _check_resumable(resumed: RunToResume, data: SequenceData) -> Path:
    """The outputs folder of the run to continue, once the data are known to be the same."""
    differing = data_differences(data.stats, resumed.params)
    if differing:
        shown = ", ".join(f"{k} (run: {resumed.params[k]}, now: {data.stats[k[5:]]})"
                          for k in differing[:4])
        raise SeqexpError(f"resume: the data differ from run {resumed.run_id}'s: {shown}; "
                          f"resume it with the same data file and dataset.* keys")
    if not resumed.outputs_dir.is_dir():
        raise SeqexpError(f"resume: run {resumed.run_id}'s outputs folder "
                          f"{resumed.outputs_dir} is not on this machine; it holds the training "
                          f"state checkpoints/last.pt: resume where that folder is")
    if not run_folder.belongs_to(resumed.outputs_dir, resumed.run_id):
        raise SeqexpError(f"resume: run {resumed.run_id}'s outputs folder "
                          f"{resumed.outputs_dir} holds run "
                          f"{run_folder.owner(resumed.outputs_dir)}'s files now, not its "
                          f"training state: start a new run (without resume=)")
    return resumed.outputs_dir


def example_user(data: SequenceData) -> str:
    """The raw id of the first user with training events: the MLflow Model's input example."""
    codes = np.flatnonzero(data.train_end > data.offsets[:-1])
    code = int(codes[0]) if len(codes) else 0
    return str(code) if data.user_ids is None else str(data.user_ids[code])


def _saved_state(resumed: RunToResume, output_dir: Path) -> ResumableState:
    """The resumable training state of the run to continue, read before anything of the run is
    changed: a state that cannot be used is refused with the run as it was (its status, its
    resumes count)."""
    state = ResumableState(output_dir / "checkpoints" / "last.pt", resume=True,
                           logged_epochs=frozenset(resumed.logged_epochs))
    try:
        return replace(state, saved=state.load())
    except SeqexpError as exc:
        raise SeqexpError(f"resume: run {resumed.run_id} cannot continue, {exc}; the run is "
                          f"left as it was: start a new run (without resume=)") from None


def _unwritable(exc: OSError, output_dir: Path, resumed: bool) -> SeqexpError:
    """The one line for a run's file that the file system refused (full, the file size limit):
    the file, its folder, and what to do. A copy into the artifact store names the store's
    folder (shutil puts it second)."""
    target = Path(exc.filename2 or exc.filename or output_dir / "?")
    outputs = Path(output_dir).resolve()
    inside = target.resolve().is_relative_to(outputs)
    what = target.resolve().relative_to(outputs) if inside else target.name
    key = "mlflow.tracking_uri" if not inside else None if resumed else "hydra.run.dir"
    return unwritable(outputs if inside else target.parent, exc, what, key, also="")


def _end_run(tracker: Tracker, status: str, error: BaseException | None,
             output_dir: Path) -> None:
    """End the run with `status`, a failed one with its error in the tag `error`. A store that
    cannot record it (a full disk holds the SQLite file too) is said in the failure's one line;
    the next seqexp on this host marks the run FAILED (close_abandoned_runs)."""
    try:
        if error is not None and status == "FAILED":
            tracker.set_tags({ERROR_TAG: message_line(error, limit=4000)})
        tracker.end(status)
    except Exception as exc:  # said in the run's one line
        if not isinstance(error, SeqexpError):
            raise
        record_unrecorded_failure(output_dir, str(error))
        raise SeqexpError(f"{error}; the MLflow run {tracker.run_id} could not be marked "
                          f"{status} ({message_line(exc, limit=200)}): the next seqexp run in "
                          f"this store marks it FAILED") from None


def close_abandoned_runs_quietly(tracker: Tracker) -> None:
    """Housekeeping of the store: a failure here must not cost the run."""
    try:
        close_abandoned_runs(tracker)
    except Exception as exc:  # logged, and the run goes on
        log.warning("could not check the store for runs of killed processes: %s",
                    message_line(exc, which=-1))


def headline_metrics(cfg: DictConfig) -> list[str]:
    """What the end of a run logs: MRR/Recall/NDCG at the monitored cutoff and, when on, the
    next-basket F1/NDCG."""
    k = cfg.eval.monitor_cutoff
    names = [f"test_{m}_at_{k}" for m in HEADLINE_METRICS]
    if cfg.eval.basket_gap_s is not None:
        names += [f"test_basket_{m}_at_{cfg.eval.basket_k}" for m in ("f1", "ndcg")]
    return names


def log_ranks(tracker: Tracker, counts: RankCounts, data: SequenceData, cfg: DictConfig,
              output_dir: Path) -> None:
    """The per-event test ranks as the artifact test_ranks.parquet (eval.save_ranks), with the
    raw ids behind its user and item codes in test_ranks_ids.parquet."""
    if not cfg.eval.save_ranks:
        return
    settings = {"exclude_seen": bool(cfg.eval.exclude_seen),
                "dataset": str(cfg.dataset.name), "seed": int(cfg.seed)}
    tracker.log_artifact(write_ranks(counts, data, output_dir / RANKS_FILE, settings))
    ids = write_id_maps(data, output_dir / ID_MAPS_FILE)
    if ids is not None:
        tracker.log_artifact(ids)
