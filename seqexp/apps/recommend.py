"""Recommendations from a run's model, without the original data: `seqexp.load` and
`seqexp-recommend`.

Every source comes down to one best checkpoint, read by one function
(seqexp.run.recommender.from_checkpoint, which the run's MLflow Model calls too): an MLflow
Model (runs:/<id>/model, models:/<name>/<version>, or its folder here), whose checkpoint
artifact is found through its MLmodel file without running its code; an MLflow run id (its
outputs folder when it is on this machine, else its logged model, else its logged
checkpoints/best.pt); a run's outputs folder; a checkpoint file. Loading never runs code from
a file (seqexp.core.checkpoint, seqexp.core.safe_config, docs/long-runs.md).

    model = seqexp.load("<run id, runs:/ or models:/ URI, folder or checkpoint>")
    model.recommend(user="42", k=20)            # after the user's last training event
    model.recommend(items=["a", "b"], k=20)      # after this sequence of items

`seqexp-recommend RUN --user U [--k 20]` or `--items a,b,c` prints the ranked table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from seqexp.core import run_folder
from seqexp.core.errors import SeqexpError
from seqexp.run.mlflow_model import MODEL_NAME, model_checkpoint
from seqexp.run.recommender import Recommendations, from_checkpoint
from seqexp.run.resume import OUTPUTS_TAG
from seqexp.run.tracking import (
    Tracker,
    default_tracking_uri,
    mlflow_store,
    sqlite_path,
    with_lock_retry,
)

__all__ = ["Recommendations", "load", "main"]

MODEL_URI_SCHEMES = ("runs:/", "models:/")


def load(source: str | Path, tracking_uri: str | None = None,
         device: str = "cpu") -> Recommendations:
    """The model of `source` (an MLflow run id, a runs:/ or models:/ URI, an MLflow Model
    folder, a run's outputs folder or a checkpoint file), ready to recommend.

    Whatever MLflow downloads goes to a seqexp-* temporary folder, removed before returning."""
    where_to = _device(device)
    with tempfile.TemporaryDirectory(prefix="seqexp-") as scratch:
        local, where = checkpoint_path(source, tracking_uri, Path(scratch))
        return from_checkpoint(local, where, where_to)


def checkpoint_path(source: str | Path, tracking_uri: str | None, scratch: Path
                    ) -> tuple[Path, Path | str]:
    """The best checkpoint of `source` (downloaded into `scratch` if need be), with the name
    errors give it."""
    text = str(source)
    if text.startswith(MODEL_URI_SCHEMES):
        folder = _download(text, None, _store(text, tracking_uri), scratch)
        if folder is None:
            raise SeqexpError(f"{text}: no such MLflow Model in {_store(text, tracking_uri)} "
                              f"(pass --tracking-uri for another store)")
        return model_checkpoint(folder, text), f"{text} (its checkpoint)"
    path = Path(source)
    if path.is_file():
        return path, path
    if path.is_dir():
        if (path / "MLmodel").is_file():
            checkpoint = model_checkpoint(path, path)
            return checkpoint, checkpoint
        for candidate in (path / "checkpoints" / "best.pt", path / "best.pt"):
            if candidate.is_file():
                return candidate, candidate
        raise SeqexpError(f"{path}: no checkpoints/best.pt and no MLmodel in this folder")
    return _run_checkpoint(text, _store(text, tracking_uri), scratch)


def _store(source: str, tracking_uri: str | None) -> str:
    """The MLflow store to look `source` up in: `tracking_uri`, else mlflow.db here."""
    uri = tracking_uri or default_tracking_uri(Path.cwd())
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise SeqexpError(f"{source}: neither a checkpoint file, a folder nor a run id or model "
                          f"URI of a store here (there is no MLflow store {database}; pass "
                          f"--tracking-uri)")
    return uri


def _download(uri: str, artifact: str | None, tracking_uri: str, scratch: Path) -> Path | None:
    """MLflow's download of `uri` (with `artifact`: that artifact of run `uri`) into a new
    folder in `scratch`; None when there is no such thing."""
    import mlflow.artifacts

    target = Path(tempfile.mkdtemp(dir=scratch))
    try:
        with mlflow_store(tracking_uri):
            local = with_lock_retry(mlflow.artifacts.download_artifacts,
                                    artifact_uri=None if artifact else uri,
                                    run_id=uri if artifact else None, artifact_path=artifact,
                                    dst_path=str(target), tracking_uri=tracking_uri,
                                    registry_uri=tracking_uri)
    except Exception:  # MLflow's "not found" differs between stores
        return None
    return Path(local)


def _run_checkpoint(run_id: str, uri: str, scratch: Path) -> tuple[Path, str]:
    """The best checkpoint of MLflow run `run_id`: in its outputs folder when that is here, else
    in its logged model, else its logged checkpoints/best.pt."""
    tracker = Tracker(uri, None)
    try:
        run = with_lock_retry(tracker.client.get_run, run_id)
    except Exception:  # MLflow's "not found" differs between stores
        raise SeqexpError(f"{run_id}: neither a checkpoint file, a folder nor a run id or model "
                          f"URI in {uri} (pass --tracking-uri for another store)") from None
    folder = run.data.tags.get(OUTPUTS_TAG)
    if (folder and (Path(folder) / "checkpoints" / "best.pt").is_file()
            and run_folder.belongs_to(Path(folder), run.info.run_id)):
        local = Path(folder) / "checkpoints" / "best.pt"
        return local, local
    model_uri = f"runs:/{run.info.run_id}/{MODEL_NAME}"
    model = _download(model_uri, None, uri, scratch)
    if model is not None and (model / "MLmodel").is_file():
        return model_checkpoint(model, model_uri), f"{model_uri} (its checkpoint)"
    checkpoint = _download(run.info.run_id, "checkpoints/best.pt", uri, scratch)
    if checkpoint is None:
        raise SeqexpError(f"run {run_id} has no best checkpoint here or in its artifacts, and "
                          f"no MLflow Model (mlflow.log_model=false and "
                          f"mlflow.log_checkpoint=false?)")
    return checkpoint, f"run {run_id}'s artifact checkpoints/best.pt"


def _device(name: str) -> torch.device:
    """The device to load onto, or one line saying it cannot be used here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SeqexpError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N"
                          ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SeqexpError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SeqexpError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s); use cuda:0 or cpu")
    elif device.type != "cpu":
        raise SeqexpError(f"--device {name!r}: seqexp-recommend runs on cpu or cuda; use one "
                          f"of those")
    return device


def main(argv: Sequence[str] | None = None) -> None:
    """seqexp-recommend RUN (--user U | --items a,b,c) [--k 20] [--exclude-seen]"""
    parser = argparse.ArgumentParser(
        prog="seqexp-recommend",
        description="Top-k items of a seqexp run's model for a user or an item sequence.")
    parser.add_argument("run", help="MLflow run id, runs:/ or models:/ URI, MLflow Model "
                        "folder, run outputs folder or checkpoint file")
    parser.add_argument("--user", help="raw user id: after the user's training events")
    parser.add_argument("--items", help="raw item ids, comma-separated, oldest first")
    parser.add_argument("--k", type=int, default=20, help="how many items (default 20)")
    parser.add_argument("--exclude-seen", action="store_true",
                        help="leave out the items of the context")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store of the run (default: sqlite mlflow.db here)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    # MLflow's download bar would come before the one line of an error.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        if args.user is None and args.items is None:
            raise SeqexpError("pass --user U, --items a,b,c or both")
        items = None if args.items is None else [i for i in args.items.split(",") if i]
        model = load(args.run, args.tracking_uri, args.device)
        table = model.recommend(user=args.user, items=items, k=args.k,
                                exclude_seen=args.exclude_seen)
    except SeqexpError as exc:
        print(f"seqexp-recommend: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.5f}"))


if __name__ == "__main__":
    main()
