"""The code of a seqexp MLflow Model ("models from code": MLflow runs this file when it loads
the model and takes the PythonModel it hands to set_model). It builds the model only from the
model's checkpoint artifact, with seqexp.run.recommender (docs/tracking.md)."""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from seqexp.core.errors import SeqexpError
from seqexp.run.mlflow_model import CHECKPOINT_ARTIFACT, predict_frame
from seqexp.run.recommender import Recommendations, from_checkpoint


class SeqexpModel(PythonModel):
    """A seqexp run's model: predict takes requests (user, k, items, exclude_seen) and answers
    raw item ids with their scores (seqexp.run.mlflow_model.signature)."""

    def __init__(self) -> None:
        self.recommendations: Recommendations | None = None

    def load_context(self, context) -> None:  # noqa: ANN001 - MLflow's PythonModelContext
        self.recommendations = from_checkpoint(Path(context.artifacts[CHECKPOINT_ARTIFACT]))

    # No type hints on predict: MLflow would read them as a second signature.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201, ARG002
        try:
            return predict_frame(self.recommendations, model_input)
        except SeqexpError as exc:  # a bad request: HTTP 400 from `mlflow models serve`
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


set_model(SeqexpModel())
