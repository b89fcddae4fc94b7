"""Ray Train overhead, and 1 vs 2 workers: the same epochs through the Engine directly and via ``q2l train``.

- ``engine``: this process builds the data, model and ``Engine`` exactly as a Ray worker does (same seed,
  threads = ``ray.cpus_per_worker``, same loader) and iterates ``engine.fit``: no Ray, no MLflow.
- ``ray-N``: ``run_training`` with N workers (a fresh run name each time); per-epoch numbers are read back
  from the MLflow run it recorded.

Per mode: steady-state images/s (each epoch without its first 2 steps; median over epochs), best held-out
mAP, and for the Ray runs test mAP and the end-to-end wall time (Ray start, workers, test evaluation and
model logging included). The wall-clock overhead ratio is ``ray-1`` over ``engine`` steady images/s; with
``repeats > 1`` the modes alternate and the ratio is the median of the per-pair ratios.

On a machine shared with other jobs wall-clock rates swing with the load, so the benchmark also counts CPU
seconds from ``/proc`` (Linux): for every epoch after the first, from one epoch's end (after its held-out
evaluation) to the next, the CPU time of the training process tree (the engine process, or the Ray workers,
with their loader processes; for Ray this includes checkpointing, reporting and MLflow logging) and, for Ray,
of every other process Ray started (raylet, GCS, controller, driver...). ``cpu_ratio`` = engine CPU per
image / Ray trainers' CPU per image; ``cpu_ratio_with_ray_processes`` also charges Ray's own processes.

    python -m experiments.benchmarks.ray_overhead_bench --config experiments/demo.yaml --epochs 3 --repeats 2
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from q2l.config import Config, load_config

from .common import write_json

STEADY = "steady_images_per_s"
_TICK = os.sysconf("SC_CLK_TCK")
_WORKER_TITLE = "ray::RayTrainWorker"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/PID/task/*/children: no scan of the whole /proc)."""
    out: list[int] = []
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            out.extend(int(c) for c in Path(task.path, "children").read_text().split())
    except OSError:
        pass
    return out


def _is_ray_worker(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(_WORKER_TITLE.encode())
    except OSError:
        return False


class CpuSampler:
    """Samples CPU seconds of this process and its descendants every ``period`` s: trainers and others.

    Trainers: this process (``ray=False``) or the Ray training workers started under it (``ray=True``), each
    with its loader processes. Time of processes that ended is kept (their last sample).
    """

    def __init__(self, ray: bool, period: float = 0.5):
        self.ray = ray
        self.period = period
        self.samples: list[tuple[float, float, float]] = []  # (time, trainer CPU s, other CPU s)
        self._last: dict[int, tuple[bool, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)
        self._sample()

    def _sample(self) -> None:
        mine = _tree([os.getpid()])
        roots = [p for p in mine if _is_ray_worker(p)] if self.ray else [os.getpid()]
        trainers = _tree(roots)
        for pid in mine:
            self._last[pid] = (pid in trainers, _cpu_seconds(pid))
        trainer_cpu = sum(cpu for is_trainer, cpu in self._last.values() if is_trainer)
        other_cpu = sum(cpu for is_trainer, cpu in self._last.values() if not is_trainer)
        self.samples.append((time.time(), trainer_cpu, other_cpu))

    def at(self, t: float) -> tuple[float, float]:
        """(trainer, other) CPU seconds at time ``t``, interpolated between samples."""
        s = self.samples
        for (t0, a0, b0), (t1, a1, b1) in zip(s, s[1:], strict=False):
            if t0 <= t <= t1:
                w = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
                return a0 + w * (a1 - a0), b0 + w * (b1 - b0)
        raise ValueError(f"time {t} is outside the sampled window")


def _tree(roots: list[int]) -> set[int]:
    """``roots`` and all their descendants."""
    out: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in out:
            out.add(pid)
            stack.extend(_children(pid))
    return out


def _intervals(sampler: CpuSampler, ends: list[float], images: list[float]) -> list[dict[str, float]]:
    """Per epoch after the first: wall, trainer and other CPU seconds between consecutive epoch ends."""
    out = []
    for k in range(1, len(ends)):
        (a0, b0), (a1, b1) = sampler.at(ends[k - 1]), sampler.at(ends[k])
        out.append(
            {"wall": ends[k] - ends[k - 1], "trainer_cpu": a1 - a0, "other_cpu": b1 - b0, "images": images[k]}
        )
    return out


def engine_direct(cfg: Config) -> dict[str, Any]:
    """``train.epochs`` epochs of ``engine.fit`` in this process, set up as one Ray worker would be."""
    from q2l.data import build_datasets, build_loader
    from q2l.engine import Engine, seed_everything
    from q2l.losses import build_loss
    from q2l.models import build_model

    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    start = time.perf_counter()
    epochs, ends, images = [], [], []
    try:
        with CpuSampler(ray=False) as sampler:
            seed_everything(cfg.train.seed)
            splits = build_datasets(cfg.data, train=True)
            kw = {"seed": cfg.train.seed, "rank": 0, "world_size": 1}
            train_loader = build_loader(splits.train, cfg.data, cfg.train.batch_size, train=True, **kw)
            holdout_loader = build_loader(splits.holdout, cfg.data, cfg.train.batch_size, train=False, **kw)
            model = build_model(cfg.model, splits.num_classes)
            engine = Engine(model, build_loss(cfg.loss), cfg, len(train_loader), "cpu")
            for r in engine.fit(train_loader, holdout_loader):
                ends.append(time.time())
                images.append(float(r.train["images"]))
                epochs.append({STEADY: r.train[STEADY], "holdout_map": r.holdout_map})
            time.sleep(2 * sampler.period)  # a sample after the last epoch end
    finally:
        torch.set_num_threads(threads_before)
    out = _summary("engine", epochs, time.perf_counter() - start)
    out["intervals"] = _intervals(sampler, ends, images)
    return out


def through_ray(cfg: Config, workers: int, run_name: str) -> dict[str, Any]:
    """One ``run_training`` with ``workers`` workers; per-epoch numbers from its MLflow run."""

    from q2l import tracking
    from q2l.train import run_training

    cfg = cfg.replace({"ray.num_workers": workers, "ray.run_name": run_name})
    start = time.perf_counter()
    with CpuSampler(ray=True) as sampler:
        outcome = run_training(cfg)
    wall = time.perf_counter() - start
    client = tracking.client(cfg)
    history = {
        key: {m.step: m for m in client.get_metric_history(outcome.run_id, key)}
        for key in (STEADY, "images_per_s", "epoch_seconds", "holdout_map")
    }
    steps = sorted(history[STEADY])
    epochs = [{k: history[k][s].value for k in (STEADY, "holdout_map")} for s in steps]
    # metrics are logged right after each epoch's held-out evaluation, as the engine mode's epoch ends
    ends = [history["holdout_map"][s].timestamp / 1000 for s in steps]
    images = [history["images_per_s"][s].value * history["epoch_seconds"][s].value for s in steps]
    out = _summary(f"ray-{workers}", epochs, wall)
    out.update(test_map=outcome.test_map, mlflow_run_id=outcome.run_id)
    out["intervals"] = _intervals(sampler, ends, images)
    return out


def _summary(mode: str, epochs: list[dict[str, float]], wall: float) -> dict[str, Any]:
    steady = [e[STEADY] for e in epochs if not math.isnan(e[STEADY])]
    return {
        "mode": mode,
        "epochs": epochs,
        STEADY: statistics.median(steady) if steady else math.nan,
        "best_holdout_map": max(e["holdout_map"] for e in epochs),
        "wall_seconds": wall,
    }


def _cpu_per_image(row: dict[str, Any], with_others: bool = False) -> float:
    iv = row["intervals"]
    cpu = sum(i["trainer_cpu"] + (i["other_cpu"] if with_others else 0.0) for i in iv)
    return cpu / sum(i["images"] for i in iv)


def _with_load(fn, *args) -> dict[str, Any]:
    """``fn(*args)`` with the machine's 1-minute load average before and after (a shared machine's noise)."""
    before = os.getloadavg()[0]
    row = fn(*args)
    row["load_avg"] = [round(before, 1), round(os.getloadavg()[0], 1)]
    row["cpu_ms_per_image"] = 1000 * _cpu_per_image(row)
    row["cpu_ms_per_image_all"] = 1000 * _cpu_per_image(row, with_others=True)
    return row


def run(
    config: str | Path = "experiments/demo.yaml",
    epochs: int = 3,
    workers: tuple[int, ...] = (1, 2),
    repeats: int = 1,
    overrides: tuple[str, ...] = (),
    results_dir: str | Path = "results/bench/ray_overhead",
    out_json: str | Path | None = "results/bench/ray_overhead.json",
) -> dict[str, Any]:
    """Measure the modes (see the module docstring); print a table, write JSON, return the result."""
    if epochs < 2:
        raise ValueError("epochs must be >= 2: the CPU accounting uses the epochs after the first")
    results_dir = Path(results_dir).resolve()
    cfg = load_config(
        config,
        [
            *overrides,
            f"train.epochs={epochs}",
            f"mlflow.results_dir={results_dir}",
            f"ray.storage_path={results_dir / 'ray'}",
            "mlflow.experiment=q2l-bench",
        ],
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: list[dict[str, Any]] = []
    wall_pairs, cpu_pairs, cpu_all_pairs = [], [], []
    for i in range(repeats):
        direct = _with_load(engine_direct, cfg)
        rows.append(direct)
        if 1 in workers:
            ray1 = _with_load(through_ray, cfg, 1, f"bench-{stamp}-w1-r{i}")
            rows.append(ray1)
            wall_pairs.append(ray1[STEADY] / direct[STEADY])
            cpu_pairs.append(direct["cpu_ms_per_image"] / ray1["cpu_ms_per_image"])
            cpu_all_pairs.append(direct["cpu_ms_per_image"] / ray1["cpu_ms_per_image_all"])
    for w in workers:
        if w != 1:
            rows.append(_with_load(through_ray, cfg, w, f"bench-{stamp}-w{w}"))
    median = statistics.median
    result = {
        "config": str(config),
        "overrides": list(overrides),
        "epochs": epochs,
        "image_size": cfg.data.image_size,
        "batch_size_per_worker": cfg.train.batch_size,
        "backbone": cfg.model.backbone,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
        "wall_ratio": median(wall_pairs) if wall_pairs else None,
        "wall_ratios": wall_pairs,
        "cpu_ratio": median(cpu_pairs) if cpu_pairs else None,
        "cpu_ratios": cpu_pairs,
        "cpu_ratio_with_ray_processes": median(cpu_all_pairs) if cpu_all_pairs else None,
    }
    _print_table(result)
    if out_json is not None:
        print(f"wrote {write_json(out_json, result)}")
    return result


def _print_table(result: dict[str, Any]) -> None:
    print(f"{'mode':<8} {'steady img/s':>12} {'trainer CPU ms/img':>19} {'+Ray procs':>11} "
          f"{'best holdout mAP':>17} {'test mAP':>9} {'wall s':>7} {'load':>11}")  # fmt: skip
    for r in result["rows"]:
        test = f"{r['test_map']:.2f}" if "test_map" in r else "-"
        print(
            f"{r['mode']:<8} {r[STEADY]:>12.1f} {r['cpu_ms_per_image']:>19.1f}"
            f" {r['cpu_ms_per_image_all']:>11.1f} {r['best_holdout_map']:>17.2f} {test:>9}"
            f" {r['wall_seconds']:>7.0f} {'->'.join(map(str, r['load_avg'])):>11}"
        )
    if result["wall_ratio"] is not None:
        walls = ", ".join(f"{x:.3f}" for x in result["wall_ratios"])
        cpus = ", ".join(f"{x:.3f}" for x in result["cpu_ratios"])
        print(
            f"ray-1 / engine: steady img/s {result['wall_ratio']:.3f} ({walls}); CPU per image"
            f" {result['cpu_ratio']:.3f} ({cpus}); with Ray's own processes"
            f" {result['cpu_ratio_with_ray_processes']:.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="experiments/demo.yaml")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    ap.add_argument("--results-dir", default="results/bench/ray_overhead")
    ap.add_argument("--out-json", default="results/bench/ray_overhead.json")
    a = ap.parse_args()
    run(a.config, a.epochs, tuple(a.workers), a.repeats, tuple(a.overrides), a.results_dir, a.out_json)


if __name__ == "__main__":
    main()
