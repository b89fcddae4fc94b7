"""Resolving a command's config: the file, all ``--set`` overrides, MLflow's environment, validated once,
with where each given key came from (``q2l config show``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from q2l.config.schema import Config, ConfigError, Invalid, validate_raw
from q2l.config.yaml_file import load_yaml, read_config_file


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
    return key, load_yaml(value, _set_label(text)) if value.strip() else None


# MLflow's own variables, used when neither the config file nor --set gives the key
ENVIRONMENT: dict[str, str] = {
    "mlflow.tracking_uri": "MLFLOW_TRACKING_URI",
    "mlflow.experiment": "MLFLOW_EXPERIMENT_NAME",
    # Optuna has no variable of its own: a cluster names its study database for the sweeps run on it
    "tune.storage": "Q2L_OPTUNA_STORAGE",
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
        lines = ["# resolved config: a key without a '# from' mark holds its default (q2l/config/schema.py)"]
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
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
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
        config = validate_raw(raw)
    except Invalid as e:
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
