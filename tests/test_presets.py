"""The sweep presets compose: experiment=table2, every hydra/launcher preset, the Optuna searches;
the launchers whose plugin is installed accept their preset and run a sweep."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from helpers import tiny_overrides
from seqexp.analysis.table import load_paper, paper_order
from seqexp.apps import cli
from seqexp.core.resources import config_dir, group_options


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def compose_all(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def without_tracking(cfg) -> dict:
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra")
    tree["mlflow"].pop("experiment")
    return tree


@pytest.mark.slow  # composes all 16 jobs
def test_table2_is_every_paper_model_on_both_datasets_with_its_own_settings():
    cfg = compose_all(["experiment=table2"])
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.mlflow.experiment == "table2"
    params = cfg.hydra.sweeper.params
    models, datasets = params.model.split(","), params.dataset.split(",")
    paper_models, paper_datasets = paper_order(load_paper())
    assert models == paper_models and datasets == paper_datasets  # 8 x 2 = 16 jobs
    assert set(models) <= set(group_options("model"))
    for model in models:
        for dataset in datasets:
            job = compose_all(["experiment=table2", f"model={model}", f"dataset={dataset}"])
            alone = compose_all([f"model={model}", f"dataset={dataset}"])
            # the experiment changes where the run is tracked, not what it computes
            assert without_tracking(job) == without_tracking(alone), (model, dataset)
    rnn = compose_all(["experiment=table2", "model=attentional_ugru", "dataset=lastfm"])
    assert (rnn.model.hidden_size, rnn.model.window, rnn.train.batch_size) == (1000, 20, 1000)


LAUNCHERS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "JoblibLauncher",
               "hydra_plugins.hydra_joblib_launcher.config", "JobLibLauncherConf"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "SlurmLauncher",
              "hydra_plugins.hydra_submitit_launcher.config", "SlurmQueueConf"),
    "ray_cluster": ("hydra_plugins.hydra_ray_launcher", "RayLauncher",
                    "hydra_plugins.hydra_ray_launcher._config", "RayLauncherConf"),
}


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_every_launcher_preset_composes_and_its_plugin_accepts_it(name):
    module, launcher, config_module, config_class = LAUNCHERS[name]
    if name == "joblib":  # hydra-joblib-launcher's own preset (a dependency), kept as it is
        assert name not in group_options("hydra/launcher")
    else:  # seqexp's presets compose without their plugin
        assert name in group_options("hydra/launcher")
    cfg = compose_all([f"hydra/launcher={name}", "model=itemknn"])
    assert cfg.hydra.launcher._target_.endswith(f".{launcher}")
    assert cfg.model.name == "itemknn"
    if not installed(module):
        pytest.skip(f"{module} is not installed: the preset composes, it cannot be launched")
    schema = getattr(importlib.import_module(config_module), config_class)
    # the preset spells out every key of the plugin's own config (and no other)
    assert set(cfg.hydra.launcher) == {f.name for f in dataclasses.fields(schema)}
    assert type(instantiate(cfg.hydra.launcher)).__name__ == launcher


@pytest.mark.skipif(not installed("hydra_plugins.hydra_optuna_sweeper"),
                    reason="hydra-optuna-sweeper not installed (pip install 'seqexp[optuna]')")
@pytest.mark.parametrize("preset", ["optuna", "rnn_optuna"])
def test_optuna_presets_maximise_the_validation_mrr(preset):
    cfg = compose_all([f"hparams_search={preset}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert sweeper.direction == "maximize" and sweeper.max_failure_rate == 1.0
    assert sweeper.storage is None and sweeper.sampler._target_.endswith("TPESampler")
    assert {"train.lr", "train.weight_decay"} <= set(sweeper.params)
    if preset == "rnn_optuna":
        assert {"model.hidden_size", "model.dropout"} <= set(sweeper.params)
    assert type(instantiate(sweeper)).__name__ == "OptunaSweeper"


def test_a_preset_without_its_plugin_is_one_line(monkeypatch):
    monkeypatch.setattr(cli, "_importable", lambda module: False)
    assert cli.check_plugins(["-m", "hydra/launcher=ray_cluster", "seed=1,2"]) == (
        "hydra/launcher=ray_cluster needs hydra-ray-launcher: pip install 'seqexp[ray]'")
    assert "pip install 'seqexp[optuna]'" in cli.check_plugins(["hparams_search=optuna"])
    assert cli.check_plugins(["hydra/launcher=basic", "model=gru"]) is None
    monkeypatch.setattr(cli, "_importable", lambda module: True)
    assert cli.check_plugins(["hydra/launcher=slurm"]) is None
    assert cli.check_group_choices(["experiment=tabel2"]).startswith(
        "experiment=tabel2 is not a known experiment; choose one of rivals, table2")


def run_sweep(launcher: list[str], tmp_path: Path,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`seqexp -m LAUNCHER model=pop seed=1,2` (tiny) through the installed entry point, from
    tmp_path: its default store is tmp_path/mlflow.db."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [str(Path(sys.executable).with_name("seqexp")), "-m", *launcher, "model=pop",
         "seed=1,2", *tiny_overrides(tmp_path / "data"), f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def assert_two_nested_runs(tmp_path: Path) -> list:
    """The sweep's parent and its two jobs' runs, FINISHED, in tmp_path/mlflow.db; the jobs."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("seqexp").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("seqexp.role") == "sweep"]
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED" and len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert sorted(child.data.params["seed"] for child in children) == ["1", "2"]
    return children


@pytest.mark.skipif(not installed("hydra_plugins.hydra_submitit_launcher"),
                    reason="hydra-submitit-launcher not installed (pip install 'seqexp[slurm]')")
@pytest.mark.slow  # submitit's own worker processes
def test_submitit_jobs_in_their_own_processes_nest_under_the_parent(tmp_path, store_uri):
    # submitit_local: the path SLURM jobs take (pickled job, fresh process reading the sweep
    # folder), without sbatch.
    result = run_sweep(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
                       tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_two_nested_runs(tmp_path)


needs_ray = pytest.mark.skipif(
    not installed("hydra_plugins.hydra_ray_launcher"),
    reason="hydra-ray-launcher not installed (pip install 'seqexp[ray]')")


@needs_ray
@pytest.mark.slow  # Ray starts a one-machine cluster (~10 s), its workers import seqexp
def test_ray_jobs_without_a_cluster_nest_under_the_parent(tmp_path, store_uri, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = run_sweep(["hydra/launcher=ray_cluster"], tmp_path, ray_token(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_two_nested_runs(tmp_path)


def ray_token(folder: Path) -> dict[str, str]:
    """Ray's token authentication with a token file in `folder`: the environment of the Ray
    node and of its drivers. Ray 2.60 turns token auth on for a cluster that ray.init starts,
    and for `ray start` where a token exists, generating ~/.ray/auth_token when there is none;
    with a file of its own a test leaves the home folder alone, and its head takes no
    connection from a driver without the token (Ray binds its ports to every interface)."""
    token = folder / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Set in the environment of `ray start`, so inherited by every process of that Ray node (GCS,
# raylet, agents, workers): how the teardown finds them, whatever became of their parents.
RAY_HEAD_MARK = "SEQEXP_TEST_RAY_HEAD"


def processes_marked(mark: str) -> list[int]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{RAY_HEAD_MARK}={mark}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def stop_processes(pids: list[int], grace_s: float = 3.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()
                    and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]]
            time.sleep(0.2)


@pytest.fixture
def ray_head():
    """A Ray head node of its own (`ray start --head`): free ports, its own temp dir and auth
    token; yields (the environment of a driver: RAY_ADDRESS=127.0.0.1:PORT and the token, the
    temp dir). Ray 2.60 takes no loopback address for a node (it replaces 127.0.0.1 by the
    machine's address and listens on every interface), hence the token. Afterwards, pass or
    fail, every process of that node is ended: found by the mark in their environment, not by
    `ray stop`, which ends every Ray node of the machine."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths
    auth = ray_token(temp)
    port = free_port()
    ports = {flag: free_port() for flag in (
        "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
        "--metrics-export-port", "--runtime-env-agent-port", "--dashboard-agent-grpc-port",
        "--dashboard-agent-listen-port")}
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head",
               f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
               "--disable-usage-stats", "--num-cpus=2", "--object-store-memory=78643200",
               "--min-worker-port=0", "--max-worker-port=0",  # 0: ports the system picks
               *(f"{flag}={value}" for flag, value in ports.items())]
    env = dict(os.environ, **auth, **{RAY_HEAD_MARK: str(temp)})
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180,
                                 start_new_session=True)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}", **auth}, temp
    finally:
        stop_processes(processes_marked(str(temp)))
        leftover = processes_marked(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
        assert not leftover, f"processes of the Ray head still running: {leftover}"


@needs_ray
@pytest.mark.slow  # a Ray head node, and its workers import seqexp
def test_ray_jobs_on_a_running_cluster_nest_under_the_parent(tmp_path, store_uri, ray_head):
    driver_env, temp = ray_head
    result = run_sweep(["hydra/launcher=ray_cluster"], tmp_path, driver_env)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = assert_two_nested_runs(tmp_path)
    # each job ran in a worker of that head: Ray names a worker's log file by its pid
    worker_logs = {log.stem.rsplit("-", 1)[-1]
                   for log in (temp / "session_latest" / "logs").glob("worker-*.out")}
    assert {job.data.tags["pid"] for job in jobs} <= worker_logs, worker_logs


def test_rivals_sweeps_the_rivals_over_the_protocols_on_the_dataset_named():
    cfg = compose_all(["experiment=rivals", "dataset=ml1m"])
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.mlflow.experiment == "rivals"
    params = cfg.hydra.sweeper.params
    assert params.model.split(",") == ["gru", "linear_ugru", "rectified_ugru",
                                       "attentional_ugru", "hrnn", "sasrec", "itemknn", "pop"]
    assert params.split.split(",") == ["user_tail", "last_session"]
    assert params["eval.exclude_seen"].split(",") == ["false", "true"]
    assert cfg.dataset.name == "ml1m"  # the preset leaves the dataset to the command line
    assert "hrnn" not in compose_all(["experiment=table2"]).hydra.sweeper.params.model
