"""MLflow's own system metrics (CPU, memory, disk, network; GPU when NVML is there) for a training run.

MLflow's ``SystemMetricsMonitor`` samples in a background thread and logs ``system/...`` metrics (the run's
System metrics tab). One monitor per machine: rank 0's, plus on a multi-node run one on each other node's
local rank 0 with ``node_id`` ``node_<n>`` (then the metrics read ``system/node_<n>/...``). A sample every
``SAMPLING_INTERVAL_S`` costs nothing measurable on the training step
(``experiments/benchmarks/system_metrics_bench.py``). MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
overrides the interval; ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns the monitor off.
"""

from __future__ import annotations

import contextlib
import logging

from q2l.progress import get_logger
from q2l.tracking.store import sqlite_file

SAMPLING_INTERVAL_S = 10.0
log = get_logger()


def disabled() -> bool:
    """True when ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` is set to false."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    return MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.is_set() and not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get()


def start(run_id: str, tracking_uri: str, node_id: str | None = None):
    """Start a monitor logging into ``run_id`` (continuing its steps on a resumed run); None when disabled.

    A machine without ``psutil`` gets a warning, not an error: the run matters more than its system chart.
    """
    if disabled():
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as e:  # psutil missing
        log.warning(f"no system metrics for MLflow run {run_id}: {e} (pip install psutil)")
        return None
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop lines are INFO
    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=SAMPLING_INTERVAL_S,
        resume_logging=True,
        node_id=node_id,
        tracking_uri=tracking_uri,
    )
    # MLflow's log_model links every run metric at its ``step`` (0 for the packaged model) to the model, so
    # system samples start at step 1: they stay the run's, not the packaged model's
    monitor._logging_step = max(monitor._logging_step, 1)
    monitor.start()
    return monitor


def stop(monitor) -> None:
    """Stop ``monitor`` (None allowed) and flush its samples; never raises (the run's end matters more)."""
    if monitor is None:
        return
    with contextlib.suppress(Exception):  # a lost last sample is not worth failing the run
        monitor.finish()


def shared_store(uri: str) -> bool:
    """True when every node of a cluster reaches store ``uri`` (a SQLite or file store is one machine's)."""
    return sqlite_file(uri) is None and not uri.startswith(("file:", "/"))
