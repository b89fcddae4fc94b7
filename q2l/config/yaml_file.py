"""Reading a config file: UTF-8 text, one YAML document, no duplicate keys; errors name the file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from q2l.config.schema import ConfigError, show_value


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


def load_yaml(text: str, name: str) -> Any:
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


def read_config_file(path: str | Path) -> Any:
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
    raw = load_yaml(text, label)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of sections, got {show_value(raw)}")
    return raw or {}
