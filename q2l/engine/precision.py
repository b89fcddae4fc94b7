"""Autocast policy: which dtype the forward runs in, whether a GradScaler is needed, and the memory format.

``auto`` picks bf16 on CUDA (fp16 on GPUs without bf16) and bf16 on CPUs that compute it natively (AVX-512
BF16 / AMX, detected by oneDNN and confirmed by a tiny autocast matmul), else fp32. The loss is always
computed in fp32 on the logits by the engine (docs/design.md §3), so only the model runs in reduced precision.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@functools.cache
def cpu_bf16_supported() -> bool:
    """True when this CPU runs bf16 natively: oneDNN reports bf16 support and a bf16 autocast matmul works."""
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if not torch.backends.mkldnn.is_available() or mkldnn_bf16 is None or not mkldnn_bf16():
        return False
    # the probe guards against builds where the flag is set but the CPU autocast path is broken
    try:
        a = torch.arange(64, dtype=torch.float32).reshape(8, 8) / 64
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = a @ a
        return out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    except RuntimeError as e:  # an unsupported kernel raises at call time
        log.info("bf16 probe on CPU failed (%s); using fp32", e)
        return False


@dataclass(frozen=True)
class PrecisionPolicy:
    """How the model runs: ``dtype`` None means plain fp32 (autocast off); ``use_scaler`` for fp16."""

    device_type: str
    dtype: torch.dtype | None
    use_scaler: bool
    channels_last: bool

    @property
    def name(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def memory_format(self) -> torch.memory_format:
        """The memory format images and 4-d weights are kept in."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for the forward pass (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_precision(
    precision: str, device: torch.device | str, channels_last: bool | None = None
) -> PrecisionPolicy:
    """Turn ``train.precision`` / ``train.channels_last`` into a policy for ``device``.

    ``channels_last=None`` turns it on: NHWC lets oneDNN (CPU) and cuDNN (tensor cores) pick their fast
    convolution kernels. Measured with experiments/benchmarks/train_step_bench.py (Query2Label-Lite0, 128 px,
    batch 32, one train step): Xeon CPU with AMX, 16 threads, fp32 0.49 s → 0.39 s, bf16 0.49 s → 0.38 s;
    H200 batch 256 bf16 55 → 48 ms. Only tiny launch-bound GPU steps (batch 32 at 128 px, ~30 ms) lose (+20%).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision = {precision!r} must be one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    kind = device.type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {device} is not supported (use cpu or cuda)")
    if kind == "cuda":
        if precision in ("auto", "bf16"):
            if torch.cuda.is_bf16_supported():
                dtype = torch.bfloat16
            elif precision == "bf16":
                raise ValueError(f"train.precision = 'bf16': {torch.cuda.get_device_name(device)} lacks bf16")
            else:
                dtype = torch.float16
        else:
            dtype = {"fp32": None, "fp16": torch.float16}[precision]
    else:
        if precision == "fp16":
            raise ValueError("train.precision = 'fp16' needs a CUDA device (GradScaler); use 'bf16' on CPU")
        if precision == "fp32":
            dtype = None
        elif cpu_bf16_supported():
            dtype = torch.bfloat16
        else:
            # explicit bf16 would run emulated (several times slower than fp32): fall back, and say so
            if precision == "bf16":
                log.warning("train.precision = 'bf16' but this CPU lacks native bf16; running in fp32")
            dtype = None
    if channels_last is None:
        channels_last = True
    return PrecisionPolicy(kind, dtype, use_scaler=dtype == torch.float16, channels_last=channels_last)


class _Fp32Forward:
    """A module's forward run with CPU autocast off on fp32 input; the output is cast back to the autocast
    dtype, so the next layer sees what it would have seen without this wrapper."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled("cpu"):
            return self.forward(x)
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            return self.forward(x.float()).to(dtype)


def fp32_depthwise_convs(model: nn.Module) -> int:
    """Make the depthwise convolutions of ``model`` compute in fp32 under CPU bf16 autocast; returns how many.

    oneDNN's bf16 depthwise convolutions (groups == channels: EfficientNet, MobileNet, ConvNeXt) are slower
    than its fp32 channels_last ones, backward above all (AVX-512-BF16, one thread, forward + backward per
    layer: 2-4x), while bf16 pays off for dense and pointwise convolutions and matmuls (3-5x). Parameter
    names are unchanged (the forward is wrapped, the module stays), and ``copy.deepcopy`` (the EMA) keeps it.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            module.forward = _Fp32Forward(module.forward)
            count += 1
    return count
