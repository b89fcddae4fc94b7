"""Shared by the benchmark scripts: the device choice, the JSON writer, which matmul peaks an MFU may use.

Imports torch and q2l's engine only: gpu.sh runs the benchmarks where only torch, torchvision and timm are
installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from q2l.engine import cpu_bf16_supported


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` (folders created; values JSON lacks written as ``str``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def native_precisions(device: torch.device) -> tuple[str, ...]:
    """The precisions whose matmul peak is a fair MFU denominator on ``device``.

    A GPU runs fp32, bf16 and fp16 natively. A CPU runs fp32, and bf16 only where it has native bf16
    instructions; elsewhere (and fp16 on any CPU) the kernels emulate the type, so a "peak" measured there
    says nothing about the hardware: no MFU is reported against it.
    """
    if torch.device(device).type == "cuda":
        return ("fp32", "bf16", "fp16")
    return ("fp32", "bf16") if cpu_bf16_supported() else ("fp32",)


def utilisation(achieved_flops: float, precision: str, peaks: dict[str, float]) -> float | None:
    """``achieved_flops`` as a share of the measured peak for ``precision``; None where none applies."""
    peak = peaks.get(precision)
    return achieved_flops / peak if peak else None
