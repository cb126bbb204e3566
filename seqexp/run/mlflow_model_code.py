"""The code of a seqexp MLflow Model ("models from code": MLflow runs this file when it loads
the model and takes the PythonModel it hands to set_model). It builds the model only from the
model's checkpoint artifact, with seqexp.run.recommender (docs/tracking.md)."""

from pathlib import Path
from typing import Any

import pandas as pd
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

    def load_context(self, context: Any) -> None:
        self.recommendations = from_checkpoint(Path(context.artifacts[CHECKPOINT_ARTIFACT]))

    # A DataFrame hint: MLflow checks requests against the logged signature, and infers none.
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return predict_frame(self.recommendations, model_input)
        except SeqexpError as exc:  # a bad request: HTTP 400 from `mlflow models serve`
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


set_model(SeqexpModel())
