"""seqexp: a Hydra + MLflow experiment CLI for sequential recommenders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from seqexp.core.version import __version__

if TYPE_CHECKING:
    from pathlib import Path

    from seqexp.run.recommender import Recommendations

__all__ = ["__version__", "load"]


def load(source: str | Path, tracking_uri: str | None = None,
         device: str = "cpu") -> Recommendations:
    """The model of a run, ready to recommend: `seqexp.load(source).recommend(user="42", k=20)`.
    `source`: an MLflow run id, a runs:/<id>/model or models:/<name>/<version> URI, an MLflow
    Model folder, a run's outputs folder or a checkpoint file (seqexp.apps.recommend)."""
    # Imported on the first call only, for start-up speed: every `import seqexp.<anything>`
    # runs this file, and must not load torch and MLflow (docs/architecture.md).
    from seqexp.apps.recommend import load as load_run

    return load_run(source, tracking_uri, device)
