"""The MLflow tags by which seqexp's sweeps, their jobs and the report find each other. No
imports: seqexp-report reads them without loading Hydra (seqexp.run.sweep does)."""

# Tags of the parent run; children carry SWEEP_ID_TAG, SWEEP_JOB_TAG and mlflow.parentRunId.
SWEEP_ID_TAG = "sweep_id"
SWEEP_JOB_TAG = "sweep_job"
ROLE_TAG = "seqexp.role"
PARENT_ROLE = "sweep"
PARENT_TAG = "mlflow.parentRunId"
ERROR_TAG = "error"
# The run's config keys (flattened, comma-separated) that cannot change its results, from the
# schema with the model's own marks: the report, which loads no model class, reads them.
RESULTS_FREE_TAG = "seqexp.results_free_keys"
