"""MLflow tracking: runs (`mlflow_run`), the logged model (`mlflow_model`), plots."""

MLFLOW_QUIET = {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
"""MLflow's own output that the command line and a sweep's trials keep to: warnings only, no
artifact progress bars. Read when mlflow is imported; a value already in the environment wins."""
