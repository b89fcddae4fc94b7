"""The configuration's schema, one dataclass per section (every key with its type, default and range), and
its validation: keys, types, ranges, finite numbers and consistency, checked once."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
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
    # decoding limit, checked from the image header before any pixel is decoded (decompression bombs)
    max_image_pixels: int = field(default=40_000_000, metadata=_range(1))
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
    """Query2Label architecture (docs/design.md §2)."""

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
    """Asymmetric loss (docs/design.md §3); Q2L's recipe by default."""

    gamma_neg: float = field(default=2.0, metadata=_range(0.0, 10.0))
    gamma_pos: float = field(default=0.0, metadata=_range(0.0, 10.0))
    clip: float = field(default=0.0, metadata=_range(0.0, 1.0, hi_open=True))
    eps: float = field(default=1e-5, metadata=_range(0.0, 1.0, lo_open=True))
    partial_labels: bool = False


@dataclass
class OptimConfig:
    """AdamW + OneCycleLR stepped per batch (docs/design.md §6)."""

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
    searcher: Literal["optuna", "gp", "random"] = "optuna"  # optuna: TPE; gp: Gaussian process
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = field(default=1, metadata=_range(1))
    reduction_factor: float = field(default=2.0, metadata=_range(1.0, lo_open=True))
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)
    # the Optuna study's RDB URL; unset: sqlite:///<mlflow.results_dir>/optuna/optuna.db
    storage: str | None = None
    # a sweep name (or a list): its study's finished and pruned trials seed this sweep's study
    warm_start: Any = None


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


class Invalid(Exception):
    """A validation failure not yet attributed to a file or ``--set``: the message and the keys involved."""

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.message = message
        self.keys = keys


def show_value(value: Any, limit: int = 80) -> str:
    """``repr`` short enough for one error line (a pasted list or a 4000-digit number stays readable)."""
    try:
        text = repr(value)
    except ValueError:  # ints past Python's digit limit cannot be printed at all
        text = f"<{type(value).__name__} too long to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_MAX_PLAIN_VALUES = 100_000


def _check_plain(value: Any, key: str) -> None:
    """Free-form values (``tune.space``): finite numbers only, no self-reference, bounded size.

    YAML aliases can make a structure refer to itself or expand exponentially; later deep copies
    (``dataclasses.asdict``) would recurse forever or hang on those.
    """
    count = 0
    stack: list[tuple[Any, str, tuple[int, ...]]] = [(value, key, ())]
    while stack:
        item, where, parents = stack.pop()
        count += 1
        if count > _MAX_PLAIN_VALUES:
            raise Invalid(f"{key} holds more than {_MAX_PLAIN_VALUES} values", key)
        if isinstance(item, float) and not math.isfinite(item):
            raise Invalid(f"{where} = {item!r} must be a finite number", key)
        if isinstance(item, (dict, list)):
            if id(item) in parents:
                raise Invalid(f"{where} refers to itself (a recursive YAML alias)", key)
            inner = (*parents, id(item))
            if isinstance(item, dict):
                stack.extend((v, f"{where}.{k}", inner) for k, v in item.items())
            else:
                stack.extend((v, f"{where}[{i}]", inner) for i, v in enumerate(item))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and minimally coerce: int → float) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:  # "X | None": X's own message says more than "not a valid X | None"
            return _coerce(value, args[0], key)
        for arg in args:
            with contextlib.suppress(Invalid):
                return _coerce(value, arg, key)
        raise Invalid(f"{key} = {show_value(value)} is not a valid {_type_name(tp)}", key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise Invalid(f"{key} = {show_value(value)} must be one of {', '.join(map(repr, choices))}", key)
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise Invalid(f"{key} = {show_value(value)} must be a mapping", key)
        _, vt = typing.get_args(tp)
        for k in value:
            if not isinstance(k, str):
                raise Invalid(f"{key} has a key {show_value(k)} that is not text", key)
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        _check_plain(value, key)
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise Invalid(f"{key} = {show_value(value)} is too large for a float", key) from None
            if not math.isfinite(number):
                raise Invalid(f"{key} = {value!r} must be a finite number", key)
            return number
    elif tp is str and isinstance(value, str):
        return value
    raise Invalid(f"{key} = {show_value(value)} must be of type {_type_name(tp)}", key)


def _check_range(value: Any, meta: dict, key: str) -> None:
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
        raise Invalid(f"{key} = {show_value(value)} is out of range {span}", key)


def _build_section(cls: type, raw: Any, section: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise Invalid(f"section {section!r} must be a mapping, got {show_value(raw)}", section)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        key = f"{section}.{unknown[0]}"
        raise Invalid(f"unknown key {key} (known in {section}: {', '.join(fields)})", key)
    values = {}
    for name, value in raw.items():
        key = f"{section}.{name}"
        value = _coerce(value, hints[name], key)
        _check_range(value, fields[name].metadata, key)
        values[name] = value
    return cls(**values)


def _check_consistency(cfg: Config) -> None:
    m = cfg.model
    if m.hidden_dim % m.num_heads:
        raise Invalid(
            f"model.hidden_dim = {m.hidden_dim} must divide by model.num_heads = {m.num_heads}",
            "model.hidden_dim",
            "model.num_heads",
        )
    if m.hidden_dim % 4:
        raise Invalid(f"model.hidden_dim = {m.hidden_dim} is not a multiple of 4", "model.hidden_dim")
    if cfg.data.format == "csv" and not (cfg.data.train_file and cfg.data.test_file):
        raise Invalid(
            "data.train_file and data.test_file are required when data.format = 'csv'",
            "data.format",
            "data.train_file",
            "data.test_file",
        )
    if cfg.train.precision == "fp16" and not cfg.ray.use_gpu:
        raise Invalid(
            "train.precision = 'fp16' needs a GPU (ray.use_gpu = true); use 'bf16' on CPU",
            "train.precision",
            "ray.use_gpu",
        )


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}


def validate_raw(raw: Any) -> Config:
    """The one validation of a nested dict; raises ``Invalid`` naming the keys involved."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise Invalid(f"the top level must be a mapping of sections, got {show_value(raw)}")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - set(hints), key=str)
    if unknown:
        raise Invalid(f"unknown section {unknown[0]!r} (sections: {', '.join(hints)})", str(unknown[0]))
    cfg = Config(**{name: _build_section(hints[name], raw.get(name), name) for name in hints})
    _check_consistency(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any] | None, source: str = "<dict>") -> Config:
    """Validate a nested dict into a ``Config``; errors name the key and ``source``."""
    try:
        return validate_raw(raw)
    except Invalid as e:
        raise ConfigError(f"{source}: {e.message}") from None
