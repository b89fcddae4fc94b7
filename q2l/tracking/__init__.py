"""The MLflow layer: where runs are recorded (``store``: the only place that builds clients and sets the
tracking URI) and what a training run records (``run_record``)."""

from q2l.tracking.store import (
    PARAM_MAX_CHARS,
    TrackingUnavailableError,
    activate,
    artifact_location,
    check_reachable,
    client,
    ensure_experiment,
    flat_params,
    git_commit,
    require_store,
    results_dir,
    sqlite_file,
    tracking_uri,
    ui_command,
    version_tags,
)

__all__ = [
    "PARAM_MAX_CHARS",
    "TrackingUnavailableError",
    "activate",
    "artifact_location",
    "check_reachable",
    "client",
    "ensure_experiment",
    "flat_params",
    "git_commit",
    "require_store",
    "results_dir",
    "sqlite_file",
    "tracking_uri",
    "ui_command",
    "version_tags",
]
