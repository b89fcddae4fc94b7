"""Shared fixtures: one local Ray per session, a tiny demo data set, a tiny config recording to tmp MLflow.

- ``ray_local``: a local Ray (2 CPUs, no dashboard, node on 127.0.0.1) started once and shut down at the
  end of the session; tests that need Ray request it (Ray is never started otherwise).
- ``tiny_demo_root``: 48 train + 24 val demo images at 64 px in COCO layout, generated once per session.
- ``mlflow_tmp_config``: a ``Config`` for plumbing tests: the tiny demo set, a small ``resnet18``
  (``pretrained=False``) at 32 px, 2 epochs, 2 CPU workers; MLflow (SQLite) and Ray storage under the
  test's ``tmp_path``. Tests derive variants with ``cfg.replace({...})``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from model_fixtures import tiny_config_dict

from q2l.config import Config, config_from_dict


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the whole session (2 CPUs, loopback, quiet); yields the ``ray`` module."""
    import ray

    from q2l.train import local_ray_env

    # inherited by every process the raylet starts: q2l's quiet and safe settings for a local Ray
    for key, value in local_ray_env().items():
        os.environ.setdefault(key, value)

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
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


@pytest.fixture
def mlflow_tmp_config(tiny_demo_root, tmp_path) -> Config:
    """The tiny plumbing config recording to a SQLite MLflow store and Ray storage under ``tmp_path``."""
    raw = tiny_config_dict(
        tiny_demo_root,
        ray={"num_workers": 2, "storage_path": str(tmp_path / "ray"), "max_failures": 1},
        mlflow={"results_dir": str(tmp_path / "results"), "experiment": "q2l-test"},
    )
    return config_from_dict(raw, "tests/conftest.py")
