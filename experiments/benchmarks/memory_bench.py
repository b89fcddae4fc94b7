"""Part e: peak training memory per image, for one model, over a few batch sizes.

Each batch size builds the model and the Engine (default precision policy unless ``variant`` says otherwise)
and runs a few training steps on a synthetic batch.

- CPU: the peak resident set (``VmHWM``) of a fresh Python process per batch size, so that no earlier,
  larger batch's pages are counted; the mark is reset after the model is built where Linux allows it
  (``/proc/self/clear_refs``), else it is the process's lifetime peak.
- CUDA: ``torch.cuda.max_memory_allocated`` (tensors, not the allocator's cache), in this process, reset
  per batch size.

Memory per image is the slope of a least-squares line through (batch size, peak); the intercept is the fixed
part (interpreter and libraries on CPU, weights, optimizer state and EMA).

    python -m experiments.benchmarks.memory_bench --backbone tf_efficientnet_lite0 --image-size 128 \\
        --batch-sizes 8 16 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .common import resolve_device, write_json

REPO = Path(__file__).resolve().parents[2]


def rss_mib(field: str = "VmHWM") -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (current) of this process in MiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line (not Linux?)")


def measure(
    backbone: str,
    image_size: int,
    batch_size: int,
    *,
    steps: int = 2,
    device: str = "cpu",
    variant: str = "default",
    activation_checkpointing: bool = False,
    threads: int | None = None,
) -> dict:
    """Peak memory (MiB) of ``steps`` training steps at ``batch_size``, in this process."""
    from .seed_baseline import build_trainer, model_section, synthetic_batch, time_steps
    from .train_step_bench import reset_peak_rss

    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    model = model_section(backbone, activation_checkpointing=activation_checkpointing)
    row: dict = {"batch_size": batch_size}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    trainer = build_trainer(variant, model, image_size, batch_size, dev)
    images, targets = synthetic_batch(batch_size, image_size)
    x = trainer.host_batch(images)
    if dev.type == "cuda":
        row["after_build_mib"] = torch.cuda.memory_allocated(dev) / 2**20
        time_steps(trainer, x, targets, steps, dev)
        row["peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        row["after_build_mib"] = rss_mib("VmRSS")
        row["peak_since_build"] = reset_peak_rss()
        time_steps(trainer, x, targets, steps, dev)
        row["peak_mib"] = rss_mib("VmHWM")
    del trainer, x
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _measure_in_child(kwargs: dict) -> dict:
    """``measure`` in a fresh interpreter (peak RSS is per process)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    code = (
        "import json, sys; from experiments.benchmarks.memory_bench import measure; "
        "print(json.dumps(measure(**json.loads(sys.argv[1]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], cwd=REPO, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory_bench child {kwargs} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept of ``ys`` against ``xs`` (at least two distinct xs)."""
    if len(set(xs)) < 2:
        raise ValueError(f"need at least two different batch sizes, got {xs}")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def run(
    backbone: str = "tf_efficientnet_lite0",
    image_size: int = 128,
    batch_sizes: tuple[int, ...] = (8, 16, 32),
    *,
    steps: int = 2,
    device: str = "auto",
    variant: str = "default",
    activation_checkpointing: bool = False,
    threads: int | None = 1,
    out_json: str | Path | None = None,
) -> dict:
    """Peak memory at each batch size and the per-image slope; prints a table, optionally writes JSON."""
    dev = resolve_device(device)
    common = {
        "backbone": backbone,
        "image_size": image_size,
        "steps": steps,
        "device": str(dev),
        "variant": variant,
        "activation_checkpointing": activation_checkpointing,
        "threads": threads,
    }
    rows = []
    for b in batch_sizes:
        kwargs = {**common, "batch_size": b}
        rows.append(measure(**kwargs) if dev.type == "cuda" else _measure_in_child(kwargs))
    slope, intercept = fit_line([r["batch_size"] for r in rows], [r["peak_mib"] for r in rows])
    result = {
        **common,
        "measure": "cuda max_memory_allocated"
        if dev.type == "cuda"
        else "host peak RSS (VmHWM), fresh process",
        "rows": rows,
        "per_image_mib": slope,
        "fixed_mib": intercept,
    }
    print(describe(result))
    if out_json is not None:
        write_json(out_json, result)
    return result


def describe(result: dict) -> str:
    """The part-e table."""
    ckpt = ", activation checkpointing" if result["activation_checkpointing"] else ""
    lines = [
        f"{result['backbone']} @ {result['image_size']} px, {result['variant']}{ckpt}, {result['device']}: "
        f"{result['measure']}",
        f"{'batch':>6}{'after build MiB':>17}{'peak MiB':>10}",
    ]
    lines += [
        f"{r['batch_size']:>6}{r['after_build_mib']:>17.0f}{r['peak_mib']:>10.0f}" for r in result["rows"]
    ]
    lines.append(f"per image {result['per_image_mib']:.1f} MiB, fixed {result['fixed_mib']:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--variant", default="default")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    run(
        a.backbone,
        a.image_size,
        tuple(a.batch_sizes),
        steps=a.steps,
        device=a.device,
        variant=a.variant,
        activation_checkpointing=a.activation_checkpointing,
        threads=a.threads,
        out_json=a.out,
    )


if __name__ == "__main__":
    main()
