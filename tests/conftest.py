"""Shared fixtures: a clean environment, a local Ray per module, a tiny demo data set, MLflow stores.

- The caller's ``MLFLOW_*``, ``RAY_*`` and ``Q2L_*`` variables are cleared for the whole suite
  (``clean_environment``): a developer's ``MLFLOW_TRACKING_URI`` or ``RAY_ADDRESS`` must not steer a test.
  Its runs stay where the test puts them.
- ``ray_local``: a local Ray (``RAY_CPUS`` CPUs, dashboard and node on 127.0.0.1), started for the module
  that asks for it and shut down after its last test; its environment settings are restored then.
- ``tiny_demo_root``: 48 train + 24 val demo images at 64 px in COCO layout, generated once per session.
- ``mlflow_store``: a fresh SQLite MLflow store, schema already migrated, where a config with
  ``mlflow.results_dir = tmp_path / "results"`` records; returns its tracking URI. Migrating a new store
  takes seconds, so one is migrated per session and copied per test (milliseconds).
- ``mlflow_tmp_config``: a ``Config`` for plumbing tests: the tiny demo set, a small ``resnet18``
  (``pretrained=False``) at 32 px, 2 epochs, 2 CPU workers; MLflow (SQLite, created by the run itself) and
  Ray storage under the test's ``tmp_path``. Tests derive variants with ``cfg.replace({...})``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from model_fixtures import tiny_config_dict
from support import free_port

from q2l.config import Config, config_from_dict

RAY_CPUS = 2  # what ray_local gives Ray, whatever the machine has: expectations derive from this


def pytest_report_header(config) -> str:
    """The free space where the tests write: a sweep test writes up to 2 GB (checkpoints, logged models).

    A full disk shows up as a failed checkpoint write deep inside a trial, so the header says it up front.
    """
    where = Path(tempfile.gettempdir())
    return f"free disk space in {where}: {shutil.disk_usage(where).free / 2**30:.1f} GiB"


@pytest.fixture(autouse=True)
def restore_mlflow_uris():
    """Each test starts and ends with MLflow's process-wide tracking and registry URIs as they were.

    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` (q2l's ``tracking.activate`` calls both) set module
    globals and ``MLFLOW_*_URI`` variables; left behind, a later test's ``MlflowClient(tracking_uri=X)``
    would look for registered models in an earlier test's store.
    """
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    tracking_utils._tracking_uri, registry_utils._registry_uri = saved
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def clean_environment():
    """Clear the caller's ``MLFLOW_*``, ``RAY_*`` and ``Q2L_*`` variables for the suite; back at its end."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(("MLFLOW_", "RAY_", "Q2L_")):
                mp.delenv(key)
        yield


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module (``RAY_CPUS`` CPUs, loopback, quiet); yields the ``ray`` module.

    It has a dashboard on loopback, named by ``RAY_API_SERVER_ADDRESS`` while the module runs: Ray's state
    API (``ray.util.state``, which the failure tests use to find a Train worker's pid) answers through it.
    """
    import ray

    from q2l.ray_runtime import local_ray_env

    assert not ray.is_initialized(), "a Ray from another module is still up"
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        # inherited by every process the raylet starts: q2l's settings for a local Ray with a dashboard
        for key, value in local_ray_env(f"http://127.0.0.1:{port}").items():
            mp.setenv(key, value)
        ray.init(
            address="local",
            num_cpus=RAY_CPUS,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            logging_level="warning",
        )
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory) -> Path:
    """A 48 + 24 image demo set (64 px, 10 classes, COCO 2014 layout), made once per session."""
    from q2l.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "demo"
    make_demo_dataset(root, num_train=48, num_val=24, size=64, seed=0, workers=1)
    return root


@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory) -> Path:
    """One SQLite MLflow database per session, created (schema migrated) through MLflow's own client."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    client.search_experiments()  # opening the store creates and migrates its schema
    client.search_registered_models()
    return db


@pytest.fixture
def mlflow_store(migrated_mlflow_db, tmp_path) -> str:
    """A fresh, migrated SQLite MLflow store under ``tmp_path / "results"``; its tracking URI.

    It lies where ``q2l.tracking`` puts the store of ``mlflow.results_dir = tmp_path / "results"``, so such
    a config (``mlflow_tmp_config`` too) records into it.
    """
    from q2l.tracking import tracking_uri

    uri = tracking_uri(config_from_dict({"mlflow": {"results_dir": str(tmp_path / "results")}}))
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated_mlflow_db, db)
    return uri


@pytest.fixture
def mlflow_tmp_config(tiny_demo_root, tmp_path) -> Config:
    """The tiny plumbing config recording to a SQLite MLflow store and Ray storage under ``tmp_path``."""
    raw = tiny_config_dict(
        tiny_demo_root,
        ray={"num_workers": 2, "storage_path": str(tmp_path / "ray"), "max_failures": 1},
        mlflow={"results_dir": str(tmp_path / "results"), "experiment": "q2l-test"},
    )
    return config_from_dict(raw, "tests/conftest.py")
