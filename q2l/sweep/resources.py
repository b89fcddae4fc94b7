"""Where a sweep's trials run: each trial driver's resources and how many trials fit the cluster at once.

The trap: a trial's driver holds its resources while its workers need theirs. Drivers ask for no CPU: a
``trial_slot`` when the cluster defines that resource (an admin's cap on concurrent trials), else a little
``memory``. ``max_concurrent_trials`` is at most the number of trials whose workers fit the cluster at once,
counted node by node, so queued trials never hold workers' CPUs or GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from q2l.config import Config, ConfigError

TRIAL_SLOT = "trial_slot"
DRIVER_MEMORY = 256 * 1024**2  # bytes of Ray's logical "memory" resource per trial driver


@dataclass
class ResourcePlan:
    """How trials are placed: the driver's resources and how many trials run at once."""

    driver: dict[str, float]
    per_worker: dict[str, float]
    fits: int  # trials whose workers fit the cluster at once
    max_concurrent: int
    note: str | None = None  # why max_concurrent is lower than asked


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one Ray Train worker of ``cfg`` asks for (as the train layer's ScalingConfig does)."""
    need = {"CPU": cfg.ray.cpus_per_worker, **cfg.ray.resources_per_worker}
    if cfg.ray.use_gpu:
        need.setdefault("GPU", 1.0)
    return {k: float(v) for k, v in need.items() if v}


def plan_resources(cfg: Config, nodes: list[dict[str, float]]) -> ResourcePlan:
    """Driver resources and ``max_concurrent_trials`` for a cluster given as each alive node's resources.

    Raises ``ConfigError`` when not even one trial's workers fit.
    """
    per_worker = worker_resources(cfg)
    num_workers = cfg.ray.num_workers
    slots = 0  # worker bundles that fit, node by node (a bundle never spans nodes)
    for node in nodes:
        fit = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items()]
        slots += min(fit) if fit else num_workers * cfg.tune.num_samples
    fits = slots // num_workers
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in per_worker}
    if fits < 1:
        raise ConfigError(
            f"one trial needs ray.num_workers = {num_workers} workers × {per_worker}, but the cluster has "
            f"{total} (per node: {[{k: n.get(k, 0.0) for k in per_worker} for n in nodes]}): lower "
            f"ray.num_workers or ray.cpus_per_worker, or add nodes"
        )
    slot_total = sum(n.get(TRIAL_SLOT, 0.0) for n in nodes)
    if slot_total >= 1:
        driver = {"CPU": 0.0, TRIAL_SLOT: 1.0}
        fits = min(fits, int(slot_total))
    else:
        driver = {"CPU": 0.0, "memory": float(DRIVER_MEMORY)}
    asked = cfg.tune.max_concurrent_trials
    max_concurrent = min(fits, cfg.tune.num_samples, asked or fits)
    note = None
    if asked and asked > fits:
        note = (
            f"tune.max_concurrent_trials = {asked} lowered to {fits}: only {fits} trial(s) of "
            f"{num_workers} × {per_worker} fit the cluster at once"
        )
    return ResourcePlan(driver, per_worker, fits, max_concurrent, note)
