"""Typed run configuration: one object per run, loaded from YAML, overridden with ``--set``, validated once.

A config is a tree of frozen-ish dataclasses (``Config.data``, ``Config.model`` …). ``resolve_config`` (what
every command uses) reads a YAML file, applies all ``section.key=value`` overrides, fills unset MLflow keys
from MLflow's own environment variables, and validates every key, type, range and finite number once, raising
``ConfigError`` that names the key, the file and the ``--set`` involved before any work starts; it also
records where each given key came from (``q2l config show``). ``load_config`` is the same without the
environment. Layers below receive the objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
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


class _Invalid(Exception):
    """A validation failure not yet attributed to a file or ``--set``: the message and the keys involved."""

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.message = message
        self.keys = keys


def _show(value: Any, limit: int = 80) -> str:
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
            raise _Invalid(f"{key} holds more than {_MAX_PLAIN_VALUES} values", key)
        if isinstance(item, float) and not math.isfinite(item):
            raise _Invalid(f"{where} = {item!r} must be a finite number", key)
        if isinstance(item, (dict, list)):
            if id(item) in parents:
                raise _Invalid(f"{where} refers to itself (a recursive YAML alias)", key)
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
            with contextlib.suppress(_Invalid):
                return _coerce(value, arg, key)
        raise _Invalid(f"{key} = {_show(value)} is not a valid {_type_name(tp)}", key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise _Invalid(f"{key} = {_show(value)} must be one of {', '.join(map(repr, choices))}", key)
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(f"{key} = {_show(value)} must be a mapping", key)
        _, vt = typing.get_args(tp)
        for k in value:
            if not isinstance(k, str):
                raise _Invalid(f"{key} has a key {_show(k)} that is not text", key)
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
                raise _Invalid(f"{key} = {_show(value)} is too large for a float", key) from None
            if not math.isfinite(number):
                raise _Invalid(f"{key} = {value!r} must be a finite number", key)
            return number
    elif tp is str and isinstance(value, str):
        return value
    raise _Invalid(f"{key} = {_show(value)} must be of type {_type_name(tp)}", key)


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
        raise _Invalid(f"{key} = {_show(value)} is out of range {span}", key)


def _build_section(cls: type, raw: Any, section: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _Invalid(f"section {section!r} must be a mapping, got {_show(raw)}", section)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        key = f"{section}.{unknown[0]}"
        raise _Invalid(f"unknown key {key} (known in {section}: {', '.join(fields)})", key)
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
        raise _Invalid(
            f"model.hidden_dim = {m.hidden_dim} must divide by model.num_heads = {m.num_heads}",
            "model.hidden_dim",
            "model.num_heads",
        )
    if m.hidden_dim % 4:
        raise _Invalid(f"model.hidden_dim = {m.hidden_dim} is not a multiple of 4", "model.hidden_dim")
    if cfg.data.format == "csv" and not (cfg.data.train_file and cfg.data.test_file):
        raise _Invalid(
            "data.train_file and data.test_file are required when data.format = 'csv'",
            "data.format",
            "data.train_file",
            "data.test_file",
        )
    if cfg.train.precision == "fp16" and not cfg.ray.use_gpu:
        raise _Invalid(
            "train.precision = 'fp16' needs a GPU (ray.use_gpu = true); use 'bf16' on CPU",
            "train.precision",
            "ray.use_gpu",
        )


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}


def _validate(raw: Any) -> Config:
    """The one validation of a nested dict; raises ``_Invalid`` naming the keys involved."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _Invalid(f"the top level must be a mapping of sections, got {_show(raw)}")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - set(hints), key=str)
    if unknown:
        raise _Invalid(f"unknown section {unknown[0]!r} (sections: {', '.join(hints)})", str(unknown[0]))
    cfg = Config(**{name: _build_section(hints[name], raw.get(name), name) for name in hints})
    _check_consistency(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any] | None, source: str = "<dict>") -> Config:
    """Validate a nested dict into a ``Config``; errors name the key and ``source``."""
    try:
        return _validate(raw)
    except _Invalid as e:
        raise ConfigError(f"{source}: {e.message}") from None


class _DuplicateKey(Exception):
    pass


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader whose marks name the file; used with a duplicate-key check before construction."""


# YAML 1.1 reads 1e-4 (no dot) and 1.5e5 (unsigned exponent) as text; YAML 1.2, JSON and Python read numbers
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_duplicate_keys(loader: yaml.SafeLoader, root: yaml.Node) -> None:
    """Refuse a mapping that repeats a key (PyYAML silently keeps the last); ``<<`` merges may override."""
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:  # an alias: already checked
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                name: Any = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key_node.tag != _MERGE_TAG and isinstance(key_node, yaml.ScalarNode):
                    try:  # compare as YAML does: "1" and "0x1" are the same int key
                        name = loader.construct_object(key_node)
                    except (yaml.YAMLError, ValueError):
                        name = key_node.value
                    line = key_node.start_mark.line + 1
                    if name in first_line:
                        dotted = f"{path}.{name}" if path else str(name)
                        raise _DuplicateKey(
                            f"duplicate key {dotted!r} at line {line} (first at line {first_line[name]}); "
                            "YAML would silently keep the last one"
                        )
                    first_line[name] = line
                child_path = f"{path}.{name}" if path else str(name)
                stack.append((value_node, path if key_node.tag == _MERGE_TAG else child_path))


def _load_yaml(text: str, name: str) -> Any:
    """Parse one YAML document with safe types; raises ``ConfigError`` prefixed with ``name``."""
    try:
        loader = _YamlLoader(text)  # reads the first chunk: a control character fails here
        loader.name = name
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_duplicate_keys(loader, node)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except _DuplicateKey as e:
        raise ConfigError(f"{name}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{name}: not valid YAML: nested too deeply") from None
    # ValueError: an int past Python's digit limit or an impossible date
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{name}: not valid YAML: {e}") from None


def _set_label(text: str, limit: int = 100) -> str:
    """How messages and ``config show`` name one override (a pasted 5,000-digit value is cut)."""
    return f"--set {text if len(text) <= limit else text[: limit - 3] + '...'}"


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` → ``("optim.lr", 3e-4)``; the value is parsed as YAML (1e-4, true, [a, b])."""
    key, sep, value = text.partition("=")
    key = key.strip()
    section, _, name = key.partition(".")
    if not sep or not section or not name:
        raise ConfigError(f"{_set_label(text)}: expected section.key=value")
    return key, _load_yaml(value, _set_label(text)) if value.strip() else None


# MLflow's own variables, used when neither the config file nor --set gives the key
ENVIRONMENT: dict[str, str] = {
    "mlflow.tracking_uri": "MLFLOW_TRACKING_URI",
    "mlflow.experiment": "MLFLOW_EXPERIMENT_NAME",
}


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated config and where each explicitly given key came from.

    ``sources`` maps ``section.key`` to the file path, ``--set KEY=VALUE`` or ``$VARIABLE``; keys absent
    from it hold the embedded defaults.
    """

    config: Config
    sources: dict[str, str]

    def to_annotated_yaml(self) -> str:
        """The resolved config as YAML (loadable by ``load_config``), each given key marked by its source."""
        lines = ["# resolved config: a key without a '# from' mark holds its default (q2l/config.py)"]
        for section, values in self.config.to_dict().items():
            lines.append(f"{section}:")
            for name, value in values.items():
                source = self.sources.get(f"{section}.{name}")
                mark = f"  # from {_one_line(source)}" if source else ""
                if isinstance(value, dict) and value:
                    block = yaml.safe_dump(
                        value, sort_keys=False, default_flow_style=False, allow_unicode=True
                    )
                    lines.append(f"  {name}:{mark}")
                    lines.extend(f"    {line}" for line in block.splitlines())
                else:
                    lines.append(f"  {name}: {_flow(value)}{mark}")
        return "\n".join(lines) + "\n"


def _flow(value: Any) -> str:
    """One YAML value on one line (strings with line breaks come out double-quoted with escapes)."""
    style = '"' if isinstance(value, str) and not value.isprintable() else None
    text = yaml.safe_dump(value, default_flow_style=True, default_style=style, width=float("inf"))
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _one_line(text: str) -> str:
    """A comment-safe rendering: YAML comments end at a line break and refuse control characters."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _read_config_file(path: str | Path) -> Any:
    """The parsed YAML of a config file; every failure is a ``ConfigError`` naming the file."""
    label = str(path)
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{label}: is a folder, not a config file")
    if p.exists() and not p.is_file():
        raise ConfigError(f"{label}: not a regular file")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{label}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{label}: cannot read the config file ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM from a Windows editor is harmless
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{label}: not UTF-8 text (byte {data[e.start]:#04x} at line {line}, offset {e.start}); "
            "save the file as UTF-8"
        ) from None
    raw = _load_yaml(text, label)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of sections, got {_show(raw)}")
    return raw or {}


def _related(a: str, b: str) -> bool:
    """Whether two dotted keys overlap (one is the other or inside it)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def resolve_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ResolvedConfig:
    """The one way a command gets its config: file, then every ``--set`` together, then the environment.

    Precedence: ``--set`` > config file > environment (``ENVIRONMENT``) > embedded default. All overrides
    are applied before the single validation, so a valid combination passes in any order; an error names
    the file and each ``--set`` (or variable) that gave a key involved.
    """
    environ = os.environ if environ is None else environ
    label = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = _read_config_file(path) if path is not None else {}
    sources: dict[str, str] = {}
    for section, values in raw.items():
        if isinstance(values, dict):
            sources.update({f"{section}.{name}": label for name in values})
    for text in overrides or []:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        values = raw.setdefault(section, {})
        if values is None:
            values = raw[section] = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{label} (with {_set_label(text)}): section {section!r} must be a mapping")
        values[name] = value
        sources[key] = _set_label(text)
    for key, variable in ENVIRONMENT.items():
        section, _, name = key.partition(".")
        values = raw.get(section) or {}
        if isinstance(values, dict) and name not in values and environ.get(variable):
            raw[section] = {**values, name: environ[variable]}
            sources[key] = f"${variable}"
    try:
        config = _validate(raw)
    except _Invalid as e:
        involved = [
            src for key, src in sources.items() if src != label and any(_related(key, k) for k in e.keys)
        ]
        where = f"{label} (with {', '.join(dict.fromkeys(involved))})" if involved else label
        raise ConfigError(f"{where}: {e.message}") from None
    return ResolvedConfig(config, sources)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML; None means all defaults) with ``--set`` overrides, ignoring the environment.

    Commands use ``resolve_config``, which also honours ``MLFLOW_TRACKING_URI``/``MLFLOW_EXPERIMENT_NAME``.
    """
    return resolve_config(path, overrides, environ={}).config
