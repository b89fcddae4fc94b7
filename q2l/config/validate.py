"""Validation of a raw (YAML-shaped) config: keys, types, ranges, finite numbers, consistency; once."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from typing import Any, Literal

from q2l.config.schema import Config, ConfigError


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
