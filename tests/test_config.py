"""Typed config: YAML, --set and MLflow's variables, validated once; errors name the key and the file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from q2l.config import Config, ConfigError, config_from_dict, load_config, parse_override, resolve_config


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


def test_exponent_numbers_are_floats_in_files_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: 1e-4, weight_decay: 5E-3}\nray: {resources_per_worker: {slot: 1e0}}\n")
    cfg = load_config(path, ["optim.pct_start=2.5e-1"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.pct_start) == (1e-4, 5e-3, 0.25)
    assert cfg.ray.resources_per_worker == {"slot": 1.0}
    assert load_config(None, ["ray.run_name=1e-4x"]).ray.run_name == "1e-4x"


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


# pairs that are valid together and invalid alone: the outcome must not depend on their order
VALID_PAIRS = [
    ("model.num_heads=6", "model.hidden_dim=96"),
    ("data.format=csv", "data.train_file=train.csv", "data.test_file=test.csv"),
    ("train.precision=fp16", "ray.use_gpu=true"),
]


@pytest.mark.parametrize("pair", VALID_PAIRS)
@pytest.mark.parametrize("reverse", [False, True], ids=["given-order", "reversed"])
def test_overrides_are_validated_together(pair, reverse):
    overrides = list(reversed(pair)) if reverse else list(pair)
    cfg = load_config(None, overrides)
    flat = cfg.flat()
    for text in pair:
        key, value = parse_override(text)
        assert flat[key] == value


@pytest.mark.parametrize(
    ("overrides", "named", "not_named"),
    [
        (["model.num_heads=6"], ["--set model.num_heads=6"], []),
        (
            ["model.num_heads=7", "model.hidden_dim=96"],
            ["--set model.num_heads=7", "--set model.hidden_dim=96"],
            [],
        ),
        (
            ["data.format=csv", "data.train_file=a.csv"],
            ["--set data.format=csv", "--set data.train_file=a"],
            [],
        ),
        (["train.precision=fp16", "optim.lr=0.5"], ["--set train.precision=fp16"], ["optim.lr"]),
    ],
)
def test_error_names_the_overrides_involved_and_the_file(tmp_path, overrides, named, not_named):
    path = write(tmp_path, {"model": {"hidden_dim": 256}})
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert message.startswith(f"{path} (with ")
    for needle in named:
        assert needle in message
    for needle in not_named:
        assert needle not in message


def test_error_from_the_file_alone_names_no_override(tmp_path):
    path = write(tmp_path, {"model": {"hidden_dim": 100}})
    with pytest.raises(ConfigError) as err:
        load_config(path, ["optim.lr=0.5"])
    assert str(err.value).startswith(f"{path}: model.hidden_dim = 100")


FLOAT_KEYS = ["optim.lr", "data.holdout_fraction", "model.dropout", "ray.cpus_per_worker", "optim.grad_clip"]


@pytest.mark.parametrize("key", FLOAT_KEYS + ["ray.resources_per_worker.slot", "promote.min_delta"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_non_finite_floats_are_refused_from_set(key, value):
    if key.startswith("ray.resources_per_worker."):
        override = f"ray.resources_per_worker={{slot: {value}}}"
    else:
        override = f"{key}={value}"
    with pytest.raises(ConfigError, match="must be a finite number") as err:
        load_config(None, [override])
    assert key in str(err.value)
    assert f"--set {override}" in str(err.value)


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_refused_from_file(tmp_path, key):
    section, name = key.split(".")
    path = tmp_path / "run.yaml"
    path.write_text(f"{section}:\n  {name}: .NaN\n")
    with pytest.raises(ConfigError, match=rf"{path}: {key} = nan must be a finite number"):
        load_config(path)


def test_non_finite_numbers_inside_the_search_space_are_refused():
    with pytest.raises(ConfigError, match=r"tune.space.optim.lr.loguniform\[1\] = nan"):
        load_config(None, ["tune.space={optim.lr: {loguniform: [1.0e-5, .nan]}}"])


def test_number_too_large_for_a_float_is_an_error():
    with pytest.raises(ConfigError, match="optim.lr = 1000.* is too large for a float"):
        load_config(None, ["optim.lr=1" + "0" * 400])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "optim:\n  lr: 0.1\n  weight_decay: 0.0\n  lr: 0.2\n",
            "duplicate key 'optim.lr' at line 4 (first at line 2)",
        ),
        (
            "optim: {lr: 0.1}\nmodel: {}\noptim: {pct_start: 0.3}\n",
            "duplicate key 'optim' at line 3 (first at line 1)",
        ),
        (
            "tune:\n  space:\n    optim.lr: [1, 2]\n    optim.lr: [3]\n",
            "duplicate key 'tune.space.optim.lr' at line 4",
        ),
    ],
)
def test_duplicate_yaml_keys_are_an_error_naming_key_and_line(tmp_path, text, needle):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert needle in str(err.value)


def test_merge_keys_may_be_overridden_without_a_duplicate_error(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("optim:\n  <<: {lr: 0.1, pct_start: 0.3}\n  lr: 0.2\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.pct_start) == (0.2, 0.3)


def test_duplicate_key_inside_a_set_value_is_an_error():
    with pytest.raises(ConfigError, match="--set ray.resources_per_worker=.*duplicate key 'a'"):
        load_config(None, ["ray.resources_per_worker={a: 1, a: 2}"])


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("model: {backbone: café}\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at line 1"),
        ("model: {}\n".encode("utf-16"), "not UTF-8 text (byte 0xff at line 1"),
        (b"model: {backbone: a\x00b}\n", "not valid YAML"),
    ],
    ids=["latin-1", "utf-16", "nul-character"],
)
def test_undecodable_files_are_errors_naming_the_file(tmp_path, content, needle):
    path = tmp_path / "enc.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert needle in str(err.value)


def test_utf8_with_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffmodel: {backbone: résumé}\n".encode())
    assert load_config(path).model.backbone == "résumé"


def test_folder_and_unreadable_file_are_errors_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}: is a folder"):
        load_config(tmp_path)
    if os.geteuid() != 0:  # root reads any file
        path = write(tmp_path, {"model": {}})
        path.chmod(0)
        with pytest.raises(ConfigError, match=f"{path}: cannot read"):
            load_config(path)


# malformed configs a hand or a script can produce: each must be a ConfigError naming the file
FUZZ = {
    "top-level list": "- a\n- b\n",
    "top-level scalar": "hello\n",
    "section is a list": "model: [1, 2]\n",
    "section is a number": "model: 3\n",
    "key is a number": "model: {1: 2}\n",
    "number and text keys": "model: {1: 2, foo: 3}\n",
    "section name is a number": "1: {}\nfoo: {}\n",
    "tab indentation": "model:\n\thidden_dim: 8\n",
    "two documents": "model: {}\n---\noptim: {}\n",
    "python tag": "model: !!python/object/apply:os.system ['true']\n",
    "binary value": "model: !!binary aGVsbG8=\n",
    "unhashable key": "model: {? [a, b] : 1}\n",
    "impossible date": "ray: {run_name: 2024-13-45}\n",
    "date for text": "ray: {run_name: 2024-01-01}\n",
    "int past digit limit": "optim: {lr: 1" + "0" * 5000 + "}\n",
    "deep nesting": "tune: {space: " + "[" * 1000 + "]" * 1000 + "}\n",
    "recursive alias": "tune:\n  space: &a\n    x: *a\n",
    "alias bomb": "tune:\n  space:\n    a: &a [1,1,1,1,1,1,1,1,1,1]\n"
    + "".join(
        f"    {n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdef", "bcdefg", strict=True)
    ),
    "text key in resources": "ray: {resources_per_worker: {null: 1}}\n",
}


@pytest.mark.parametrize("text", FUZZ.values(), ids=FUZZ.keys())
def test_malformed_configs_are_config_errors(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}")


@pytest.mark.parametrize(
    "override",
    [
        "=",
        "a",
        ".x=1",
        "model.=1",
        "optim=1",
        "x.y=1",
        "model.hidden_dim.x=1",
        "model.hidden_dim=[1",
        "optim.lr=nan",
    ],
)
def test_malformed_overrides_are_config_errors(override):
    with pytest.raises(ConfigError, match="--set"):
        load_config(None, [override])


TRACKING = "MLFLOW_TRACKING_URI"
EXPERIMENT = "MLFLOW_EXPERIMENT_NAME"


@pytest.mark.parametrize(
    ("file", "overrides", "environ", "expected", "source"),
    [
        ({}, [], {}, None, None),
        ({}, [], {TRACKING: "http://env:5000"}, "http://env:5000", f"${TRACKING}"),
        ({}, [], {TRACKING: ""}, None, None),
        ({"tracking_uri": "http://file:5000"}, [], {TRACKING: "http://env:5000"}, "http://file:5000", "FILE"),
        ({"tracking_uri": None}, [], {TRACKING: "http://env:5000"}, None, "FILE"),
        (
            {"tracking_uri": "http://file:5000"},
            ["mlflow.tracking_uri=http://set:5000"],
            {TRACKING: "http://env:5000"},
            "http://set:5000",
            "--set mlflow.tracking_uri=http://set:5000",
        ),
        (
            {},
            ["mlflow.tracking_uri=null"],
            {TRACKING: "http://env:5000"},
            None,
            "--set mlflow.tracking_uri=null",
        ),
    ],
    ids=[
        "default",
        "env",
        "empty-env",
        "file-over-env",
        "file-null-over-env",
        "set-over-file",
        "set-null-over-env",
    ],
)
def test_tracking_uri_precedence(tmp_path, file, overrides, environ, expected, source):
    path = write(tmp_path, {"mlflow": file})
    resolved = resolve_config(path, overrides, environ=environ)
    assert resolved.config.mlflow.tracking_uri == expected
    assert resolved.sources.get("mlflow.tracking_uri") == (str(path) if source == "FILE" else source)


@pytest.mark.parametrize(
    ("file", "overrides", "expected", "source"),
    [
        ({}, [], "from-env", f"${EXPERIMENT}"),
        ({"experiment": "from-file"}, [], "from-file", "FILE"),
        (
            {"experiment": "from-file"},
            ["mlflow.experiment=from-set"],
            "from-set",
            "--set mlflow.experiment=from-set",
        ),
        ({}, ["mlflow.experiment=q2l"], "q2l", "--set mlflow.experiment=q2l"),
    ],
    ids=["env-over-default", "file-over-env", "set-over-file", "set-default-value-over-env"],
)
def test_experiment_precedence(tmp_path, file, overrides, expected, source):
    path = write(tmp_path, {"mlflow": file})
    resolved = resolve_config(path, overrides, environ={EXPERIMENT: "from-env"})
    assert resolved.config.mlflow.experiment == expected
    assert resolved.sources["mlflow.experiment"] == (str(path) if source == "FILE" else source)


@pytest.mark.parametrize("text", ["mlflow:\n", "mlflow: {}\n", "mlflow: [1]\n"])
def test_environment_with_an_empty_or_bad_mlflow_section(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    environ = {TRACKING: "http://env:5000"}
    if text == "mlflow: [1]\n":
        with pytest.raises(ConfigError, match=f"{path}: section 'mlflow' must be a mapping"):
            resolve_config(path, [], environ=environ)
    else:
        assert resolve_config(path, [], environ=environ).config.mlflow.tracking_uri == "http://env:5000"


def test_resolve_reads_the_process_environment_and_load_config_does_not(monkeypatch):
    monkeypatch.setenv(TRACKING, "http://127.0.0.1:5999")
    monkeypatch.setenv(EXPERIMENT, "env-exp")
    cfg = resolve_config(None, []).config
    assert (cfg.mlflow.tracking_uri, cfg.mlflow.experiment) == ("http://127.0.0.1:5999", "env-exp")
    plain = load_config(None, [])
    assert (plain.mlflow.tracking_uri, plain.mlflow.experiment) == (None, "q2l")


def test_sources_name_the_file_and_the_last_set_of_a_key(tmp_path):
    path = write(tmp_path, {"optim": {"lr": 0.1}, "model": {"hidden_dim": 128}})
    sources = resolve_config(path, ["optim.lr=0.2", "optim.lr=0.3"], environ={}).sources
    assert sources == {"optim.lr": "--set optim.lr=0.3", "model.hidden_dim": str(path)}
