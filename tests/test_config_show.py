"""``q2l config show``: the resolved config as loadable YAML, each given key marked with its source."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from q2l.config import config_from_dict, load_config, resolve_config

Q2L = str(Path(sys.executable).with_name("q2l"))
MLFLOW_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")


def q2l(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run the installed ``q2l`` with MLflow's variables exactly as given (none inherited)."""
    environ = {k: v for k, v in os.environ.items() if k not in MLFLOW_VARS} | env
    return subprocess.run([Q2L, *args], capture_output=True, text=True, cwd=cwd, env=environ, timeout=120)


@pytest.fixture
def run_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  hidden_dim: 128\noptim:\n  lr: 1.0e-3\nmlflow:\n  experiment: from-file\n")
    return path


def test_show_marks_file_set_and_environment_and_reloads(tmp_path, run_yaml):
    overrides = ["model.num_heads=4", "tune.space={optim.lr: {loguniform: [1e-5, 1e-3]}}"]
    args = ["config", "show", "--config", str(run_yaml)] + [a for o in overrides for a in ("--set", o)]
    proc = q2l(args, tmp_path, MLFLOW_TRACKING_URI="http://127.0.0.1:5999", MLFLOW_EXPERIMENT_NAME="from-env")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"  hidden_dim: 128  # from {run_yaml}" in lines
    assert "  num_heads: 4  # from --set model.num_heads=4" in lines
    assert "  space:  # from --set tune.space={optim.lr: {loguniform: [1e-5, 1e-3]}}" in lines
    assert "  tracking_uri: http://127.0.0.1:5999  # from $MLFLOW_TRACKING_URI" in lines
    # the file sets the experiment: the environment does not apply
    assert f"  experiment: from-file  # from {run_yaml}" in lines
    assert "  dropout: 0.1" in lines  # a default: no mark

    expected = resolve_config(
        run_yaml, overrides, environ={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999"}
    ).config
    assert config_from_dict(yaml.safe_load(proc.stdout), "shown") == expected
    saved = tmp_path / "resolved.yaml"
    saved.write_text(proc.stdout)
    assert load_config(saved) == expected


def test_show_without_config_marks_only_the_environment(tmp_path):
    proc = q2l(["config", "show"], tmp_path, MLFLOW_EXPERIMENT_NAME="from-env")
    assert proc.returncode == 0, proc.stderr
    marked = [line for line in proc.stdout.splitlines() if "# from" in line and not line.startswith("#")]
    assert marked == ["  experiment: from-env  # from $MLFLOW_EXPERIMENT_NAME"]
    assert "  tracking_uri: null" in proc.stdout.splitlines()


@pytest.mark.parametrize(
    ("file_text", "overrides", "first_line"),
    [
        (
            None,
            ["model.num_heads=6"],
            "config error: {path} (with --set model.num_heads=6): model.hidden_dim = 128",
        ),
        (
            None,
            ["optim.lr=.nan"],
            "config error: {path} (with --set optim.lr=.nan): optim.lr = nan must be a finite",
        ),
        ("optim:\n  lr: 0.1\n  lr: 0.2\n", [], "config error: {path}: duplicate key 'optim.lr' at line 3"),
        (b"model: {backbone: caf\xe9}\n", [], "config error: {path}: not UTF-8 text (byte 0xe9 at line 1"),
        ("- model\n", [], "config error: {path}: the top level must be a mapping of sections"),
    ],
    ids=["consistency", "nan", "duplicate-key", "latin-1", "top-level-list"],
)
def test_show_exits_2_with_a_config_error(tmp_path, run_yaml, file_text, overrides, first_line):
    if isinstance(file_text, bytes):
        run_yaml.write_bytes(file_text)
    elif file_text is not None:
        run_yaml.write_text(file_text)
    args = ["config", "show", "--config", str(run_yaml)] + [a for o in overrides for a in ("--set", o)]
    proc = q2l(args, tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines()[0].startswith(first_line.format(path=run_yaml))
    assert "Traceback" not in proc.stderr
