"""Typed config: YAML + --set overrides, validated once with errors naming the key and the file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from q2l.config import Config, ConfigError, config_from_dict, load_config, parse_override


def write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, {"model": {"backbone": "resnet18", "hidden_dim": 128}, "optim": {"lr": 3e-4}})
    cfg = load_config(path, ["optim.lr=1e-3", "train.epochs=3", "ray.resources_per_worker={gpu_slot: 1}"])
    assert isinstance(cfg, Config)
    assert cfg.model.backbone == "resnet18" and cfg.model.hidden_dim == 128
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3
    assert cfg.ray.resources_per_worker == {"gpu_slot": 1.0}
    assert cfg.loss.gamma_neg == 2.0  # Q2L recipe default


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"optim": {"lrr": 1}}, "optim.lrr"),
        ({"optimizer": {"lr": 1}}, "'optimizer'"),
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"epochs": 1.5}}, "train.epochs"),
        ({"loss": {"gamma_neg": -1}}, "loss.gamma_neg"),
        ({"data": {"holdout_fraction": 0.0}}, "data.holdout_fraction"),
        ({"data": {"format": "parquet"}}, "data.format"),
        ({"ray": {"use_gpu": "yes"}}, "ray.use_gpu"),
        ({"model": {"hidden_dim": 100, "num_heads": 8}}, "model.hidden_dim"),
    ],
)
def test_bad_values_name_key_and_file(tmp_path, data, needle):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_bad_override_names_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"--set optim.lr=-1.*optim.lr"):
        load_config(None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("no-equals-sign")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_round_trip_yaml_and_flat():
    cfg = load_config(None, ["model.backbone=resnet18", "tune.space={optim.lr: {loguniform: [1e-5, 1e-3]}}"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    flat = cfg.flat()
    assert flat["model.backbone"] == "resnet18"
    assert cfg.replace({"optim.lr": 0.5}).optim.lr == 0.5
    with pytest.raises(ConfigError, match="optim.nope"):
        cfg.replace({"optim.nope": 1})


def test_cli_config_error_exits_2_without_starting_ray(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "q2l.cli", "train", "--set", "optim.lrx=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "optim.lrx" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
