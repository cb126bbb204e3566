"""seqexp: a Hydra + MLflow experiment CLI for sequential recommenders."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from seqexp.apps.recommend import Recommendations

__version__ = "0.2.0"


def load(source: str | Path, tracking_uri: str | None = None,
         device: str = "cpu") -> Recommendations:
    """The model of a run (MLflow run id, outputs folder or checkpoint file), ready to
    recommend: `seqexp.load(run_id).recommend(user="42", k=20)` (seqexp.apps.recommend)."""
    from seqexp.apps.recommend import load as load_run  # torch and MLflow only when used

    return load_run(source, tracking_uri, device)
