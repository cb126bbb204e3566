"""Every run has its own outputs folder, whatever the clock: runs started in the same second (at
once or one after another) get folders of their own, recorded in their outputs_dir tag, and
seqexp.load, seqexp-recommend and resume= reach that run's own files; a folder another run
holds is refused before any run is made."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

import seqexp
from helpers import compose_config, run_seqexp, tiny_overrides
from seqexp.core import run_folder
from seqexp.core.checkpoint import read_checkpoint
from seqexp.core.errors import SeqexpError
from seqexp.core.resources import config_dir
from seqexp.data.loading import load_dataset
from seqexp.run.experiment import run_experiment

ROOT = Path(__file__).resolve().parent.parent
HOOKED_PATH = os.pathsep.join(str(p) for p in (ROOT, ROOT / "tests" / "subprocess_hooks",
                                               ROOT / "tests"))
HOLD_ENV = "SEQEXP_TEST_HOLD_AFTER_EPOCH"
# A clock that never moves: every run "starts in the same second" (the default folder name is
# the date and time to the second, then the token).
SAME_SECOND = "hydra.run.dir={root}/outputs/2026-01-01/00-00-00-${{seqexp_run_token:}}"
FINISHED = re.compile(r"seqexp: run (\w+) finished")


def gru_overrides(data: Path, db: Path, seed: int) -> list[str]:
    return ["model=gru", "model.hidden_size=8", "model.window=4", *tiny_overrides(data, db),
            "train.epochs=3", "train.num_threads=1", "train.patience=10",
            "eval.save_ranks=false", "device=cpu", f"seed={seed}"]


def test_the_default_folders_are_the_time_and_a_fresh_token():
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        names = [str(compose(config_name="config", return_hydra_config=True).hydra.run.dir)
                 for _ in range(2)]
        sweep = str(compose(config_name="config", return_hydra_config=True).hydra.sweep.dir)
    pattern = r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-[0-9a-f]{8}"
    assert all(re.fullmatch(pattern, name) for name in names), names
    assert names[0] != names[1]
    assert re.fullmatch(r"outputs/multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-[0-9a-f]{8}", sweep)


def test_a_claimed_folder_is_refused_and_names_its_run(tmp_path):
    run_folder.claim(tmp_path / "run")
    run_folder.record_owner(tmp_path / "run", "abc123")
    with pytest.raises(SeqexpError, match=r"holds the outputs of run abc123 already; .*"
                                          r"drop hydra.run.dir="):
        run_folder.claim(tmp_path / "run")
    assert run_folder.owner(tmp_path / "run") == "abc123"
    assert run_folder.belongs_to(tmp_path / "run", "abc123")
    assert not run_folder.belongs_to(tmp_path / "run", "other")
    assert run_folder.belongs_to(tmp_path / "no-mark", "other")  # an older seqexp's folder


def test_two_runs_one_after_another_in_the_same_second_load_their_own_models(tmp_path):
    """The README's tour: a pop run, then a gru run, within one second (here: a clock that does
    not move). Each run id loads its own model, through seqexp.load and seqexp-recommend's
    lookup alike (both read the run's outputs_dir tag)."""
    same_second = SAME_SECOND.format(root=tmp_path)
    common = [*tiny_overrides(tmp_path / "data", tmp_path / "mlflow.db"), "train.epochs=1",
              same_second]
    runs = {}
    for model, extra in (("pop", []), ("gru", ["model.hidden_size=8"])):
        code, out = run_seqexp([f"model={model}", *extra, *common])
        assert code == 0, out
        runs[model] = FINISHED.search(out).group(1)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    folders = {m: Path(client.get_run(r).data.tags["outputs_dir"]) for m, r in runs.items()}
    assert folders["pop"] != folders["gru"]
    assert folders["pop"].parent == folders["gru"].parent == tmp_path / "outputs/2026-01-01"
    for model, run_id in runs.items():
        assert run_folder.owner(folders[model]) == run_id
        loaded = seqexp.load(run_id, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert loaded.config.model.name == model


def test_a_folder_another_run_holds_is_refused_before_any_run_is_made(tmp_path):
    common = ["model=pop", *tiny_overrides(tmp_path / "data", tmp_path / "mlflow.db"),
              f"hydra.run.dir={tmp_path / 'fixed'}"]
    code, out = run_seqexp(common)
    assert code == 0, out
    first = FINISHED.search(out).group(1)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "fixed").rglob("*") if p.is_file()
              and ".hydra" not in p.parts and p.name != "cli.log"}
    code, out = run_seqexp([*common, "seed=7"])
    assert code == 2
    error = [line for line in out.splitlines() if line.startswith("seqexp: error:")]
    assert error == [f"seqexp: error: {tmp_path / 'fixed'} holds the outputs of run {first} "
                     f"already; every run needs a folder of its own: drop hydra.run.dir= "
                     f"(hydra.sweep.dir= for a multirun), so that each run gets a new one, or "
                     f"set it to a new folder"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "seqexp"]
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [first]
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_resume_refuses_a_folder_that_holds_another_runs_files(tmp_path):
    data, db = tmp_path / "data", tmp_path / "mlflow.db"
    cfg = compose_config([*gru_overrides(data, db, 1), "train.epochs=1"])
    result = run_experiment(cfg, launch_dir=tmp_path, output_dir=tmp_path / "run")
    client = MlflowClient(f"sqlite:///{db}")
    client.set_terminated(result.run_id, "KILLED")
    run_folder.record_owner(tmp_path / "run", "0123456789abcdef")  # as if another run's now
    cfg = compose_config([*gru_overrides(data, db, 1), "train.epochs=1",
                          f"resume={result.run_id}"])
    with pytest.raises(SeqexpError, match="holds run 0123456789abcdef's files now"):
        run_experiment(cfg, launch_dir=tmp_path, output_dir=tmp_path / "other")
    # seqexp.load leaves that folder's checkpoint alone too: it reads the run's logged one
    (tmp_path / "run" / "checkpoints" / "best.pt").write_bytes(b"another run's file")
    loaded = seqexp.load(result.run_id, tracking_uri=f"sqlite:///{db}")
    assert int(loaded.config.seed) == 1


def _start_held(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, **{HOLD_ENV: "1"}, PYTHONPATH=HOOKED_PATH, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "seqexp.apps.cli", *argv], cwd=cwd, env=env,
                            stderr=subprocess.PIPE, text=True)


def _wait_held(process: subprocess.Popen) -> None:
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("seqexp-test: holding after epoch 1"):
            return
    process.wait()
    raise AssertionError("the run never reached the hold point:\n" + "".join(lines[-30:]))


@pytest.mark.slow  # three seqexp processes at once, then three resumes and three baselines
def test_three_runs_started_at_once_each_resume_from_their_own_state(tmp_path):
    """Three runs started together, in the same second, each killed after its first epoch: each
    has its own folder and last.pt, each resumes from its own and ends as its seed's
    uninterrupted run, and each run id loads its own model."""
    data, db = tmp_path / "data", tmp_path / "mlflow.db"
    shutil.copytree(_warm_cache(tmp_path), data)
    seeds = (1, 2, 3)
    processes = [_start_held([*gru_overrides(data, db, s), SAME_SECOND.format(root=tmp_path)],
                             tmp_path) for s in seeds]
    for process in processes:
        _wait_held(process)
    for process in processes:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    client = MlflowClient(f"sqlite:///{db}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "seqexp"]
    runs = {int(r.data.params["seed"]): r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == list(seeds)
    folders = {s: Path(r.data.tags["outputs_dir"]) for s, r in runs.items()}
    assert len(set(folders.values())) == 3
    for seed, run in runs.items():
        assert run_folder.owner(folders[seed]) == run.info.run_id
        state = read_checkpoint(folders[seed] / "checkpoints" / "last.pt")
        assert state["epoch"] == 1
    for seed, run in runs.items():
        baseline = run_experiment(compose_config(gru_overrides(data, tmp_path / "b.db", seed)),
                                  launch_dir=tmp_path, output_dir=tmp_path / f"baseline-{seed}")
        resumed = run_experiment(
            compose_config([*gru_overrides(data, db, seed), f"resume={run.info.run_id}"]),
            launch_dir=tmp_path, output_dir=tmp_path / f"elsewhere-{seed}")
        assert resumed.run_id == run.info.run_id
        assert resumed.output_dir == folders[seed]
        assert resumed.metrics == baseline.metrics
        loaded = seqexp.load(run.info.run_id, tracking_uri=f"sqlite:///{db}")
        assert int(loaded.config.seed) == seed


def _warm_cache(tmp_path: Path) -> Path:
    """The synthetic data generated once, so that the three processes do not race to make it."""
    data = tmp_path / "warm"
    cfg = compose_config(gru_overrides(data, tmp_path / "warm.db", 1))
    load_dataset(cfg.dataset, cfg.split, Path(cfg.paths.raw_dir), Path(cfg.paths.cache_dir),
                 progress=False)
    return data
