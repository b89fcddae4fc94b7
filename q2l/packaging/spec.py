"""The packaged model's description (``q2l_model.json``): what it holds and how every field is checked.

A description from a model store or a checkpoint is untrusted input. Every field is checked before anything
is built: types, the architecture's ranges (those of ``q2l.config.ModelConfig``, applied by the config's own
validation), a backbone timm knows, label names (unique, non-empty strings), the image size (the range of
``data.image_size``), mean/std (three finite numbers each, std positive) and the format version. A model of
``hidden_dim: 32768`` is therefore refused by range, never allocated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

import q2l
from q2l.models import Query2Label

MODEL_JSON = "q2l_model.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1
# a description is a few kB; one far larger is not read at all
MAX_SPEC_BYTES = 8 * 2**20
# the label queries and the head grow with the label count; beyond this a model is no q2l model
MAX_LABELS = 100_000
# the ``Query2Label(...)`` arguments a description holds; the first group is ``ModelConfig``'s
CONFIG_ARCH_KEYS = (
    "backbone",
    "hidden_dim",
    "num_heads",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "dropout",
    "decoder_self_attn",
)
ARCH_KEYS = (*CONFIG_ARCH_KEYS, "num_classes", "input_proj")
SPEC_KEYS = ("architecture", "label_names", "image_size", "mean", "std", "q2l_version", "format_version")


class PackagingError(Exception):
    """A model that cannot be packaged or loaded; the message names the file, key or URI."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_label_names(value: Any, source: str) -> list[str]:
    """``value`` as label names: a non-empty list of unique non-empty strings (at most ``MAX_LABELS``)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise PackagingError(
            f"{source}: label_names must be a non-empty list of strings, got {_short(value)}"
        )
    if len(value) > MAX_LABELS:
        raise PackagingError(f"{source}: label_names has {len(value)} entries (at most {MAX_LABELS})")
    bad = next((v for v in value if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise PackagingError(f"{source}: label_names must be non-empty strings, got {_short(bad)}")
    if len(set(value)) != len(value):
        repeated = sorted({v for v in value if value.count(v) > 1})[:5]
        raise PackagingError(f"{source}: label_names must be unique, repeated: {repeated}")
    return list(value)


def check_image_size(value: Any, source: str) -> int:
    """``value`` as an input size: an int within ``data.image_size``'s range."""
    from q2l.config import ConfigError, config_from_dict

    if not _is_int(value):
        raise PackagingError(f"{source}: image_size must be an integer, got {_short(value)}")
    try:
        config_from_dict({"data": {"image_size": value}})
    except ConfigError as e:
        raise PackagingError(f"{source}: {str(e).split(': ', 1)[1].removeprefix('data.')}") from None
    return value


def _check_mean_std(value: Any, key: str, source: str) -> tuple[float, float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    numbers = tuple(float(v) for v in value) if ok else ()
    if not ok or not all(math.isfinite(v) for v in numbers):
        raise PackagingError(f"{source}: {key} must be 3 finite numbers, got {_short(value)}")
    # mean is in the [0, 1] pixel scale; std divides, so it must be positive
    in_range = all(0.0 <= v <= 1.0 for v in numbers) if key == "mean" else all(v > 0 for v in numbers)
    if not in_range:
        rule = "within [0, 1]" if key == "mean" else "positive"
        raise PackagingError(f"{source}: {key} values must be {rule}, got {list(numbers)}")
    return numbers  # type: ignore[return-value]


def check_architecture(value: Any, num_labels: int, source: str) -> dict[str, Any]:
    """``value`` as ``Query2Label(...)`` arguments, checked with ``ModelConfig``'s types, ranges and rules.

    ``num_classes`` must equal ``num_labels``, ``input_proj`` is a bool, and the backbone a timm model name.
    """
    import timm

    from q2l.config import ConfigError, config_from_dict

    if not isinstance(value, Mapping):
        raise PackagingError(f"{source}: architecture must be a JSON object, got {_short(value)}")
    missing = [k for k in ARCH_KEYS if k not in value]
    unknown = sorted(str(k) for k in value if k not in ARCH_KEYS)
    if missing or unknown:
        raise PackagingError(
            f"{source}: architecture keys: missing {missing or 'none'}, unknown {unknown or 'none'}"
        )
    try:
        config_from_dict({"model": {k: value[k] for k in CONFIG_ARCH_KEYS} | {"pretrained": False}})
    except ConfigError as e:
        reason = str(e).split(": ", 1)[1].replace("model.", "architecture.")
        raise PackagingError(f"{source}: {reason}") from None
    if not timm.is_model(value["backbone"]):
        raise PackagingError(f"{source}: architecture.backbone = {value['backbone']!r} is not a timm model")
    if not _is_int(value["num_classes"]) or value["num_classes"] != num_labels:
        raise PackagingError(
            f"{source}: architecture.num_classes = {_short(value['num_classes'])} but there are "
            f"{num_labels} label names"
        )
    if not isinstance(value["input_proj"], bool):
        raise PackagingError(f"{source}: architecture.input_proj must be true or false")
    return dict(value)


def check_spec_fields(raw: Any, source: str) -> dict[str, Any]:
    """Every field of a description, checked; the ``ModelSpec`` arguments (errors name ``source``)."""
    if not isinstance(raw, Mapping):
        raise PackagingError(f"{source}: expected a JSON object, got {_short(raw)}")
    missing = [k for k in SPEC_KEYS if k not in raw and k != "q2l_version"]
    unknown = sorted(str(k) for k in raw if k not in SPEC_KEYS)
    if missing or unknown:
        raise PackagingError(f"{source}: keys: missing {missing or 'none'}, unknown {unknown or 'none'}")
    version = raw["format_version"]
    if not _is_int(version) or version != FORMAT_VERSION:
        raise PackagingError(f"{source}: format_version = {_short(version)}, this q2l reads {FORMAT_VERSION}")
    q2l_version = raw.get("q2l_version", "unknown")
    if not isinstance(q2l_version, str) or len(q2l_version) > 100:
        raise PackagingError(f"{source}: q2l_version must be a short string, got {_short(q2l_version)}")
    labels = check_label_names(raw["label_names"], source)
    return {
        "architecture": check_architecture(raw["architecture"], len(labels), source),
        "label_names": labels,
        "image_size": check_image_size(raw["image_size"], source),
        "mean": _check_mean_std(raw["mean"], "mean", source),
        "std": _check_mean_std(raw["std"], "std", source),
        "q2l_version": q2l_version,
        "format_version": version,
    }


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class ModelSpec:
    """What travels with the weights: Query2Label arguments, labels (output order) and preprocessing.

    Constructing one checks every field (``check_spec_fields``); ``PackagingError`` names what is wrong.
    """

    architecture: dict[str, Any]
    label_names: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    q2l_version: str = q2l.__version__
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        checked = check_spec_fields(asdict(self), "model description")
        self.mean, self.std = checked["mean"], checked["std"]

    def to_json(self) -> str:
        """The JSON document stored as ``q2l_model.json``."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelSpec:
        """Read and check ``q2l_model.json``; errors name the file and the field."""
        try:
            size = Path(path).stat().st_size
            if size > MAX_SPEC_BYTES:
                raise PackagingError(
                    f"{path}: {size} bytes, a model description has at most {MAX_SPEC_BYTES}"
                )
            raw = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PackagingError(f"{path}: not a readable q2l model description ({e})") from None
        except RecursionError:
            raise PackagingError(
                f"{path}: not a readable q2l model description (nested too deeply)"
            ) from None
        return cls(**check_spec_fields(raw, str(path)))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def architecture_of(model: Query2Label) -> dict[str, Any]:
    """The ``Query2Label(...)`` keyword arguments that rebuild ``model``'s architecture.

    Read from the modules themselves (the model does not keep its constructor arguments), so whatever built
    the model (config, notebook, test) is described the same way. A strict ``load_state_dict`` when loading
    catches any shape disagreement.
    """
    model = unwrap(model)
    if not isinstance(model, Query2Label):
        raise PackagingError(f"expected a Query2Label model, got {type(model).__name__}")
    first_dec = model.transformer.decoder[0]
    return {
        "backbone": model.backbone.name,
        "num_classes": model.num_classes,
        "hidden_dim": model.hidden_dim,
        "num_heads": first_dec.cross_attn.num_heads,
        "enc_layers": len(model.transformer.encoder),
        "dec_layers": len(model.transformer.decoder),
        "dim_feedforward": first_dec.linear1.out_features,
        "dropout": first_dec.dropout.p,
        "decoder_self_attn": first_dec.self_attn is not None,
        "input_proj": not isinstance(model.input_proj, nn.Identity),
    }


def model_spec(model: Query2Label, label_names: list[str], image_size: int) -> ModelSpec:
    """Describe ``model`` (architecture + its ``data_config`` mean/std) with its labels and input size."""
    model = unwrap(model)
    dc = model.data_config
    return ModelSpec(
        architecture=architecture_of(model),
        label_names=list(label_names),
        image_size=image_size,
        mean=tuple(float(v) for v in dc["mean"]),
        std=tuple(float(v) for v in dc["std"]),
    )
