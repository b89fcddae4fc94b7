"""Typed run configuration: one object per run, loaded from YAML, overridden with ``--set``, validated once.

A config is a tree of frozen-ish dataclasses (``Config.data``, ``Config.model`` …). ``load_config`` reads a
YAML file, applies ``section.key=value`` overrides and validates every key, type and range, raising
``ConfigError`` that names the key and the file before any work starts. Layers below receive the objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, naming the key and the file it came from."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    return {"range": (lo, hi, lo_open, hi_open)}


@dataclass
class DataConfig:
    """Where the images and labels are, how they are split and augmented, how they are loaded."""

    root: str = "data/demo"
    format: Literal["coco", "voc", "csv"] = "coco"
    # COCO layout under root unless given: train2014/, val2014/, annotations/instances_{train,val}2014.json
    train_annotations: str | None = None
    train_images: str | None = None
    test_annotations: str | None = None
    test_images: str | None = None
    # CSV/JSONL (format=csv): files listing image path + labels, relative paths resolved against root
    train_file: str | None = None
    test_file: str | None = None
    include_unannotated: bool = True
    voc_include_difficult: bool = False
    image_size: int = field(default=224, metadata=_range(16, 2048))
    holdout_fraction: float = field(default=0.1, metadata=_range(0.0, 0.9, lo_open=True))
    split_seed: int = 0
    on_bad_image: Literal["error", "skip"] = "error"
    num_workers: int | None = field(default=None, metadata=_range(0, 64))
    # "device": loader workers only read file bytes; JPEG decode (nvJPEG via torchvision.io.decode_jpeg on
    # CUDA), resize and augmentation run on the training device, for GPU nodes short of CPU cores
    decode: Literal["loader", "device"] = "loader"
    cache_dir: str | None = None
    randaugment: bool = True
    cutout: float = field(default=0.5, metadata=_range(0.0, 1.0))
    hflip: bool = False
    cutmix_alpha: float = field(default=0.0, metadata=_range(0.0))
    mixup_alpha: float = field(default=0.0, metadata=_range(0.0))
    mix_prob: float = field(default=1.0, metadata=_range(0.0, 1.0))
    max_train_images: int | None = field(default=None, metadata=_range(1))
    max_eval_images: int | None = field(default=None, metadata=_range(1))


@dataclass
class ModelConfig:
    """Query2Label architecture (DESIGN §2)."""

    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    pretrained_path: str | None = None
    hidden_dim: int = field(default=256, metadata=_range(8, 8192))
    num_heads: int = field(default=8, metadata=_range(1, 64))
    enc_layers: int = field(default=1, metadata=_range(0, 12))
    dec_layers: int = field(default=2, metadata=_range(1, 12))
    dim_feedforward: int = field(default=1024, metadata=_range(8, 32768))
    dropout: float = field(default=0.1, metadata=_range(0.0, 1.0, hi_open=True))
    decoder_self_attn: bool = False
    activation_checkpointing: bool = False


@dataclass
class LossConfig:
    """Asymmetric loss (DESIGN §3); Q2L's recipe by default."""

    gamma_neg: float = field(default=2.0, metadata=_range(0.0, 10.0))
    gamma_pos: float = field(default=0.0, metadata=_range(0.0, 10.0))
    clip: float = field(default=0.0, metadata=_range(0.0, 1.0, hi_open=True))
    eps: float = field(default=1e-5, metadata=_range(0.0, 1.0, lo_open=True))
    partial_labels: bool = False


@dataclass
class OptimConfig:
    """AdamW + OneCycleLR stepped per batch (DESIGN §6)."""

    lr: float = field(default=1e-4, metadata=_range(0.0, 10.0, lo_open=True))
    weight_decay: float = field(default=1e-2, metadata=_range(0.0))
    pct_start: float = field(default=0.2, metadata=_range(0.0, 1.0, lo_open=True, hi_open=True))
    grad_clip: float | None = field(default=None, metadata=_range(0.0, lo_open=True))
    fused: bool | None = None  # None: fused AdamW on CUDA, plain elsewhere


@dataclass
class TrainConfig:
    """The engine's loop: epochs, batch, precision, EMA, early stopping."""

    epochs: int = field(default=80, metadata=_range(1, 10000))
    batch_size: int = field(default=64, metadata=_range(1, 65536))  # per worker
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None  # None: on (NHWC is faster in oneDNN and cuDNN; see train_step_bench)
    ema_decay: float | None = field(default=0.9997, metadata=_range(0.0, 1.0, hi_open=True))
    early_stop_patience: int | None = field(default=8, metadata=_range(1))
    grad_accum_steps: int = field(default=1, metadata=_range(1, 1024))
    compile: bool = False
    seed: int = 0


@dataclass
class RayConfig:
    """Ray Train scaling, storage and fault tolerance."""

    num_workers: int = field(default=2, metadata=_range(1, 4096))
    use_gpu: bool = False
    cpus_per_worker: float = field(default=1.0, metadata=_range(0.0, 256.0))
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    storage_path: str = "results/ray"
    run_name: str | None = None
    max_failures: int = field(default=2, metadata=_range(-1, 1000))
    keep_checkpoints: int = field(default=2, metadata=_range(1, 1000))


@dataclass
class TuneConfig:
    """A sweep: search space over any config key, searcher, scheduler, concurrency."""

    name: str | None = None
    num_samples: int = field(default=8, metadata=_range(1, 100000))
    max_concurrent_trials: int | None = field(default=None, metadata=_range(1, 4096))
    searcher: Literal["optuna", "random"] = "optuna"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = field(default=1, metadata=_range(1))
    reduction_factor: float = field(default=2.0, metadata=_range(1.0, lo_open=True))
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)


@dataclass
class MlflowConfig:
    """Where runs are recorded; unset tracking_uri means a store under the results folder."""

    tracking_uri: str | None = None
    experiment: str = "q2l"
    registered_model: str | None = None
    log_model: bool = True
    results_dir: str = "results"


@dataclass
class PromoteConfig:
    """The gate a candidate model must pass to become champion."""

    min_map: float = field(default=0.0, metadata=_range(0.0, 100.0))
    min_delta: float = field(default=0.0, metadata=_range(-100.0, 100.0))
    max_class_drop: float = field(default=100.0, metadata=_range(0.0, 100.0))
    split: Literal["test", "holdout"] = "test"


@dataclass
class Config:
    """The whole run: every section, resolved."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-serialisable)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML, loadable by ``load_config``."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every key (nested dicts stay as one value)."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def replace(self, overrides: dict[str, Any], source: str = "<overrides>") -> Config:
        """A new validated config with dotted-key overrides applied (values already typed)."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key, value, source)
        return config_from_dict(raw, source)


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    section, _, name = key.partition(".")
    if not name or section not in raw:
        raise ConfigError(f"{source}: unknown key {key!r} (expected section.key, sections: {', '.join(raw)})")
    if name not in raw[section]:
        raise ConfigError(f"{source}: unknown key {key!r} (known in {section}: {', '.join(raw[section])})")
    raw[section][name] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check (and minimally coerce: int → float) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{source}: {key} = {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: {key} = {value!r} must be one of {', '.join(map(repr, choices))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} = {value!r} must be a mapping")
        _, vt = typing.get_args(tp)
        if vt is Any:
            return dict(value)
        return {str(k): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{source}: {key} = {value!r} must be of type {_type_name(tp)}")


def _check_range(value: Any, meta: dict, key: str, source: str) -> None:
    if value is None or "range" not in meta:
        return
    lo, hi, lo_open, hi_open = meta["range"]
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and (value > hi or (hi_open and value == hi))
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ConfigError(f"{source}: {key} = {value!r} is out of range {span}")


def _build_section(cls: type, raw: Any, section: str, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {section}.{unknown[0]} (known in {section}: {', '.join(fields)})"
        )
    values = {}
    for name, value in raw.items():
        key = f"{section}.{name}"
        value = _coerce(value, hints[name], key, source)
        _check_range(value, fields[name].metadata, key, source)
        values[name] = value
    return cls(**values)


def _check_consistency(cfg: Config, source: str) -> None:
    m = cfg.model
    if m.hidden_dim % m.num_heads:
        raise ConfigError(
            f"{source}: model.hidden_dim = {m.hidden_dim} must divide by by model.num_heads = {m.num_heads}"
        )
    if m.hidden_dim % 4:
        raise ConfigError(f"{source}: model.hidden_dim = {m.hidden_dim} is not a multiple of 4")
    if cfg.data.format == "csv" and not (cfg.data.train_file and cfg.data.test_file):
        raise ConfigError(
            f"{source}: data.train_file and data.test_file are required when data.format = 'csv'"
        )
    if cfg.train.precision == "fp16" and not cfg.ray.use_gpu:
        raise ConfigError(
            f"{source}: train.precision = 'fp16' needs a GPU (ray.use_gpu = true); use 'bf16' on CPU"
        )


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}


def config_from_dict(raw: dict[str, Any] | None, source: str = "<dict>") -> Config:
    """Validate a nested dict into a ``Config``; errors name the key and ``source``."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r} (sections: {', '.join(hints)})")
    cfg = Config(**{name: _build_section(hints[name], raw.get(name), name, source) for name in hints})
    _check_consistency(cfg, source)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` → ``("optim.lr", 3e-4)``; the value is parsed as YAML (1e-4, true, [a, b])."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({e})") from None
    # YAML 1.1 reads "1e-4" as a string: accept plain numbers written that way
    if isinstance(parsed, str):
        with contextlib.suppress(ValueError):
            parsed = float(parsed) if any(c in parsed for c in ".eE") else int(parsed)
    return key.strip(), parsed


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML; None means all defaults), apply ``--set`` overrides, validate once."""
    source = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
    for text in overrides or []:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"--set {text!r}: expected section.key=value")
        sec = raw.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        sec[name] = value
        source_for_set = f"{source} (with --set {text})"
        # validate early so the message names the override that broke it
        config_from_dict(raw, source_for_set)
    return config_from_dict(raw, source)
