"""MLflow naming and logging: one place that knows where runs go and how they are named.

Default store: an SQLite file in the working directory (MLflow 3.17 refuses plain file stores);
MLFLOW_TRACKING_URI or an explicit URI wins.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def log_run(experiment: str, run_name: str, params: dict, metrics: dict, artifacts: list[Path] = (),
            tags: dict | None = None, uri: str | None = None) -> str:
    """One finished MLflow run with its params, metrics and artifact files; returns the run id."""
    import logging

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)  # SQLite schema migrations are noisy
    mlflow.set_tracking_uri(tracking_uri(uri))
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params({k: v for k, v in params.items() if v is not None})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        for path in artifacts:
            if Path(path).exists():
                mlflow.log_artifact(str(path))
    return run.info.run_id
