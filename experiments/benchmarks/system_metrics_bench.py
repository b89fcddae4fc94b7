"""What MLflow's system-metrics monitor costs the training step (``q2l/tracking/system_metrics.py``).

One process builds one Engine (the demo model: Query2Label on tf_efficientnet_lite0, random weights) and
times its ``train_step`` in alternating rounds: without a monitor, then with MLflow's
``SystemMetricsMonitor`` sampling into a SQLite run at each interval of ``--intervals`` (a round is at
least two sampling intervals long, so every "on" round holds samples and logging). Reported per condition:
the median step time over all its rounds' steps, its ratio to the median without a monitor, and the median
of the per-round ratios (each "on" round against the "off" round just before it: robust to a machine whose
load drifts, as a shared one does). On a loaded machine those ratios are noise either way, so the monitor's
own work is timed too: ``sample_cost_ms``, the median time of one full cycle of the monitor thread (sample
every metric, read the run's status, log the batch), and ``busy_share``, that cost over the interval.

    python experiments/benchmarks/system_metrics_bench.py --intervals 10 1 --rounds 3 \\
        --out results/bench/system_metrics.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from q2l.config import config_from_dict
from q2l.engine import Engine, seed_everything
from q2l.losses import build_loss
from q2l.models import build_model


def build_engine(image_size: int, batch_size: int, num_classes: int = 80):
    """The demo model in an Engine on CPU, and one fixed uint8 batch."""
    seed_everything(0)
    cfg = config_from_dict(
        {
            "model": {"backbone": "tf_efficientnet_lite0", "pretrained": False, "hidden_dim": 256},
            "train": {"epochs": 1, "batch_size": batch_size},
            "data": {"image_size": image_size},
        },
        "system_metrics_bench",
    )
    model = build_model(cfg.model, num_classes)
    engine = Engine(model, build_loss(cfg.loss), cfg, 10_000, torch.device("cpu"))
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8)
    targets = (torch.rand(batch_size, num_classes) < 0.05).float()
    return engine, images, targets


def timed_steps(engine, images, targets, seconds: float) -> list[float]:
    """Step times (s) of as many train steps as fit in ``seconds`` (at least 3)."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t = time.perf_counter()
        engine.train_step(images, targets)
        times.append(time.perf_counter() - t)
    return times


def sample_cost_s(monitor, client, run_id: str, cycles: int = 20) -> float:
    """Median seconds of one monitor cycle, run inline: collect, the run-status read, aggregate, log."""
    times = []
    for _ in range(cycles):
        t = time.perf_counter()
        monitor.collect_metrics()
        client.get_run(run_id)
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", type=float, nargs="+", default=[10.0, 1.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    torch.set_num_threads(1)  # as a 1-CPU Ray worker runs
    engine, images, targets = build_engine(args.image_size, args.batch_size)
    for _ in range(args.warmup):
        engine.train_step(images, targets)
    tmp = tempfile.mkdtemp(prefix="q2l-sysbench-")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("bench", artifact_location=f"{tmp}/artifacts")
    run_id = client.create_run(exp).info.run_id
    round_s = 2.2 * max(args.intervals)
    steps: dict[str, list[float]] = {"off": []}
    paired: dict[str, list[float]] = {}
    samples: dict[str, int] = {}
    for _ in range(args.rounds):
        off = timed_steps(engine, images, targets, round_s)
        steps["off"] += off
        for interval in args.intervals:
            key = f"on@{interval:g}s"
            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=uri)
            monitor.start()
            on = timed_steps(engine, images, targets, round_s)
            monitor.finish()
            steps.setdefault(key, []).extend(on)
            paired.setdefault(key, []).append(statistics.median(on) / statistics.median(off))
    for m in client.get_run(run_id).data.metrics:
        if m == "system/cpu_utilization_percentage":
            samples["logged_samples"] = len(client.get_metric_history(run_id, m))
    cost = sample_cost_s(SystemMetricsMonitor(run_id, tracking_uri=uri), client, run_id)
    base = statistics.median(steps["off"])
    result = {
        "command": "python experiments/benchmarks/system_metrics_bench.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if v is not None
        ),
        "round_s": round_s,
        "rounds": args.rounds,
        **samples,
        "sample_cost_ms": 1000 * cost,
        "busy_share": {f"{i:g}s": cost / i for i in args.intervals},
        "conditions": {
            k: {
                "steps": len(v),
                "median_ms": 1000 * median,
                "ratio": median / base,
                "paired_ratio": statistics.median(paired[k]) if k in paired else 1.0,
            }
            for k, v in steps.items()
            for median in [statistics.median(v)]
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
