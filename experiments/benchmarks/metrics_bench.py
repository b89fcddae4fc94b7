"""Benchmark: q2l's vectorised per-class AP vs torchmetrics' multilabel AP and a per-class scikit-learn loop.

q2l/metrics.py keeps its own AP (one sort of the whole [N, C] matrix and cumulative sums) only because it is
faster than the libraries; the thresholded and top-k precision/recall come from torchmetrics. Random data,
~3 % positives, scores rounded to 3 decimals (many ties); see ``measure`` for how it is timed.

Measured 2026-12-01 (torch 2.14.1, torchmetrics 1.9.0, scikit-learn 1.9.1; AMD EPYC, 1 torch thread; CPU
seconds, median of 7 interleaved rounds; a 2-core machine shared with other jobs, load average 3 to 28):

    images × classes   q2l AP s   torchmetrics s   sklearn loop s   torchmetrics / q2l   sklearn / q2l
    5,000 × 80          0.039        0.078             0.55             2.0×              14×
    40,504 × 80         0.35         0.63              0.78             1.8×              2.2×

Over five runs under that load the ratios ranged 1.0-2.0× (torchmetrics) and 9-25× (sklearn) at 5,000 × 80,
1.1-1.8× and 1.2-2.2× at 40,504 × 80. q2l's AP equals scikit-learn's to 2e-16; torchmetrics' differs by up
to 8e-8 (it divides in float32). ``summarize`` (AP + the thresholded and top-3 tables, whose precision and
recall torchmetrics computes) took 0.089 s and 0.77 s.

    python -m experiments.benchmarks.metrics_bench results/bench/metrics.json --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from q2l.metrics import average_precision, summarize

from .common import write_json

NUM_CLASSES = 80
SIZES = (5_000, 40_504)  # a held-out split; COCO 2014 val


def _sklearn_loop(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Straightforward per-class loop over scikit-learn's average_precision_score."""
    from sklearn.metrics import average_precision_score

    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        if targets[:, c].any():
            out[c] = average_precision_score(targets[:, c], scores[:, c])
    return out


def _torchmetrics(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """torchmetrics' exact (``thresholds=None``) multilabel AP per class, without argument validation."""
    from torchmetrics.functional.classification import multilabel_average_precision

    return multilabel_average_precision(
        scores, targets, num_labels=scores.shape[1], average="none", thresholds=None, validate_args=False
    )


def measure(num_images: int, repeats: int = 3) -> dict:
    """CPU seconds of the three AP implementations (and ``summarize``) on ``num_images`` × 80 random scores.

    Process CPU time, not the wall clock: on a machine shared with other jobs it measures the work done, which
    the load does not stretch (with one torch thread they agree on an idle machine). The implementations
    alternate within each of ``repeats`` rounds; each figure is the median over rounds (sklearn: the median
    of ``min(repeats, 2)`` rounds, it is the slowest).
    """
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(num_images, NUM_CLASSES, generator=g) < 0.03).float()
    scores = (0.3 * targets + 0.7 * torch.rand(num_images, NUM_CLASSES, generator=g)).round(decimals=3)
    scores64 = scores.double()
    scores_np, targets_np = scores64.numpy(), targets.numpy()
    labels = targets.long()
    fns = {
        "q2l": lambda: average_precision(scores, targets),
        "torchmetrics": lambda: _torchmetrics(scores64, labels),
        "summarize": lambda: summarize(scores, targets),
        "sklearn": lambda: _sklearn_loop(scores_np, targets_np),
    }
    average_precision(scores[:1000], targets[:1000])  # warm-up (allocator, kernels, imports)
    _torchmetrics(scores64[:1000], labels[:1000])
    times: dict[str, list[float]] = {k: [] for k in fns}
    out: dict[str, object] = {}
    for r in range(repeats):
        for name, fn in fns.items():
            if name == "sklearn" and r >= 2:
                continue
            start = time.process_time()
            out[name] = fn()
            times[name].append(time.process_time() - start)
    t = {k: statistics.median(v) for k, v in times.items()}
    ap = out["q2l"].numpy()
    return {
        "num_images": num_images,
        "num_classes": NUM_CLASSES,
        "average_precision_s": t["q2l"],
        "torchmetrics_s": t["torchmetrics"],
        "sklearn_loop_s": t["sklearn"],
        "summarize_s": t["summarize"],
        "ratio_torchmetrics": t["torchmetrics"] / t["q2l"],
        "ratio_sklearn": t["sklearn"] / t["q2l"],
        "max_abs_diff_vs_sklearn": float(np.nanmax(np.abs(ap - out["sklearn"]))),
        "max_abs_diff_vs_torchmetrics": float(np.nanmax(np.abs(ap - out["torchmetrics"].numpy()))),
    }


def run(
    out_json: str | None = None,
    repeats: int = 3,
    threads: int | None = None,
    sizes: tuple[int, ...] | None = None,
) -> dict:
    """Measure each size in ``sizes`` (default ``SIZES``); print a table, optionally write JSON; return it."""
    if threads is not None:
        torch.set_num_threads(threads)
    rows = [measure(n, repeats) for n in sizes or SIZES]
    result = {
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rows": rows,
    }
    print(
        f"{'images × classes':<18}{'q2l AP s':>10}{'torchmetrics s':>16}{'sklearn s':>11}{'summarize s':>13}"
        f"{'tm / q2l':>10}{'sk / q2l':>10}{'max |diff|':>12}"
    )
    for r in rows:
        diff = max(r["max_abs_diff_vs_sklearn"], r["max_abs_diff_vs_torchmetrics"])
        print(
            f"{r['num_images']:>7,} × {r['num_classes']:<8}{r['average_precision_s']:>10.3f}"
            f"{r['torchmetrics_s']:>16.3f}{r['sklearn_loop_s']:>11.3f}{r['summarize_s']:>13.3f}"
            f"{r['ratio_torchmetrics']:>9.1f}×{r['ratio_sklearn']:>9.1f}×{diff:>12.1e}"
        )
    print(f"torch threads {result['torch_threads']}")
    if out_json:
        write_json(out_json, result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_json", nargs="?", default=None, help="write the figures to this JSON file")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="numbers of images")
    args = parser.parse_args()
    run(args.out_json, repeats=args.repeats, threads=args.threads, sizes=tuple(args.sizes))
