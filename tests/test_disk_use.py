"""A finished run keeps what it needs and no more: no training state once it has finished
(unless train.keep_last=true), and its best weights stored once, inside its MLflow Model."""

from __future__ import annotations

import re
from pathlib import Path

from mlflow.tracking import MlflowClient

import seqexp
from helpers import run_seqexp, tiny_overrides


def _finished_run(tmp_path: Path, *extra: str) -> tuple[MlflowClient, str, Path]:
    code, out = run_seqexp(["model=gru", "model.hidden_size=8", "train.epochs=1",
                            *tiny_overrides(tmp_path / "data", tmp_path / "mlflow.db",
                                            log_model=True),
                            f"hydra.run.dir={tmp_path / 'run'}", *extra])
    assert code == 0, out
    run_id = re.search(r"seqexp: run (\w+) finished", out).group(1)
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), run_id, tmp_path / "run"


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


def test_a_finished_run_keeps_its_best_weights_once_and_no_training_state(tmp_path):
    client, run_id, outputs = _finished_run(tmp_path)
    checkpoints = outputs / "checkpoints"
    assert not (checkpoints / "last.pt").exists()
    best = checkpoints / "best.pt"
    assert best.is_symlink()
    models = tmp_path / "mlartifacts"
    assert best.resolve().is_relative_to(models) and "models" in best.resolve().parts
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == []
    copies = [p for p in _files(tmp_path) if p.name == "best.pt"]
    assert copies == [best.resolve()]
    loaded = seqexp.load(run_id, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert loaded.config.model.name == "gru"


def test_keep_last_keeps_the_training_state(tmp_path):
    _, _, outputs = _finished_run(tmp_path, "train.keep_last=true")
    assert (outputs / "checkpoints" / "last.pt").is_file()


def test_without_a_model_the_checkpoint_is_the_runs_artifact(tmp_path):
    client, run_id, outputs = _finished_run(tmp_path, "mlflow.log_model=false")
    assert (outputs / "checkpoints" / "best.pt").is_file()
    assert not (outputs / "checkpoints" / "best.pt").is_symlink()
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == [
        "checkpoints/best.pt"]
