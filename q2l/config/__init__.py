"""Typed run configuration: one object per run, loaded from YAML, overridden with ``--set``, validated once.

A config is a tree of frozen-ish dataclasses (``Config.data``, ``Config.model`` …). ``resolve_config`` (what
every command uses) reads a YAML file, applies all ``section.key=value`` overrides, fills unset MLflow keys
from MLflow's own environment variables, and validates every key, type, range and finite number once, raising
``ConfigError`` that names the key, the file and the ``--set`` involved before any work starts; it also
records where each given key came from (``q2l config show``). ``load_config`` is the same without the
environment. Layers below receive the objects.
"""

from q2l.config.resolve import ENVIRONMENT, ResolvedConfig, load_config, parse_override, resolve_config
from q2l.config.schema import (
    SECTIONS,
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    MlflowConfig,
    ModelConfig,
    OptimConfig,
    PromoteConfig,
    RayConfig,
    TrainConfig,
    TuneConfig,
    config_from_dict,
)

__all__ = [
    "ENVIRONMENT",
    "SECTIONS",
    "Config",
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "MlflowConfig",
    "ModelConfig",
    "OptimConfig",
    "PromoteConfig",
    "RayConfig",
    "ResolvedConfig",
    "TrainConfig",
    "TuneConfig",
    "config_from_dict",
    "load_config",
    "parse_override",
    "resolve_config",
]
