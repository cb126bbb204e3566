"""MLflow: run names, params, metrics, tags and artifacts. Nothing else imports mlflow."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

from seqexp.errors import SeqexpError

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000
# Overrides that change where a run is tracked, not what it computes, stay out of its name.
_NAME_EXCLUDED_PREFIXES = ("model=", "dataset=", "mlflow.", "hydra.", "paths.")


def default_tracking_uri(launch_dir: Path) -> str:
    return f"sqlite:///{(Path(launch_dir) / 'mlflow.db').resolve()}"


def run_name(model: str, dataset: str, overrides: Sequence[str] = ()) -> str:
    """Deterministic: `model-dataset` plus the remaining command-line overrides, sorted."""
    extra = sorted(o.lstrip("+~") for o in overrides
                   if not o.lstrip("+~").startswith(_NAME_EXCLUDED_PREFIXES))
    return "-".join([model, dataset]) + (f"-{','.join(extra)}" if extra else "")


def flatten(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.001}} -> {"train.lr": "0.001"}; lists become their repr."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def git_sha(*folders: Path) -> str:
    for folder in folders:
        try:
            out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"],
                                 capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Tracker:
    """One MLflow run, driven through MlflowClient (no global active-run state)."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        import mlflow  # noqa: F401 - imported lazily: it takes seconds
        from mlflow.tracking import MlflowClient

        if tracking_uri.startswith("sqlite:///"):
            Path(urlparse(tracking_uri).path).parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        try:
            self.experiment_id = self._experiment_id(experiment)
        except Exception as exc:  # noqa: BLE001 - any store failure becomes one clear line
            raise SeqexpError(
                f"mlflow.tracking_uri={tracking_uri}: cannot open the tracking store "
                f"({str(exc).splitlines()[0]})"
            ) from None
        self.run_id: str | None = None

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:///"):
            # Artifacts next to the database, whatever the working directory.
            db = Path(urlparse(self.tracking_uri).path)
            location = (db.parent / "mlartifacts" / name).as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - created meanwhile by a parallel run
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start(self, name: str, tags: Mapping[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=dict(tags))
        self.run_id = run.info.run_id
        log.info("MLflow run %s (%s) in %s", name, self.run_id, self.tracking_uri)
        return self.run_id

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for chunk in _chunks(items, 100):
            self.client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        for chunk in _chunks(items, 500):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
