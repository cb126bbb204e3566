"""One run and its bookkeeping: the experiment wiring (data -> model -> train -> evaluate ->
track), MLflow tracking, resume, sweeps, the run's artifacts and the check of every option."""
