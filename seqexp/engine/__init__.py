"""The engine: the one training loop (trainer), the one evaluator, its rank-counting kernel and
its metrics. Knows models only through seqexp.models.base; knows nothing of Hydra or MLflow."""
