"""One training step of Query2Label through the real Engine: fp32 NCHW vs bf16 vs bf16 + channels_last.

Each variant builds a fresh model and Engine (AdamW, OneCycle, EMA, ASL loss, on-device normalisation of uint8
batches), runs ``warmup`` steps, then times ``steps`` steps and reports the median. Alongside: images/s, model
FLOPs per image (forward, counted with ``torch.utils.flop_counter.FlopCounterMode``), the achieved FLOP/s of
a training step taken as 3 × forward FLOPs (backward ≈ 2 × forward: the counter's own backward count is
unusable, torch 2.14 counts a grouped convolution's weight gradient as if it were dense, ``groups`` times too
much for depthwise convolutions) as a share of a matmul peak measured in the same run for the same dtype
(none where the device only emulates that dtype), the peak host RSS of the variant and, on CUDA,
``torch.cuda.max_memory_allocated``.

    python -m experiments.benchmarks.train_step_bench --backbone tf_efficientnet_lite0 --image-size 128 \\
        --batch-size 32 --precisions fp32 bf16 bf16+cl --out results/bench/train_step.json

Variants are ``fp32``, ``bf16`` or ``fp16`` (CUDA), with ``+cl`` for channels_last (default NCHW).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from q2l.config import config_from_dict
from q2l.engine import Engine, seed_everything
from q2l.losses import build_loss
from q2l.models import build_model

from .common import native_precisions, resolve_device, utilisation, write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of a square matmul (n = 8192 on CUDA, 1024 on CPU), best of ``repeats`` after a warm-up."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib(reset_worked: bool) -> float:
    if reset_worked:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak (KiB on Linux)


def _parse_variant(variant: str) -> tuple[str, bool]:
    precision, _, layout = variant.partition("+")
    if precision not in ("fp32", "bf16", "fp16") or layout not in ("", "cl"):
        raise ValueError(f"variant {variant!r}: expected fp32|bf16|fp16 with optional +cl")
    return precision, layout == "cl"


def forward_flops_per_image(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Forward FLOPs per image (matmuls, convolutions, attention) for float ``images`` [B,3,S,S]."""
    # with autograd on: FlopCounterMode's module tracker hooks gradients and fails under no_grad (torch 2.11)
    with FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops() / images.shape[0]


def bench_variant(
    variant: str,
    backbone: str,
    image_size: int,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
) -> dict:
    """Time ``steps`` Engine.train_step calls (after ``warmup``) for one precision/layout variant."""
    precision, channels_last = _parse_variant(variant)
    cfg = config_from_dict(
        {
            "model": {"backbone": backbone, "pretrained": False, "hidden_dim": 256},
            "train": {
                "epochs": 1,
                "batch_size": batch_size,
                "precision": precision,
                "channels_last": channels_last,
            },
            "data": {"image_size": image_size},
            "ray": {"use_gpu": device.type == "cuda"},
        },
        "train_step_bench",
    )
    reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(0)
    model = build_model(cfg.model, num_classes=80)
    engine = Engine(model, build_loss(cfg.loss), cfg, steps_per_epoch=warmup + steps + 1, device=device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    targets = (torch.rand(batch_size, 80, generator=g) < 0.05).float()
    if device.type == "cuda":
        images, targets = images.pin_memory(), targets.pin_memory()
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t = time.perf_counter()
        engine.train_step(images, targets)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    # FLOPs do not depend on the precision: count them once per variant in fp32 on the engine's model
    flops_img = forward_flops_per_image(engine.model, images.to(device).float() / 255)
    flops_step = 3 * flops_img * batch_size
    step_s = statistics.median(times)
    return {
        "variant": variant,
        "precision": engine.precision.name,
        "channels_last": engine.precision.channels_last,
        "step_s": step_s,
        "step_s_all": times,
        "images_per_s": batch_size / step_s,
        "gflop_per_image_fwd": flops_img / 1e9,
        "gflop_per_step_train_3x_fwd": flops_step / 1e9,
        "achieved_tflops": flops_step / step_s / 1e12,
        "peak_rss_mib": _peak_rss_mib(reset),
        "peak_rss_per_variant": reset,
        "cuda_max_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else None,
    }


def run(
    backbone: str = "tf_efficientnet_lite0",
    image_size: int = 128,
    batch_size: int = 32,
    precisions: tuple[str, ...] = ("fp32", "bf16", "bf16+cl"),
    out_json: str | Path | None = None,
    steps: int = 5,
    warmup: int = 2,
    device: str = "auto",
) -> dict:
    """Benchmark every variant in ``precisions``; print a table, optionally write JSON; return the results."""
    dev = resolve_device(device)
    peaks = {name: matmul_peak(dev, DTYPES[name]) for name in native_precisions(dev)}
    rows = []
    for variant in precisions:
        row = bench_variant(variant, backbone, image_size, batch_size, steps, warmup, dev)
        peak = peaks.get(row["precision"])
        row["matmul_peak_tflops"] = peak / 1e12 if peak else None
        row["utilisation"] = utilisation(row["achieved_tflops"] * 1e12, row["precision"], peaks)
        rows.append(row)
    result = {
        "backbone": backbone,
        "image_size": image_size,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
        "results": rows,
    }
    _print_table(result)
    if out_json is not None:
        write_json(out_json, result)
    return result


def _print_table(result: dict) -> None:
    print(
        f"{result['backbone']} @ {result['image_size']} px, batch {result['batch_size']}, "
        f"{result['device']}, {result['threads']} threads, torch {result['torch']}; "
        f"median of {result['steps']} steps after {result['warmup']} warm-up"
    )
    peaks = ", ".join(f"{k} {v:.3g}" for k, v in result["matmul_peak_tflops"].items())
    print(f"matmul peak TFLOP/s: {peaks}")
    print(
        f"{'variant':<9} {'step s':>8} {'img/s':>8} {'GFLOP/img':>9} {'TFLOP/s':>8} {'util':>6} "
        f"{'RSS MiB':>8} {'CUDA MiB':>9}"
    )
    for r in result["results"]:
        cuda = (
            f"{r['cuda_max_allocated_mib']:9.0f}" if r["cuda_max_allocated_mib"] is not None else f"{'-':>9}"
        )
        util = f"{r['utilisation']:6.1%}" if r["utilisation"] is not None else f"{'-':>6}"
        print(
            f"{r['variant']:<9} {r['step_s']:8.4f} {r['images_per_s']:8.1f} {r['gflop_per_image_fwd']:9.3f} "
            f"{r['achieved_tflops']:8.4f} {util} {r['peak_rss_mib']:8.0f} {cuda}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "bf16+cl"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    run(a.backbone, a.image_size, a.batch_size, tuple(a.precisions), a.out, a.steps, a.warmup, a.device)


if __name__ == "__main__":
    main()
