"""A run's model as an MLflow Model: `mlflow.pyfunc` from code, the best checkpoint as its one
artifact.

The model folder holds MLmodel, the code file seqexp/run/mlflow_model_code.py (MLflow's
"models from code": MLflow runs it to get the PythonModel, nothing is cloudpickled), the
signature and input example, requirements, and artifacts/best.pt: the best checkpoint in
seqexp's own format (seqexp.core.checkpoint: tensors and plain values, read with
torch.load(weights_only=True); the model built through seqexp.core.safe_config's allowlist).

`seqexp.load` reads such a folder without running its code file: it finds the checkpoint
through MLmodel (YAML, plain values) and rebuilds the model with seqexp.run.recommender, the
same function the PythonModel's load_context calls.

MLflow is imported inside the functions: importing seqexp.run.experiment must stay quick.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import numpy as np
import torch
import yaml

from seqexp.core.errors import SeqexpError, message_line
from seqexp.core.version import __version__
from seqexp.run.recommender import Recommendations
from seqexp.run.tracking import mlflow_store, with_lock_retry

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.models import ModelSignature

    from seqexp.run.tracking import Tracker

log = logging.getLogger(__name__)

# The logged model's name: the run's model is runs:/<run id>/model.
MODEL_NAME = "model"
# The key of the checkpoint among the pyfunc model's artifacts (MLmodel, python_function flavor).
CHECKPOINT_ARTIFACT = "checkpoint"
MODEL_CODE = Path(__file__).with_name("mlflow_model_code.py")
INPUT_COLUMNS = ("user", "k", "items", "exclude_seen")
OUTPUT_COLUMNS = ("request", "rank", "item", "score")


def signature() -> ModelSignature:
    """One request per row: `user` (raw id), `k`, `items` (raw item ids, oldest first) and
    `exclude_seen`, each but k optional; one answer row per recommended item: the request's row
    number, rank, raw item id, score."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    # `items` is Any, not Array(string): a request whose rows do not all give items reaches
    # the model with NaN in the others, which MLflow's check of an array column refuses. `k`
    # and `exclude_seen` are Any too, checked by predict_frame: MLflow's server casts a long
    # column's 2.5 to 2 and a boolean column's "yes" to true, answering what nobody asked.
    inputs = Schema([
        ColSpec(DataType.string, "user", required=False),
        ColSpec(AnyType(), "k"),
        ColSpec(AnyType(), "items", required=False),
        ColSpec(AnyType(), "exclude_seen", required=False),
    ])
    outputs = Schema([ColSpec(DataType.long, "request"), ColSpec(DataType.long, "rank"),
                      ColSpec(DataType.string, "item"), ColSpec(DataType.double, "score")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


def predict_frame(model: Recommendations, requests: pd.DataFrame) -> pd.DataFrame:
    """The answer to each request row (columns of `signature`), as `Recommendations.recommend`
    gives it, stacked with the request's row number."""
    import pandas as pd

    unknown = sorted(set(requests.columns) - set(INPUT_COLUMNS))
    if unknown or "k" not in requests.columns:
        raise SeqexpError(f"a request has the columns user, k (required), items, exclude_seen; "
                          f"got {', '.join(map(str, requests.columns))}")
    answers = []
    for number, row in enumerate(requests.to_dict("records")):
        user, items = row.get("user"), row.get("items")
        exclude_seen = row.get("exclude_seen")
        if not _missing(items) and not isinstance(items, (list, tuple, np.ndarray)):
            raise SeqexpError(f"request {number}: items={items!r} is not a list of raw item "
                              f"ids (oldest first)")
        table = model.recommend(
            user=None if _missing(user) else str(user),
            items=None if _missing(items) else [str(i) for i in np.asarray(items).tolist()],
            k=_whole_k(row["k"], number),
            exclude_seen=False if _missing(exclude_seen) else _flag(exclude_seen, number))
        answers.append(table.assign(request=number))
    if not answers:
        return pd.DataFrame({c: [] for c in OUTPUT_COLUMNS})
    return pd.concat(answers, ignore_index=True)[list(OUTPUT_COLUMNS)]


def _whole_k(value: Any, number: int) -> int:
    """A request's k as the whole number it must be (2.5, "3" or True are refused, not cut)."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number))
            or not math.isfinite(value) or value != int(value)):
        raise SeqexpError(f"request {number}: k={value!r} is not a whole number of items")
    return int(value)


def _flag(value: Any, number: int) -> bool:
    """A request's exclude_seen as the true or false it must be ("yes" or 1 are refused)."""
    if not isinstance(value, (bool, np.bool_)):
        raise SeqexpError(f"request {number}: exclude_seen={value!r} is not true or false")
    return bool(value)


def pip_requirements() -> list[str]:
    """What serving the model needs, given explicitly: MLflow's inference of requirements
    would load the model and watch its imports, seconds on every run."""
    import mlflow

    return [f"seqexp=={__version__}", f"mlflow=={mlflow.__version__}",
            f"torch=={torch.__version__.split('+')[0]}"]


@contextlib.contextmanager
def _logging_to(uri: str) -> Iterator[None]:
    """The run's store as MLflow's global one (Model.log and the registry use that), no
    download bar and no INFO line from the check of the input example: a run's log stays its
    own."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    quiet = logging.getLogger("mlflow.pyfunc")
    level, bar = quiet.level, os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    quiet.setLevel(logging.WARNING)
    os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"
    try:
        with mlflow_store(uri):
            yield
    finally:
        quiet.setLevel(level)
        if bar is None:
            os.environ.pop(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, None)
        else:
            os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = bar


def log_model(tracker: Tracker, checkpoint: Path, example_user: str,
              registered_name: str | None = None) -> str:
    """Log `checkpoint` (a best checkpoint) as the run's MLflow Model `model` (a LoggedModel
    linked to the run: the UI's Models column), registered as `registered_name` when given;
    returns its models:/ URI. The input example asks for 10 items for `example_user`."""
    import pandas as pd
    from mlflow import pyfunc
    from mlflow.models import Model

    example = pd.DataFrame({"user": [example_user], "k": [10]})
    started = time.perf_counter()
    try:
        with _logging_to(tracker.tracking_uri):
            # Made here, in the run's experiment: Model.log would put it in MLflow's
            # current experiment (the Default one), where runs:/<id>/model does not look.
            experiment_id = (tracker.experiment_id or tracker.client.get_run(
                tracker.run_id).info.experiment_id)
            logged = with_lock_retry(tracker.client.create_logged_model, experiment_id,
                                     name=MODEL_NAME, source_run_id=tracker.run_id)
            # Retried as a whole when parallel jobs hold the SQLite store: each step of
            # Model.log writes the same model again.
            info = with_lock_retry(
                Model.log, None, name=MODEL_NAME, flavor=pyfunc, run_id=tracker.run_id,
                model_id=logged.model_id,
                python_model=str(MODEL_CODE),
                artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
                signature=signature(), input_example=example,
                pip_requirements=pip_requirements(),
                registered_model_name=registered_name)
    except SeqexpError:
        raise
    except Exception as exc:  # any store or MLflow failure: one line
        raise SeqexpError(f"mlflow.log_model: cannot log the run's MLflow Model "
                          f"({message_line(exc)}); mlflow.log_model=false skips it") from None
    log.info("MLflow Model %s logged in %.2f s", info.model_uri, time.perf_counter() - started)
    return info.model_uri


def link_to_model(tracker: Tracker, model_uri: str, checkpoint: Path) -> bool:
    """Make the run's `checkpoint` a link to the copy its MLflow Model holds, where the model's
    artifacts are files on this machine, so that the best weights are stored once; True when
    it is one now. Elsewhere (a tracking server's store) the outputs folder keeps its copy."""
    model_id = model_uri.rstrip("/").rsplit("/", 1)[-1]
    try:
        location = with_lock_retry(tracker.client.get_logged_model, model_id).artifact_location
    except Exception:
        return False
    parsed = urlsplit(location)
    if parsed.scheme not in ("", "file"):
        return False
    folder = Path(url2pathname(parsed.path))
    try:
        target = model_checkpoint(folder, model_uri).resolve()
    except SeqexpError:
        return False
    if not target.is_file() or target.stat().st_size != checkpoint.stat().st_size:
        return False
    link = checkpoint.with_name(f".{checkpoint.name}.link")
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    os.replace(link, checkpoint)
    return True


def model_checkpoint(folder: Path, where: object) -> Path:
    """The best checkpoint inside the MLflow Model `folder` (its MLmodel's python_function
    artifact `checkpoint`), or one line saying why this is not a seqexp MLflow Model. MLmodel
    is read as YAML of plain values; the model's code file is never run."""
    try:
        spec = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SeqexpError(f"{where}: cannot read its MLmodel ({message_line(exc)})") from None
    try:
        relative = spec["flavors"]["python_function"]["artifacts"][CHECKPOINT_ARTIFACT]["path"]
    except (KeyError, TypeError):
        relative = None
    if not isinstance(relative, str):
        raise SeqexpError(f"{where}: not a seqexp MLflow Model (its MLmodel names no "
                          f"{CHECKPOINT_ARTIFACT!r} artifact); log it with a seqexp run")
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        raise SeqexpError(f"{where}: its {CHECKPOINT_ARTIFACT} artifact {relative!r} is not a "
                          f"file inside the model folder; refused")
    return path
