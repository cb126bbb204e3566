"""seqexp: a Hydra + MLflow experiment CLI for sequential recommenders."""

__version__ = "0.2.0"
