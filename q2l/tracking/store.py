"""Where runs are recorded: the only module that knows the tracking URI, builds MLflow clients and points
MLflow's global state at a store.

The URI is ``mlflow.tracking_uri`` (which the commands fill from ``MLFLOW_TRACKING_URI`` when the config does
not set it), else the embedded default: a SQLite store under the results folder. Artifacts follow the store:
a SQLite store keeps them in ``artifacts/`` beside its database file (so only the embedded default writes
under ``./results``), a tracking server decides for itself. Experiments are created with that explicit
artifact location, because otherwise artifacts land in the current folder of whichever Ray worker logs them
(docs/design.md §7). Read-only commands open a store with ``must_exist=True`` so that they never create one.
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from q2l.config import Config

PARAM_MAX_CHARS = 500
TAG_MAX_CHARS = 5000  # what q2l keeps of a tag value (errors, notes); MLflow allows more, a UI shows less
MAX_BATCH = 100  # MLflow's limit of params (and of tags) per log_batch call
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # MLflow reads it at each download


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be reached or used; the message names the URI."""


def _has_scheme(path: str) -> bool:
    return "://" in path


def results_dir(cfg: Config) -> str:
    """``mlflow.results_dir`` made absolute against the current folder (URIs are returned unchanged)."""
    d = cfg.mlflow.results_dir
    return d if _has_scheme(d) else str(Path(d).expanduser().resolve())


def tracking_uri(cfg: Config) -> str:
    """``mlflow.tracking_uri``, else ``sqlite:///<abs results_dir>/mlflow/mlflow.db``."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    root = results_dir(cfg)
    if _has_scheme(root):
        raise TrackingUnavailableError(
            f"mlflow.results_dir = {root!r} is remote: set mlflow.tracking_uri to an MLflow server for it"
        )
    return f"sqlite:///{root}/mlflow/mlflow.db"


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def artifact_location(cfg: Config) -> str | None:
    """Where new experiments keep artifacts: beside a SQLite store's file; a server (or a file store)
    decides for itself; other databases use the results folder."""
    uri = tracking_uri(cfg)
    db = sqlite_file(uri)
    if db is not None:
        return str(db.resolve().parent / "artifacts")
    if _is_server(uri) or uri.startswith(("file:", "/")):
        return None
    return f"{results_dir(cfg)}/mlflow/artifacts"


def require_store(uri: str) -> None:
    """Raise ``TrackingUnavailableError`` when ``uri`` is a SQLite store that does not exist (yet)."""
    db = sqlite_file(uri)
    if db is not None and not db.is_file():
        raise TrackingUnavailableError(
            f"no MLflow store at {uri} (mlflow.tracking_uri or MLFLOW_TRACKING_URI, or mlflow.results_dir)"
        )


def client(cfg: Config, *, must_exist: bool = False):
    """An ``MlflowClient`` (tracking and registry) on ``cfg``'s store; ``must_exist``: never create one."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    if must_exist:
        require_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def activate(uri: str, *, must_exist: bool = False) -> str:
    """Point MLflow's global tracking and registry URIs at ``uri`` (what ``models:/`` and ``runs:/`` URIs,
    ``mlflow.log_*`` and ``mlflow.pyfunc.load_model`` use); returns ``uri``."""
    import mlflow

    if must_exist:
        require_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@contextmanager
def quiet_artifact_downloads() -> Iterator[None]:
    """No MLflow artifact progress bars inside the block, unless the caller's environment asks for them.

    The variable is restored afterwards, so a command called in-process (a test, a notebook) leaves the
    caller's environment as it found it.
    """
    previous = os.environ.get(PROGRESS_BAR_ENV)
    if previous is None:
        os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PROGRESS_BAR_ENV, None)


def ensure_experiment(cfg: Config) -> str:
    """The id of experiment ``mlflow.experiment``, created (with an explicit artifact location) if missing."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    name = cfg.mlflow.experiment
    db = sqlite_file(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow_client = client(cfg)
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is None:
        try:
            return mlflow_client.create_experiment(name, artifact_location=artifact_location(cfg))
        except MlflowException:
            # another process (a parallel trial) created it in between
            exp = mlflow_client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingUnavailableError(
            f"MLflow experiment {name!r} at {uri} is deleted: restore it (mlflow experiments restore "
            f"--experiment-id {exp.experiment_id}) or set mlflow.experiment to another name"
        )
    return exp.experiment_id


def _check_http(uri: str, timeout_s: float) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status != 200:
                raise TrackingUnavailableError(
                    f"MLflow tracking server {uri} answered {resp.status} on /health"
                )
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} is not reachable ({reason}); start it or fix mlflow.tracking_uri"
        ) from None


def check_reachable(cfg: Config, timeout_s: float = 30.0) -> None:
    """Raise ``TrackingUnavailableError`` (naming the URI) unless the store answers within ``timeout_s``.

    Servers get a direct ``/health`` probe first, because MLflow's own client retries with back-off for
    minutes. Then the experiment is looked up (or created) in a helper thread bounded by ``timeout_s``.
    """
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        _check_http(uri, min(timeout_s, 5.0))
    outcome: dict[str, Any] = {}

    def probe() -> None:
        try:
            outcome["id"] = ensure_experiment(cfg)
        except Exception as e:  # noqa: BLE001 - reported below with the URI
            outcome["error"] = e

    t = threading.Thread(target=probe, name="mlflow-probe", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TrackingUnavailableError(f"MLflow tracking store {uri} did not answer within {timeout_s:.0f} s")
    err = outcome.get("error")
    if isinstance(err, TrackingUnavailableError):
        raise err
    if err is not None:
        raise TrackingUnavailableError(f"MLflow tracking store {uri} is not usable: {err}") from err


def ui_command(cfg: Config) -> str:
    """How to look at the runs: an ``mlflow ui`` command line, or the server's address."""
    uri = tracking_uri(cfg)
    if _is_server(uri):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)} --host 127.0.0.1"


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow params: ``section.key`` → value text (at most 500 characters)."""
    out = {}
    for key, value in cfg.flat().items():
        text = "None" if value is None else str(value)
        if len(text) > PARAM_MAX_CHARS:
            text = text[: PARAM_MAX_CHARS - 3] + "..."
        out[key] = text
    return out


def version_tags() -> dict[str, str]:
    """``q2l.version.<dist>`` tags for the libraries that decide a run's numbers."""
    tags = {}
    for dist in ("q2l", "torch", "ray", "timm", "mlflow"):
        try:
            tags[f"q2l.version.{dist}"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return tags


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit checked out where ``path`` (default: this package) lives, or None outside a git repo."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def log_tags(mlflow_client, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set ``tags`` (values as text, at most ``TAG_MAX_CHARS``) on ``run_id`` in as few calls as allowed."""
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)[:TAG_MAX_CHARS]) for k, v in tags.items()]
    for i in range(0, len(items), MAX_BATCH):
        mlflow_client.log_batch(run_id, tags=items[i : i + MAX_BATCH])


def log_new_params(
    mlflow_client, run_id: str, params: Mapping[str, str], existing: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Log the params ``run_id`` does not have yet (MLflow params are immutable); returns those it had."""
    from mlflow.entities import Param

    existing = dict(mlflow_client.get_run(run_id).data.params if existing is None else existing)
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(new), MAX_BATCH):
        mlflow_client.log_batch(run_id, params=new[i : i + MAX_BATCH])
    return existing
