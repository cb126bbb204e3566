"""Long runs: a run stopped by SIGKILL or SIGTERM (or a cluster's time-limit signal) and resumed
ends exactly as the same run uninterrupted; it continues its own MLflow run in its own outputs
folder; a different configuration is refused; a requeued cluster job resumes its run.

The subprocess tests add a callback to the run's trainer (tests/subprocess_hooks/sitecustomize.py):
SEQEXP_TEST_HOLD_AFTER_EPOCH=k: after writing the state of epoch k the process says so on stderr
and waits for a signal, which the test then sends (SIGKILL or SIGTERM)."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from helpers import SignalAfterEpoch, adding_callback, compose_config, tiny_overrides
from seqexp.apps.cli import stop_after_signal
from seqexp.core.checkpoint import read_checkpoint
from seqexp.core.errors import SeqexpError
from seqexp.core.stopping import StopSignals, TrainingStopped
from seqexp.data.loading import load_dataset
from seqexp.engine.evaluator import Evaluator
from seqexp.engine.trainer import (
    STATE_FORMAT,
    ResumableState,
    TrainingCallback,
    TrainSettings,
    discard_metrics,
    no_stop_signal,
)
from seqexp.models import knn
from seqexp.run import experiment
from seqexp.run.experiment import (
    build_evaluator,
    build_model,
    build_trainer,
    run_experiment,
    seed_everything,
)
from seqexp.run.resume import CLUSTER_JOB_TAG, differing_keys

ROOT = Path(__file__).resolve().parent.parent
# PYTHONPATH of a `seqexp` process whose trainer a test stops: its sitecustomize adds the callback
# that HOLD_ENV or SIGNAL_ENV asks for.
HOOKED_PATH = os.pathsep.join(str(p) for p in (ROOT, ROOT / "tests" / "subprocess_hooks",
                                               ROOT / "tests"))
HOLD_ENV = "SEQEXP_TEST_HOLD_AFTER_EPOCH"
SIGNAL_ENV = "SEQEXP_TEST_SIGNAL_AFTER_EPOCH"
# gru, one user-based cell, DREAM and MF: a carried hidden state, a user vector with its own
# dropout, numpy-sampled BPR negatives over baskets, and a torch.Generator seeded per epoch.
FAMILIES = ["gru", "rectified_ugru", "dream", "mf"]
EPOCHS = 4


def overrides(model: str, tmp: Path) -> list[str]:
    extra = ["model.hidden_size=16"] if model in ("gru", "rectified_ugru", "dream") else []
    if model in ("gru", "rectified_ugru"):  # windows shorter than a user: a carried state
        extra.append("model.window=4")
    if model == "dream":  # windows of fewer baskets than a user has: a carried state
        extra.append("model.max_baskets=2")
    return [f"model={model}", *extra, *tiny_overrides(tmp / "data"), f"train.epochs={EPOCHS}",
            "train.num_threads=1", "train.patience=10", "mlflow.log_checkpoint=false",
            "eval.save_ranks=false", "device=cpu"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """train.num_threads=1 sets torch's threads for this process: put them back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """One data cache for the module (the synthetic data are generated once)."""
    return tmp_path_factory.mktemp("resume")


@functools.cache
def composed(model_name: str, shared: Path):
    return compose_config(overrides(model_name, shared))


def trainer_run(model_name: str, shared: Path, state: Path, resume: bool = False,
                stop=no_stop_signal, epochs: int = EPOCHS, callbacks=(), logged_epochs=None,
                log_metrics=discard_metrics, **train_keys):
    """The training loop alone (no MLflow): history and test metrics. `train_keys`: train.*
    keys other than the composed config's."""
    cfg = OmegaConf.merge(composed(model_name, shared),
                          {"train": {"epochs": epochs, **train_keys}})
    torch.set_num_threads(1)
    data = load_dataset(cfg.dataset, cfg.split, Path(cfg.paths.raw_dir),
                        Path(cfg.paths.cache_dir), progress=False)
    seed_everything(cfg.seed)  # a new process: every random state from the seed again
    model = build_model(cfg.model, data)
    evaluator = build_evaluator(cfg)
    trainer = build_trainer(cfg, evaluator, state=ResumableState(state, resume, logged_epochs),
                            stop_requested=stop, callbacks=callbacks)
    result = trainer.fit(model, data, log_metrics)
    return result, evaluator.evaluate(model, data, "test")


def deterministic(history: list[dict]) -> list[dict]:
    """The history without wall-clock figures."""
    return [{k: v for k, v in row.items() if "per_s" not in k and "seconds" not in k}
            for row in history]


class StopAfter:
    """A stop check that reports SIGTERM from its (n+1)-th call on (calls come after every
    batch and at every epoch's start and end)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self) -> str | None:
        self.calls += 1
        return "SIGTERM" if self.calls > self.n else None


@pytest.mark.parametrize("model_name", FAMILIES)
def test_a_stopped_and_resumed_training_equals_the_uninterrupted_one(model_name, shared):
    checks = StopAfter(10**9)  # counts the stop checks of a whole run
    full, full_test = trainer_run(model_name, shared, shared / f"{model_name}-full.pt",
                                  stop=checks)
    assert len(full.history) == EPOCHS
    # a process that ends after the state of epoch 2 is written (what SIGKILL leaves behind)
    state = shared / f"{model_name}-killed.pt"
    trainer_run(model_name, shared, state, epochs=2)
    assert read_checkpoint(state)["epoch"] == 2
    resumed, resumed_test = trainer_run(model_name, shared, state, resume=True)
    assert deterministic(resumed.history) == deterministic(full.history)
    assert resumed_test == full_test
    # stopped within an epoch (stop checks come after every batch and at each epoch's start
    # and end): early in epoch 1, in the middle of the run and in the last epoch
    for n in (2, checks.calls // 2, checks.calls - 3):
        state = shared / f"{model_name}-{n}.pt"
        with pytest.raises(TrainingStopped) as stopped:
            trainer_run(model_name, shared, state, stop=StopAfter(n))
        saved = read_checkpoint(state)
        assert saved["format"] == STATE_FORMAT
        assert saved["epoch"] == stopped.value.epoch
        assert (saved["partial"] or {"batches": 0})["batches"] == stopped.value.batches
        resumed, resumed_test = trainer_run(model_name, shared, state, resume=True)
        assert deterministic(resumed.history) == deterministic(full.history), n
        assert (resumed.best_epoch, resumed.best_score) == (full.best_epoch, full.best_score)
        assert resumed_test == full_test


def test_early_stopping_counts_on_across_a_resume(shared):
    """patience 2 and an improvement nobody reaches (min_delta 1): epoch 1 is the best, epochs
    2 and 3 are stale, training stops after epoch 3, resumed after epoch 2 or not."""
    settings = {"patience": 2, "min_delta": 1.0}
    full, _ = trainer_run("mf", shared, shared / "patience-full.pt", **settings)
    assert (len(full.history), full.best_epoch) == (3, 1)
    state = shared / "patience.pt"
    trainer_run("mf", shared, state, epochs=2, **settings)
    assert read_checkpoint(state)["stale"] == 1
    resumed, _ = trainer_run("mf", shared, state, resume=True, **settings)
    assert deterministic(resumed.history) == deterministic(full.history)


def test_a_resumed_fit_logs_again_the_saved_epochs_the_tracker_lacks(shared):
    """A process that died between writing the state of epoch 2 and logging its metrics."""
    state = shared / "relog.pt"
    trainer_run("mf", shared, state, epochs=2)
    logged = []
    resumed, _ = trainer_run("mf", shared, state, resume=True, logged_epochs=frozenset({1}),
                             log_metrics=lambda metrics, step: logged.append((step, metrics)))
    assert [step for step, _ in logged] == [2, 3, 4]
    assert logged[0][1] == resumed.history[1]


def test_sigterm_in_the_middle_of_an_epoch_keeps_its_batches(shared, monkeypatch):
    """A real SIGTERM through StopSignals, sent from inside the third batch of epoch 2."""
    from seqexp.engine.trainer import Trainer
    from seqexp.models.recurrent import RecurrentRecommender

    real_loss, real_epoch = RecurrentRecommender.training_loss, Trainer.train_epoch
    calls, epoch_starts, signal_at = [], [], {}

    def counted_loss(self, batch):
        calls.append(1)
        if len(calls) == signal_at.get("call"):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(self, batch)

    def recorded_epoch(self, *args, **kwargs):
        epoch_starts.append(len(calls))
        return real_epoch(self, *args, **kwargs)

    monkeypatch.setattr(RecurrentRecommender, "training_loss", counted_loss)
    monkeypatch.setattr(Trainer, "train_epoch", recorded_epoch)
    full, full_test = trainer_run("gru", shared, shared / "sig-full.pt")
    signal_at["call"] = epoch_starts[1] + 3
    calls.clear()
    state = shared / "sig.pt"
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop, pytest.raises(TrainingStopped) as stopped:
        trainer_run("gru", shared, state, stop=stop)
    assert signal.getsignal(signal.SIGTERM) is before
    assert (stopped.value.signal_name, stopped.value.epoch, stopped.value.batches) == (
        "SIGTERM", 1, 3)
    signal_at.clear()
    resumed, resumed_test = trainer_run("gru", shared, state, resume=True)
    assert deterministic(resumed.history) == deterministic(full.history)
    assert resumed_test == full_test


class Recorder(TrainingCallback):
    """Records every hook call; at each epoch's end, the epoch of the state file as well."""

    def __init__(self, state: Path) -> None:
        self.state, self.batches, self.epochs = state, [], []

    def on_batch_end(self, trainer, epoch: int, batches: int) -> None:
        self.batches.append((epoch, batches))

    def on_epoch_end(self, trainer, epoch: int) -> None:
        self.epochs.append((epoch, read_checkpoint(self.state)["epoch"]))


def test_callbacks_come_after_every_batch_and_after_each_epochs_state_is_written(shared):
    state = shared / "callbacks.pt"
    recorder = Recorder(state)
    result, _ = trainer_run("mf", shared, state, epochs=2, callbacks=[recorder])
    assert recorder.epochs == [(1, 1), (2, 2)]
    for epoch in (1, 2):
        counts = [batches for at, batches in recorder.batches if at == epoch]
        assert len(counts) > 1 and counts == list(range(1, len(counts) + 1))
    assert len(result.history) == 2


def test_the_train_settings_are_the_train_keys_and_their_defaults_are_the_yamls(shared):
    """Each TrainSettings field is the train.* key of its name, with no default of its own
    (conf/train/default.yaml holds them); the keys without a field are
    experiment.configure_torch's and keep_last (run_experiment's, once a run has finished)."""
    defaults = OmegaConf.to_container(compose_config([]).train, resolve=True)
    fields = dataclasses.fields(TrainSettings)
    assert set(defaults) == {f.name for f in fields} | {"num_threads", "tf32", "cpu_kernels",
                                                        "keep_last"}
    assert all(f.default is dataclasses.MISSING for f in fields)
    default = TrainSettings.from_config(defaults)
    chosen = TrainSettings(epochs=7, batch_size=9, lr=0.5, optimizer="sgd", weight_decay=0.25,
                           grad_clip=None, monitor="recall_at_10", patience=5, min_delta=0.125,
                           progress=False, amp=True, compile=True)
    assert all(getattr(chosen, f.name) != getattr(default, f.name) for f in fields)
    cfg = compose_config([*overrides("mf", shared), *(
        f"train.{key}={'null' if value is None else value}"
        for key, value in dataclasses.asdict(chosen).items())])
    assert build_trainer(cfg, build_evaluator(cfg)).settings == chosen


# ----------------------------------------------------------------------- the whole run, MLflow


def run_in_process(model_name: str, tmp: Path, shared: Path, name: str, extra=(),
                   job_key: str | None = None):
    cfg = compose_config([*overrides(model_name, shared),
                          f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *extra])
    return run_experiment(cfg, launch_dir=tmp, output_dir=tmp / name, job_key=job_key)


@pytest.fixture
def store(tmp_path, empty_store) -> MlflowClient:
    """tmp_path/mlflow.db with its schema made (a copy: MLflow takes seconds to make one)."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture(scope="module")
def baselines(shared, tmp_path_factory, empty_store):
    """The uninterrupted run of a model, once per module."""
    done = {}

    def baseline(model_name: str):
        if model_name not in done:
            folder = tmp_path_factory.mktemp(f"baseline-{model_name}")
            shutil.copy(empty_store, folder / "mlflow.db")
            result = run_in_process(model_name, folder, shared, "run")
            client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
            done[model_name] = (result, val_history(client, result.run_id))
        return done[model_name]

    return baseline


def start_held(model_name: str, tmp: Path, shared: Path, epoch: int) -> subprocess.Popen:
    """`seqexp ...` in a process of its own, waiting after the state of `epoch` is written."""
    env = dict(os.environ, **{HOLD_ENV: str(epoch)}, PYTHONPATH=HOOKED_PATH,
               OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "seqexp.apps.cli", *overrides(model_name, shared),
         f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", f"hydra.run.dir={tmp / 'run'}"],
        cwd=tmp, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith(f"seqexp-test: holding after epoch {epoch}"):
            return process
    process.wait()
    raise AssertionError("the run never reached the hold point:\n" + "".join(lines[-30:]))


def val_history(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    history = client.get_metric_history(run_id, "epoch/val_mrr_at_20")
    return sorted((m.step, m.value) for m in history)


def only_run(client: MlflowClient):
    (run,) = client.search_runs([client.get_experiment_by_name("seqexp").experiment_id])
    return run


@pytest.mark.parametrize("model_name", [
    "gru", *[pytest.param(m, marks=pytest.mark.slow) for m in ("rectified_ugru", "dream", "mf")]])
def test_a_run_killed_by_sigkill_resumes_its_own_run_and_ends_as_if_never_killed(
        model_name, tmp_path, shared, store, baselines):
    baseline, expected_history = baselines(model_name)
    process = start_held(model_name, tmp_path, shared, epoch=2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    run = only_run(store)
    assert run.info.status == "RUNNING"  # nobody could mark it
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 2
    resumed = run_in_process(model_name, tmp_path, shared, "elsewhere",
                             [f"resume={run.info.run_id}", "device=cpu"])
    assert resumed.run_id == run.info.run_id
    assert resumed.metrics == baseline.metrics
    after = store.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags["resumes"] == "1"
    assert [step for step, _ in expected_history] == [1, 2, 3, 4]
    assert val_history(store, run.info.run_id) == expected_history  # each epoch once
    # the same outputs folder: the resumed process wrote into the run's, not into its own
    assert resumed.output_dir == tmp_path / "run"
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert not (tmp_path / "elsewhere").exists()
    assert after.data.tags["env.torch"] == torch.__version__


@pytest.mark.slow  # a subprocess; SIGTERM is also tested in-process above and below
def test_sigterm_saves_the_state_marks_the_run_killed_and_says_how_to_resume(
        tmp_path, shared, store, baselines):
    process = start_held("gru", tmp_path, shared, epoch=2)
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 143
    run = only_run(store)
    assert run.info.status == "KILLED"
    line = next(line for line in rest.splitlines() if line.startswith("seqexp: stopped"))
    assert line.startswith(f"seqexp: stopped by SIGTERM after epoch 2; the MLflow run "
                           f"{run.info.run_id} is marked KILLED; resume with: seqexp model=gru ")
    assert line.endswith(f" resume={run.info.run_id}")
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 2
    assert [step for step, _ in val_history(store, run.info.run_id)] == [1, 2]
    resumed = run_in_process("gru", tmp_path, shared, "x", ["resume=last"])
    assert resumed.run_id == run.info.run_id
    assert resumed.metrics == baselines("gru")[0].metrics


def test_a_different_configuration_is_refused_naming_the_keys(tmp_path, shared, store,
                                                             monkeypatch):
    with monkeypatch.context() as patched:  # the run sends itself SIGTERM after epoch 1
        patched.setattr(experiment, "build_trainer", adding_callback(
            experiment.build_trainer, SignalAfterEpoch(1, signal.SIGTERM)))
        with pytest.raises(TrainingStopped):
            run_in_process("gru", tmp_path, shared, "run")
    run = only_run(store)
    assert run.info.status == "KILLED"
    with pytest.raises(SeqexpError) as refused:
        run_in_process("gru", tmp_path, shared, "x",
                       [f"resume={run.info.run_id}", "train.lr=0.01", "seed=7"])
    message = str(refused.value)
    assert "\n" not in message and "seed (run: 42, now: 7)" in message
    assert "train.lr (run: 0.001, now: 0.01)" in message
    with pytest.raises(SeqexpError, match="no unfinished run with this configuration"):
        run_in_process("gru", tmp_path, shared, "x", ["resume=last", "seed=7"])
    with pytest.raises(SeqexpError, match="no such run"):
        run_in_process("gru", tmp_path, shared, "x", ["resume=0123456789abcdef"])
    # where and how fast it runs may differ; `last` finds the run
    finished = run_in_process("gru", tmp_path, shared, "x",
                              ["resume=last", "train.progress=true", "eval.batch_users=7"])
    assert finished.run_id == run.info.run_id
    with pytest.raises(SeqexpError, match="finished already"):
        run_in_process("gru", tmp_path, shared, "x", [f"resume={run.info.run_id}"])


def test_only_the_keys_of_what_a_run_computes_count():
    logged = {"seed": "42", "train.lr": "0.001", "device": "cuda", "paths.data_dir": "/a",
              "data.train_events": "445", "model.hidden_size": "16"}
    now = {"seed": "42", "train.lr": "0.001", "device": "cpu", "paths.data_dir": "/b",
           "model.hidden_size": "16", "resume": "last", "train.num_threads": "1"}
    assert differing_keys(now, logged) == []
    assert differing_keys({**now, "model.window": "5"}, logged) == ["model.window"]
    assert differing_keys({**now, "seed": "1"}, logged) == ["seed"]


# ------------------------------------------------------------------------ requeue on a cluster


def test_a_requeued_cluster_job_resumes_its_own_run(tmp_path, shared, store, baselines,
                                                   monkeypatch):
    """submitit's protocol, with a stand-in for its handler: at a time limit SLURM sends
    SIGUSR2 to a job; submitit's handler (installed before the job runs) checkpoints the
    callable and requeues it. seqexp defers the signal to the end of the batch, saves the
    state, ends the run KILLED and then hands the signal to that handler; the requeued job,
    with the same job key, continues the run."""
    baseline = baselines("gru")[0]
    client = store
    handed_over = []

    def launcher_handler(number, frame):  # what submitit's checkpoint_and_try_requeue does
        (run,) = client.search_runs([client.get_experiment_by_name("seqexp").experiment_id])
        handed_over.append((signal.Signals(number).name, run.info.status))
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, launcher_handler)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(experiment, "build_trainer", adding_callback(
                experiment.build_trainer, SignalAfterEpoch(2, signal.SIGUSR2)))
            with pytest.raises(TrainingStopped) as stopped:
                run_in_process("gru", tmp_path, shared, "run", job_key="slurm:77_3")
        with pytest.raises(SystemExit) as exited:
            stop_after_signal(stopped.value, ["model=gru"], multirun=True)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert exited.value.code == -1 and handed_over == [("SIGUSR2", "KILLED")]
    run = only_run(client)
    assert run.data.tags[CLUSTER_JOB_TAG] == "slurm:77_3"
    # the requeued job (the same key, no resume=) continues the run, RUNNING again
    from seqexp.engine.trainer import Trainer

    real_fit, statuses = Trainer.fit, []

    def fit_recording_status(self, *args, **kwargs):
        statuses.append(only_run(client).info.status)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit_recording_status)
    requeued = run_in_process("gru", tmp_path, shared, "run2", job_key="slurm:77_3")
    assert statuses == ["RUNNING"]
    assert requeued.run_id == run.info.run_id and requeued.metrics == baseline.metrics
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.slow  # submitit's own worker processes, started twice
def test_submitit_local_requeues_a_signalled_job_which_resumes(tmp_path, shared, baselines):
    env = dict(os.environ, PYTHONPATH=HOOKED_PATH, OMP_NUM_THREADS="1",
               **{SIGNAL_ENV: "2:USR2"})
    result = subprocess.run(
        [sys.executable, "-m", "seqexp.apps.cli", "-m", "hydra/launcher=submitit_local",
         "hydra.launcher.timeout_min=10", *overrides("gru", shared), "seed=42",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("seqexp").experiment_id])
    (job,) = [r for r in runs if r.data.tags.get("seqexp.role") != "sweep"]
    assert job.info.status == "FINISHED" and job.data.tags["resumes"] == "1"
    baseline, expected_history = baselines("gru")
    assert val_history(client, job.info.run_id) == expected_history
    assert job.data.metrics["epoch/test/mrr_at_20"] == baseline.metrics["test_mrr_at_20"]


def test_environment_is_recorded():
    from seqexp.run.tracking import environment_tags

    tags = environment_tags("cpu")
    assert tags["env.torch"] == torch.__version__
    assert tags["env.python"] == ".".join(map(str, sys.version_info[:3]))
    assert tags["env.cuda"] == (torch.version.cuda or "none")
    assert tags["env.threads"] == str(torch.get_num_threads())
    from seqexp import __version__

    assert tags["env.seqexp"] == __version__
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "model name" in cpuinfo.read_text():
        assert tags["env.cpu"] in cpuinfo.read_text()
    assert np.all([isinstance(v, str) and v for v in tags.values()])


def _sigterm_once(real: Callable, when: Callable[..., bool]) -> Callable:
    """`real`, which sends this process SIGTERM on its first call where `when(*args)` holds
    (a real signal, through seqexp's StopSignals handler)."""
    sent = []

    def wrapped(*args, **kwargs):
        if not sent and when(*args, **kwargs):
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("moment", ["test evaluation", "artifact logging"])
def test_sigterm_after_training_ends_the_run_killed_and_a_resume_finishes_it(
        moment, tmp_path, shared, store, baselines, monkeypatch):
    baseline, _ = baselines("gru")
    with monkeypatch.context() as patched:
        if moment == "test evaluation":  # arrives inside the first batch of test points
            patched.setattr(Evaluator, "_batch_counts", _sigterm_once(
                Evaluator._batch_counts, lambda *a, **k: not a[1].training and _in_test[0]))
            patched.setattr(Evaluator, "rank_counts", _marking_test(Evaluator.rank_counts))
        else:  # arrives while the ranks artifact is being written
            patched.setattr(experiment, "log_ranks", _sigterm_once(
                experiment.log_ranks, lambda *a, **k: True))
        with pytest.raises(TrainingStopped, match=f"stopped by SIGTERM after epoch {EPOCHS}"):
            run_in_process("gru", tmp_path, shared, "run")
    run = only_run(store)
    assert run.info.status == "KILLED"
    assert "epoch/test/mrr_at_20" not in run.data.metrics or moment == "artifact logging"
    resumed = run_in_process("gru", tmp_path, shared, "again", [f"resume={run.info.run_id}"])
    assert resumed.run_id == run.info.run_id and resumed.metrics == baseline.metrics
    assert store.get_run(run.info.run_id).info.status == "FINISHED"


def test_sigterm_during_a_knn_fit_ends_the_run_killed_and_a_resume_finishes_it(
        tmp_path, shared, store, baselines, monkeypatch):
    """item-kNN's fit in blocks of 5 items: SIGTERM after the first block stops the fit at
    the next block (the stop is asked between blocks), the run ends KILLED, and resume= fits
    again and ends with the uninterrupted run's metrics."""
    baseline, _ = baselines("itemknn")
    blocks = []
    with monkeypatch.context() as patched:
        patched.setattr(knn.FitProgress, "done", _sigterm_once(
            lambda self, count: blocks.append(count), lambda *a, **k: True))
        with pytest.raises(TrainingStopped, match="stopped by SIGTERM after epoch 0"):
            run_in_process("itemknn", tmp_path, shared, "run", ["model.fit_block=5"])
    assert blocks == [5]  # one block done: the signal was heeded before the second
    run = only_run(store)
    assert run.info.status == "KILLED"
    resumed = run_in_process("itemknn", tmp_path, shared, "again",
                             ["model.fit_block=5", f"resume={run.info.run_id}"])
    assert resumed.run_id == run.info.run_id and resumed.metrics == baseline.metrics
    assert store.get_run(run.info.run_id).info.status == "FINISHED"


_in_test = [False]


def _marking_test(real: Callable) -> Callable:
    def wrapped(self, model, data, phase, *args, **kwargs):
        _in_test[0] = phase == "test"
        try:
            return real(self, model, data, phase, *args, **kwargs)
        finally:
            _in_test[0] = False
    return wrapped


def test_a_stop_during_validation_ends_within_one_batch_from_the_epoch_before(shared):
    """A stop check that turns on during epoch 2's validation: the evaluator stops after that
    batch, and the fit reports the state of epoch 1, the last one written."""
    calls = {"validating": False, "batches": 0}

    def stop() -> str | None:
        if calls["validating"]:
            calls["batches"] += 1
            return "SIGTERM"
        return None

    class Validating(TrainingCallback):
        def on_epoch_end(self, trainer, epoch):  # the hook's signature
            if epoch == 1:  # the next evaluation is epoch 2's validation, in 10 batches
                trainer.evaluator.batch_users = 4
                real = trainer.evaluator.rank_counts

                def counting(*args, **kwargs):
                    calls["validating"] = True
                    return real(*args, **kwargs)
                trainer.evaluator.rank_counts = counting

    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after epoch 1$") as stopped:
        trainer_run("gru", shared, shared / "validation-stop.pt", stop=stop,
                    callbacks=[Validating()])
    assert stopped.value.epoch == 1 and calls["batches"] == 1  # asked once: after one batch
    # the stop left epoch 1's state: a resume trains epoch 2 again and ends as if never stopped
    resumed, test = trainer_run("gru", shared, shared / "validation-stop.pt", resume=True)
    uninterrupted, expected = trainer_run("gru", shared, shared / "validation-none.pt")
    assert deterministic(resumed.history) == deterministic(uninterrupted.history)
    assert test == expected


def _killed_run(tmp_path: Path, shared: Path, store: MlflowClient):
    """A gru run in tmp_path/run that SIGTERM stopped after epoch 1: KILLED, resumable."""
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(experiment, "build_trainer", adding_callback(
            experiment.build_trainer, SignalAfterEpoch(1, signal.SIGTERM)))
        with pytest.raises(TrainingStopped):
            run_in_process("gru", tmp_path, shared, "run")
    run = only_run(store)
    assert run.info.status == "KILLED" and "resumes" not in run.data.tags
    return run


def test_a_refused_training_state_leaves_the_run_as_it_was(tmp_path, shared, store, baselines):
    """A truncated last.pt is refused before the run is touched: still KILLED, its resumes
    count unchanged, its process tags those of the stopped process; with the whole file back,
    the same run resumes."""
    run = _killed_run(tmp_path, shared, store)
    state = tmp_path / "run" / "checkpoints" / "last.pt"
    whole = state.read_bytes()
    state.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SeqexpError) as refused:
        run_in_process("gru", tmp_path, shared, "x", ["resume=last"])
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"resume: run {run.info.run_id} cannot continue, {state}: ")
    assert message.endswith("the run is left as it was: start a new run (without resume=)")
    after = store.get_run(run.info.run_id)
    assert after.info.status == "KILLED" and "resumes" not in after.data.tags
    assert after.data.tags["pid"] == run.data.tags["pid"]
    assert after.info.end_time == run.info.end_time
    state.write_bytes(whole)
    resumed = run_in_process("gru", tmp_path, shared, "x", ["resume=last"])
    assert resumed.run_id == run.info.run_id
    assert resumed.metrics == baselines("gru")[0].metrics
    assert store.get_run(run.info.run_id).data.tags["resumes"] == "1"


def test_a_run_resumed_by_id_from_another_experiment_stays_in_its_own(tmp_path, shared, store):
    """mlflow.experiment does not change results, so resume=<id> may name a run of another
    experiment: the run continues there, and the run's result (the UI address the CLI prints)
    names that experiment, not mlflow.experiment's."""
    run = _killed_run(tmp_path, shared, store)
    resumed = run_in_process("gru", tmp_path, shared, "x",
                             [f"resume={run.info.run_id}", "mlflow.experiment=elsewhere"])
    assert resumed.run_id == run.info.run_id
    assert (resumed.experiment_id, resumed.experiment) == (run.info.experiment_id, "seqexp")
    assert store.get_run(run.info.run_id).info.experiment_id == run.info.experiment_id


def test_a_resumed_run_removes_the_temporary_files_a_kill_left(tmp_path, shared, store):
    """What atomic_path leaves when a kill cuts a write short (its mkstemp names) goes when the
    run is continued; other files, even ending in .tmp, stay."""
    run = _killed_run(tmp_path, shared, store)
    folder = tmp_path / "run"
    left = [folder / ".test_ranks.parquet.k3x_9q1z.tmp", folder / ".metrics.json.abcdefgh.tmp",
            folder / "checkpoints" / ".last.pt.0a1b2c3d.tmp"]
    kept = [folder / "notes.tmp", folder / ".last.pt.short.tmp", folder / "checkpoints" / "a.pt"]
    for path in left + kept:
        path.write_bytes(b"half a file")
    resumed = run_in_process("gru", tmp_path, shared, "x", [f"resume={run.info.run_id}"])
    assert resumed.run_id == run.info.run_id
    assert [p for p in left if p.exists()] == []
    assert all(p.read_bytes() == b"half a file" for p in kept)
    assert sorted(p.name for p in folder.rglob("*.tmp")) == [".last.pt.short.tmp", "notes.tmp"]
