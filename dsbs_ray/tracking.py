"""MLflow naming and logging: one place that knows where runs go and how they are named.

Default store: an SQLite file in the working directory (MLflow 3.17 refuses plain file stores);
MLFLOW_TRACKING_URI or an explicit URI wins. Sweeps log one parent run per sweep (tag dsbs.role=sweep)
and one child run per trial (dsbs.role=trial, dsbs.trial=<run name>); reruns find and reuse them, so
a resumed sweep never makes a second run for the same trial.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from dsbs_ray.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(uri: str | None = None) -> str:
    """The URI to use, with a relative SQLite path made absolute (Ray workers run in other directories)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when the store cannot be used (MLflow itself retries for minutes)."""
    if uri.startswith(("http://", "https://")):
        try:  # urlopen raises on any non-2xx answer (HTTPError is a URLError)
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"tracking_uri: cannot reach the MLflow server at {uri} ({reason})") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).parent
        if not parent.is_dir():
            raise UserError(f"tracking_uri: directory {parent} of the SQLite store does not exist")
    elif uri.startswith("file:") or "://" not in uri:
        raise UserError(f"tracking_uri: {uri} is a file store, which MLflow 3 refuses; use sqlite:///PATH")


def client(uri: str):
    from mlflow import MlflowClient

    for noisy in ("alembic", "mlflow.store.db.utils"):  # SQLite schema creation/migration chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str) -> str:
    """The experiment's id, created if missing (another process may create it at the same moment)."""
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except Exception:
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(mlflow_client, exp_id: str, tags: dict):
    """The latest run whose tags match `tags`, or None."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = mlflow_client.search_runs([exp_id], filter_string=query, max_results=1,
                                      order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def find_or_start_run(mlflow_client, exp_id: str, run_name: str, tags: dict) -> str:
    """The run whose tags match `tags` (reopened), or a new one: a rerun never duplicates a run."""
    run = find_run(mlflow_client, exp_id, tags)
    if run is None:
        return mlflow_client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    if run.info.status != "RUNNING":
        mlflow_client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def log_params(mlflow_client, run_id: str, params: dict) -> None:
    """Params, skipping ones already logged with the same value (MLflow refuses to change a param)."""
    from mlflow.entities import Param

    have = mlflow_client.get_run(run_id).data.params
    new = [Param(k, str(v)) for k, v in params.items() if v is not None and have.get(k) != str(v)[:6000]]
    if new:
        mlflow_client.log_batch(run_id, params=new)


def set_tags(mlflow_client, run_id: str, tags: dict) -> None:
    """Tags (mutable, unlike params); None values are skipped."""
    from mlflow.entities import RunTag

    batch = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
    if batch:
        mlflow_client.log_batch(run_id, tags=batch)


_LOGGED_STEPS: dict[tuple[str, str], set[int]] = {}  # (run id, metric) -> steps in its history


def log_metrics(mlflow_client, run_id: str, metrics: dict, step: int = 0) -> None:
    """Numeric metrics at `step`, skipping a (metric, step) the run's history already holds: a trial
    killed after logging a step and rerun into the same run logs that step once, not twice."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = []
    for k, v in metrics.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        steps = _LOGGED_STEPS.get((run_id, k))
        if steps is None:
            steps = _LOGGED_STEPS[(run_id, k)] = {m.step for m in mlflow_client.get_metric_history(run_id, k)}
        if step not in steps:
            batch.append(Metric(k, float(v), now, step))
    if batch:
        mlflow_client.log_batch(run_id, metrics=batch)
        for m in batch:
            _LOGGED_STEPS[(run_id, m.key)].add(step)


def log_run(experiment: str, run_name: str, params: dict, metrics: dict, artifacts: list[Path] = (),
            tags: dict | None = None, uri: str | None = None) -> str:
    """One finished MLflow run with its params, metrics and artifact files; returns the run id."""
    c = client(tracking_uri(uri))
    run_id = c.create_run(experiment_id(c, experiment), run_name=run_name, tags=tags or {}).info.run_id
    log_params(c, run_id, params)
    log_metrics(c, run_id, metrics)
    for path in artifacts:
        if Path(path).exists():
            c.log_artifact(run_id, str(path))
    c.set_terminated(run_id, "FINISHED")
    return run_id


# ---------------------------------------------------------------------------------------------
# Where the UI lands. MLflow 3.17 opens an experiment in its GenAI view unless the URL says
# workflowType=machine_learning, and nested runs start collapsed with no param or metric column.
# A shared view (the experiment tag mlflow.sharedViewState.<key>, opened by ?viewStateShareKey=<key>)
# carries the columns, the sort and the expanded parent: the link we print opens it.

VIEW_KEY = "dsbs-trials"
TRIAL_COLUMNS = [("params", "task"), ("params", "student_name"), ("params", "student_family"), ("params", "parameters"),
                 ("params", "method"), ("params", "rationale_filter"), ("params", "teacher"), ("params", "fraction"),
                 ("params", "seed"), ("metrics", "test_accuracy"), ("metrics", "cost_usd")]
DEFAULT_UI = "http://127.0.0.1:5000"  # make mlflow-ui


def set_trials_view(mlflow_client, exp_id: str, parent_run_id: str, description: str) -> None:
    """The experiment opens on the trials: model-training kind, a shared view with the columns users
    compare by (sorted by test accuracy, the sweep's parent run expanded), and a description."""
    columns = [f"{kind}.`{name}`" for kind, name in TRIAL_COLUMNS]
    view = {"searchFilter": "", "orderByKey": "metrics.`test_accuracy`", "orderByAsc": False, "startTime": "ALL",
            "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
            "selectedColumns": columns, "columnOrder": columns, "runsExpanded": {parent_run_id: True},
            "runsHiddenMode": "SHOW_ALL", "groupBy": None}
    for key, value in (("mlflow.experimentKind", "custom_model_development"),
                       (f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(view)), ("mlflow.note.content", description)):
        mlflow_client.set_experiment_tag(exp_id, key, value)


def ui_base(uri: str) -> str:
    """The UI that shows this store: the tracking server itself, else what `make mlflow-ui` serves."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI


def experiment_url(base: str, exp_id: str) -> str:
    """The link to open: the experiment's runs, in the model-training view, with the trials view."""
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def run_url(base: str, exp_id: str, run_id: str) -> str:
    """A run's page, in the model-training view (without workflowType it opens in the GenAI one)."""
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning"


def sweep_links(uri: str, base: str | None = None) -> list[tuple[str, str]]:
    """(experiment name, link) for every experiment in the store that has the trials view."""
    c = client(uri)
    return [(e.name, experiment_url(base or ui_base(uri), e.experiment_id)) for e in c.search_experiments()
            if f"mlflow.sharedViewState.{VIEW_KEY}" in e.tags]
