"""Benchmark: vectorised ``average_precision`` vs a per-class scikit-learn loop on COCO val size.

Usage: python experiments/benchmarks/metrics_bench.py [out.json] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from q2l.metrics import average_precision, summarize

NUM_IMAGES, NUM_CLASSES = 40_504, 80  # COCO 2014 val


def _reference(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Straightforward per-class loop over scikit-learn's average_precision_score."""
    from sklearn.metrics import average_precision_score

    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        if targets[:, c].any():
            out[c] = average_precision_score(targets[:, c], scores[:, c])
    return out


def _time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run(out_json: str | None = None, repeats: int = 3, threads: int | None = None) -> dict:
    """Time both implementations on random COCO-sized data (scores rounded to 3 decimals: many ties)."""
    if threads is not None:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(NUM_IMAGES, NUM_CLASSES, generator=g) < 0.03).float()
    scores = (0.3 * targets + 0.7 * torch.rand(NUM_IMAGES, NUM_CLASSES, generator=g)).round(decimals=3)
    scores_np, targets_np = scores.numpy().astype(np.float64), targets.numpy()

    average_precision(scores[:1000], targets[:1000])  # warm-up (allocator, kernels)
    t_vec, ap = _time(lambda: average_precision(scores, targets), repeats)
    t_sum, _ = _time(lambda: summarize(scores, targets), repeats)
    t_ref, ref = _time(lambda: _reference(scores_np, targets_np), 1)
    max_diff = float(np.nanmax(np.abs(ap.numpy() - ref)))

    result = {
        "num_images": NUM_IMAGES,
        "num_classes": NUM_CLASSES,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "average_precision_s": round(t_vec, 4),
        "summarize_s": round(t_sum, 4),
        "sklearn_loop_s": round(t_ref, 4),
        "speedup": round(t_ref / t_vec, 1),
        "max_abs_diff_vs_sklearn": max_diff,
    }
    print(f"{'implementation':<34}{'seconds':>10}")
    print(f"{'average_precision (vectorised)':<34}{t_vec:>10.3f}")
    print(f"{'summarize (AP + F1 tables)':<34}{t_sum:>10.3f}")
    print(f"{'sklearn per-class loop':<34}{t_ref:>10.3f}")
    print(
        f"speedup {result['speedup']}x, max |AP diff| vs sklearn {max_diff:.2e}, "
        f"threads {result['torch_threads']}"
    )
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_json", nargs="?", default=None, help="write the figures to this JSON file")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run(args.out_json, repeats=args.repeats, threads=args.threads)
