"""Which searcher learns fastest: random vs TPE vs GP, with and without ASHA-style stopping, on a cheap proxy.

The proxy is a real q2l training, run in this process without Ray: the Engine trains a tiny Query2Label
(timm ``test_resnet``, d = 32) on a small demo set at 32 px for a few epochs, and each epoch's
held-out mAP is reported to Optuna (``trial.report``). The searchers are the sweep's own samplers
(``q2l.sweep.study.sampler``) over a q2l search space (``q2l.sweep.space``) driven with Optuna's ask/tell;
"ASHA" is Optuna's ``SuccessiveHalvingPruner`` with the sweep's rungs (grace 1, reduction factor 2, never at
the last epoch), the synchronous counterpart of Tune's ASHA. A trial's training is a pure function of its
configuration (fixed seed), so each configuration is trained once and its per-epoch curve reused whenever a
searcher proposes it again; "epochs spent" counts what the searcher asked for, not what was computed.

Outputs: per searcher and mode, the best held-out mAP of a completed trial against trials and against
epochs spent (mean over seeds) as a PNG, a markdown table, JSON, and an MLflow run in experiment
``q2l-bench``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from q2l.config import Config

SEARCHERS = ("random", "optuna", "gp")  # tune.searcher values: random, TPE, Gaussian process
LABELS = {"random": "random", "optuna": "TPE", "gp": "GP"}
SPACE = {
    "optim.lr": {"loguniform": [1e-4, 1e-1]},
    "optim.weight_decay": {"loguniform": [1e-5, 1e-1]},
    "loss.gamma_neg": {"uniform": [0, 4]},
    "model.dropout": {"uniform": [0, 0.5]},
}
PROXY = {
    "model.backbone": "test_resnet",
    "model.pretrained": False,
    "model.hidden_dim": 32,
    "model.num_heads": 2,
    "model.enc_layers": 1,
    "model.dec_layers": 1,
    "model.dim_feedforward": 64,
    "data.image_size": 32,
    "data.holdout_fraction": 0.34,
    "data.num_workers": 0,
    "data.randaugment": False,
    "data.cutout": 0.0,
    "train.batch_size": 8,  # more optimizer steps per epoch: the tiny model learns within a few epochs
    "train.ema_decay": None,
    "train.early_stop_patience": None,
    "train.precision": "fp32",
}
PROXY_IMAGES = 384  # demo train images; data.holdout_fraction of them are held out
PROXY_TEXT = (
    "Query2Label, timm test_resnet backbone (random init), d=32, 1+1 layers; demo set at 32 px, "
    "{train} train / {holdout} held-out images, 10 classes; batch 8, fp32, 1 thread"
)


@dataclass
class TrialLog:
    """One trial as the searcher saw it."""

    state: str  # COMPLETE | PRUNED
    epochs: int
    value: float  # best held-out mAP over its epochs


class Proxy:
    """The proxy training: data built once; ``curve(overrides)`` is the per-epoch best held-out mAP."""

    def __init__(self, cfg: Config) -> None:
        from q2l.data import build_datasets, build_loader

        self.cfg = cfg
        self.splits = build_datasets(cfg.data, train=True)
        kw = {"seed": cfg.train.seed, "rank": 0, "world_size": 1}
        self.train = build_loader(self.splits.train, cfg.data, cfg.train.batch_size, train=True, **kw)
        self.holdout = build_loader(self.splits.holdout, cfg.data, cfg.train.batch_size, train=False, **kw)
        self._cache: dict[tuple, list[float]] = {}
        self.trained_epochs = 0

    def curve(self, overrides: dict[str, Any]) -> list[float]:
        """Best held-out mAP after each epoch of ``train.epochs`` (trained once per configuration)."""
        key = tuple(sorted((k, round(v, 12) if isinstance(v, float) else v) for k, v in overrides.items()))
        if key not in self._cache:
            self._cache[key] = self._train(self.cfg.replace(overrides, "searcher benchmark"))
        return self._cache[key]

    def _train(self, cfg: Config) -> list[float]:
        from q2l.engine import Engine, seed_everything
        from q2l.losses import build_loss
        from q2l.models import build_model

        seed_everything(cfg.train.seed)
        model = build_model(cfg.model, self.splits.num_classes)
        engine = Engine(model, build_loss(cfg.loss), cfg, len(self.train), "cpu")
        out = []
        for result in engine.fit(self.train, self.holdout):
            best = result.best_map
            out.append(float(best) if math.isfinite(best) else 0.0)
            self.trained_epochs += 1
        return out


def search(proxy: Proxy, kind: str, seed: int, asha: bool, trials: int) -> list[TrialLog]:
    """``trials`` trials of sampler ``kind`` (Optuna ask/tell), stopping ASHA-style when ``asha``."""
    import optuna
    from optuna.trial import TrialState

    from q2l.sweep.space import parse_space
    from q2l.sweep.study import DIRECTION, sampler

    space = parse_space(proxy.cfg)
    epochs = proxy.cfg.train.epochs
    pruner = (
        optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2, min_early_stopping_rate=0)
        if asha
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(direction=DIRECTION, sampler=sampler(kind, seed, trials), pruner=pruner)
    logs = []
    for _ in range(trials):
        trial = study.ask()
        fixed = space(trial) or {}
        curve = proxy.curve(space.overrides({**trial.params, **fixed}))
        log = TrialLog("COMPLETE", epochs, curve[-1])
        for epoch, best in enumerate(curve, 1):
            trial.report(best, epoch)
            # like the sweep's ASHA (max_t = epochs - 1): never stopped at the last epoch
            if epoch < epochs and trial.should_prune():
                log = TrialLog("PRUNED", epoch, best)
                break
        study.tell(trial, log.value if log.state == "COMPLETE" else None, state=TrialState[log.state])
        logs.append(log)
    return logs


def incumbents(logs: list[TrialLog]) -> tuple[list[float], list[int]]:
    """(best completed value after each trial, epochs spent after each trial); NaN before a completion."""
    best, spent, values, epochs = -math.inf, 0, [], []
    for log in logs:
        spent += log.epochs
        if log.state == "COMPLETE":
            best = max(best, log.value)
        values.append(best if best > -math.inf else math.nan)
        epochs.append(spent)
    return values, epochs


def at_budget(values: list[float], epochs: list[int], budget: int) -> float:
    """The incumbent once ``budget`` epochs had been spent (the last trial that fit in it)."""
    fitting = [v for v, e in zip(values, epochs, strict=True) if e <= budget]
    return fitting[-1] if fitting else math.nan


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(runs: dict[str, list[list[TrialLog]]], epochs: int, trials: int) -> list[dict[str, Any]]:
    """One row per searcher and mode: final best, epochs spent, best within half the full budget."""
    budget = epochs * trials // 2
    rows = []
    for name, seeds in runs.items():
        curves = [incumbents(logs) for logs in seeds]
        final = _mean_sd([v[-1] for v, _ in curves])
        half = _mean_sd([at_budget(v, e, budget) for v, e in curves])
        rows.append(
            {
                "run": name,
                "best_map": final[0],
                "best_map_sd": final[1],
                "epochs_spent": statistics.fmean(e[-1] for _, e in curves),
                "pruned": statistics.fmean(sum(t.state == "PRUNED" for t in logs) for logs in seeds),
                "budget_epochs": budget,
                "best_map_at_budget": half[0],
                "best_map_at_budget_sd": half[1],
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table for the README."""
    lines = [
        f"| searcher | ASHA | best held-out mAP after {meta['trials']} trials | epochs spent "
        f"| trials stopped | best mAP within {rows[0]['budget_epochs']} epochs |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        kind, _, mode = r["run"].partition("+")
        lines.append(
            f"| {LABELS[kind]} | {'yes' if mode == 'asha' else 'no'} "
            f"| {r['best_map']:.1f} ± {r['best_map_sd']:.1f} | {r['epochs_spent']:.0f} "
            f"| {r['pruned']:.1f} | {r['best_map_at_budget']:.1f} ± "
            f"{r['best_map_at_budget_sd']:.1f} |"
        )
    lines.append(
        f"\nMean ± sd over {meta['seeds']} seeds; {meta['epochs']} epochs per completed trial. Proxy: "
        f"{meta['proxy']}. Search space: {', '.join(SPACE)}. {meta['distinct_configs']} distinct "
        f"configurations trained in {meta['seconds']:.0f} s."
    )
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[list[TrialLog]]], path: Path) -> Path:
    """Best held-out mAP against trials and against epochs spent, mean over seeds, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_trial, by_epoch) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, seeds in runs.items():
        kind, _, mode = name.partition("+")
        style = {"label": f"{LABELS[kind]}{' + ASHA' if mode == 'asha' else ''}"}
        style["linestyle"] = "--" if mode == "asha" else "-"
        curves = [incumbents(logs) for logs in seeds]
        n = len(curves[0][0])
        by_trial.plot(range(1, n + 1), [_mean_sd([c[0][i] for c in curves])[0] for i in range(n)], **style)
        top = max(e[-1] for _, e in curves)
        grid = list(range(1, top + 1))
        by_epoch.plot(grid, [_mean_sd([at_budget(v, e, b) for v, e in curves])[0] for b in grid], **style)
    by_trial.set(xlabel="trials", ylabel="best held-out mAP (completed trials)", title="per trial")
    by_epoch.set(xlabel="epochs spent", title="per epoch of compute")
    by_trial.legend(fontsize=8)
    for ax in (by_trial, by_epoch):
        ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def run(
    cfg: Config, *, trials: int, seeds: int, say: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, list[list[TrialLog]]]]:
    """Every searcher × {no ASHA, ASHA} × seed; returns (summary, the trial logs)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        proxy = Proxy(cfg)
        runs: dict[str, list[list[TrialLog]]] = {}
        for kind in SEARCHERS:
            for mode in ("", "asha"):
                name = f"{kind}+{mode}" if mode else kind
                runs[name] = [search(proxy, kind, seed, bool(mode), trials) for seed in range(seeds)]
                say(
                    f"{name}: {time.perf_counter() - start:.0f} s, {len(proxy._cache)} configurations trained"
                )
    finally:
        torch.set_num_threads(threads)
    meta = {
        "trials": trials,
        "seeds": seeds,
        "epochs": cfg.train.epochs,
        "proxy": PROXY_TEXT.format(train=len(proxy.splits.train), holdout=len(proxy.splits.holdout)),
        "distinct_configs": len(proxy._cache),
        "trained_epochs": proxy.trained_epochs,
        "seconds": time.perf_counter() - start,
    }
    return {"meta": meta, "rows": summarise(runs, cfg.train.epochs, trials)}, runs


def proxy_config(out: Path, epochs: int) -> Config:
    """The proxy's config over a small demo set made once under ``out``."""
    from q2l.data.demo import make_demo_dataset

    root = out / "searcher-proxy-data"
    if not (root / "annotations").is_dir():
        make_demo_dataset(root, num_train=PROXY_IMAGES, num_val=16, size=32, seed=0, workers=1)
    return Config().replace({**PROXY, "data.root": str(root), "train.epochs": epochs, "tune.space": SPACE})


def log_to_mlflow(tracking_cfg: Config, result: dict[str, Any], files: list[Path]) -> str:
    """A run in experiment ``q2l-bench`` with the settings, one metric per searcher and mode, the files."""
    from mlflow.entities import Metric, Param

    from q2l import tracking

    cfg = tracking_cfg.replace({"mlflow.experiment": "q2l-bench"})
    client = tracking.client(cfg)
    run_id = client.create_run(tracking.ensure_experiment(cfg), run_name="searchers").info.run_id
    meta, now = result["meta"], int(time.time() * 1000)
    params = [Param(k, str(v)[:500]) for k, v in meta.items() if k != "seconds"]
    metrics = [Metric("seconds", meta["seconds"], now, 0)]
    for r in result["rows"]:
        name = r["run"].replace("+", "_")  # MLflow metric names allow no "+"
        keys = ("best_map", "epochs_spent", "best_map_at_budget")
        metrics += [Metric(f"{name}.{k}", float(r[k]), now, 0) for k in keys]
    client.log_batch(run_id, metrics=metrics, params=params)
    for f in files:
        client.log_artifact(run_id, str(f))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def part(args: Any, out: Path) -> dict[str, Any]:
    """``q2l bench searchers``: run, print the table, write ``searchers.md``/``.png``, log to MLflow."""
    from q2l.config import resolve_config

    cfg = proxy_config(out, args.searcher_epochs)
    result, runs = run(cfg, trials=args.searcher_trials, seeds=args.searcher_seeds)
    table = markdown(result["rows"], result["meta"])
    print(table)
    md = out / "searchers.md"
    md.write_text(table)
    png = plot(runs, out / "searchers.png")
    mlflow_sets = [s for s in args.set if s.startswith("mlflow.")]
    result["mlflow_run_id"] = log_to_mlflow(resolve_config(None, mlflow_sets).config, result, [md, png])
    print(f"MLflow run {result['mlflow_run_id']} in experiment q2l-bench")
    return result
