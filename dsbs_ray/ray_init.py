"""Ray start-up, shared by training, the teacher and the sweep driver."""

from __future__ import annotations

import logging
import os

# Ray's libraries log progress and resource requests at INFO every few seconds; they keep logging to
# the session's log folder (/tmp/ray/session_*/logs), and only their warnings reach the terminal
RAY_LIBRARY_LOGGERS = ("ray.data", "ray.train", "ray.tune", "ray.util")


def init_ray() -> str | None:
    """Join the cluster in RAY_ADDRESS (e.g. under `ray job submit`), else start a local Ray. Returns
    the dashboard's address (None where there is none).

    Passes no runtime env: a submitted job's own runtime env applies as the user wrote it (Ray refuses
    to merge a key set in both), and whatever a worker needs (its device, DeepSpeed's accelerator,
    tokenizer threads) the worker sets itself, on its own node.

    A local Ray starts with its dashboard on 127.0.0.1 only (DSBS_RAY_DASHBOARD=0: without it, ~2 s
    sooner). Ray Train's placement-group cleaner asks the state API behind it whether a run's
    controller lives; without it, it logged a warning every second for the whole run."""
    import ray

    if ray.is_initialized():
        return _DASHBOARD.get("url")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # a Ray Train worker's print() once, not twice (Train's print patch logs it and echoes it too), and
    # not its "Reporting training result ..." line at every report (Train's worker logging setup)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING", "0")
    quiet = ray.LoggingConfig(log_level="WARNING")  # workers' and actors' Python logging
    address = os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, logging_config=quiet)
    else:  # this box only: no node of it is preempted (Ray Train's watcher for that logged an error a run)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        context = ray.init(address="local", include_dashboard=os.environ.get("DSBS_RAY_DASHBOARD", "1") != "0",
                           dashboard_host="127.0.0.1", object_store_memory=300 * 2**20, log_to_driver=True,
                           logging_config=quiet)
    for name in RAY_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    url = getattr(context, "dashboard_url", None)
    _DASHBOARD["url"] = (url if "://" in url else f"http://{url}") if url else None
    return _DASHBOARD["url"]


_DASHBOARD: dict = {}  # the address of the dashboard of the Ray this process started or joined
