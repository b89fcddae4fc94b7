"""How a sweep's own machinery scales with the number of trials: the Tune driver and the MLflow record.

1. Driver overhead: ``--trials`` (default 100) trials of a trivial trainable (a few epochs of scripted
   held-out mAPs, no training) through the sweep's real Tune path on a local Ray: the sweep's Optuna searcher
   on its persisted SQLite study and its ASHA scheduler. Wall time per trial is the driver's overhead (the
   trainable itself takes milliseconds); the searcher's own share (ask + define-by-run + tell on SQLite) is
   timed alone too.
2. Record time: ``record_sweep`` (child runs finished and tagged, leaderboard, Optuna plots, parent metrics)
   for 25, 50 and 100 trial rows against a fresh SQLite MLflow store each, whose child runs were created as
   the train layer creates them. Linear growth keeps the time per row flat.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from q2l.config import Config

SPACE = {"loss.gamma_neg": {"uniform": [0, 4]}, "optim.lr": {"loguniform": [1e-4, 1e-2]}}
EPOCHS = 4


def _scripted(config: dict) -> None:
    """A trial without training: held-out mAPs that depend on the sampled values, then the final report."""
    from ray import tune

    quality = 50 - 10 * abs(math.log10(config["optim.lr"]) + 3) - 2 * abs(config["loss.gamma_neg"] - 2)
    for epoch in range(1, EPOCHS + 1):
        value = quality * (1 - 0.5**epoch)
        tune.report({"epoch": epoch, "holdout_map": value, "best_holdout_map": value})
    tune.report({"epoch": EPOCHS, "best_holdout_map": value, "test_map": value})


def _config(root: Path, trials: int = 100) -> Config:
    return Config().replace(
        {
            "mlflow.results_dir": str(root / "results"),
            "train.epochs": EPOCHS + 1,
            "tune.space": SPACE,
            "tune.num_samples": trials,
        }
    )


def driver_overhead(trials: int, concurrent: int) -> dict[str, Any]:
    """``trials`` scripted trials through Tune with the sweep's searcher and ASHA; seconds per trial."""
    from ray import cloudpickle, tune

    from q2l.ray_runtime import ray_session
    from q2l.sweep.search import scheduler, search_algorithm
    from q2l.sweep.space import parse_space
    from q2l.sweep.study import load_study

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers may not import experiments/
    with tempfile.TemporaryDirectory(prefix="q2l-scale-") as tmp:
        cfg = _config(Path(tmp), trials)
        with ray_session() as _:
            start = time.perf_counter()
            tuner = tune.Tuner(
                _scripted,
                tune_config=tune.TuneConfig(
                    search_alg=search_algorithm(cfg, parse_space(cfg), "scale", concurrent),
                    scheduler=scheduler(cfg),
                    num_samples=trials,
                ),
                run_config=tune.RunConfig(name="scale", storage_path=f"{tmp}/ray", verbose=0),
            )
            grid = tuner.fit()
            wall = time.perf_counter() - start
        states = [t.state.name for t in load_study(cfg, "scale").trials]
    return {
        "trials": trials,
        "max_concurrent_trials": concurrent,
        "wall_s": wall,
        "s_per_trial": wall / trials,
        "errors": grid.num_errors,
        "study_states": {s: states.count(s) for s in sorted(set(states))},
    }


def searcher_alone(trials: int) -> dict[str, Any]:
    """The searcher's own cost per trial on the SQLite study: suggest, one report per epoch, complete."""
    from q2l.sweep.search import searcher
    from q2l.sweep.space import parse_space

    with tempfile.TemporaryDirectory(prefix="q2l-scale-") as tmp:
        cfg = _config(Path(tmp), trials)
        search = searcher(cfg, parse_space(cfg), "alone")
        start = time.perf_counter()
        for i in range(trials):
            tid = f"t{i}"
            search.suggest(tid)
            for epoch in range(1, EPOCHS + 1):
                search.on_trial_result(tid, {"epoch": epoch, "best_holdout_map": float(epoch)})
            search.on_trial_complete(tid, {"epoch": EPOCHS, "best_holdout_map": 4.0, "test_map": 1.0})
        wall = time.perf_counter() - start
    return {"trials": trials, "s_per_trial": wall / trials}


def _rows_with_runs(cfg: Config, n: int):
    """A parent run and ``n`` child runs made as the sweep and the train layer make them; their rows."""
    from q2l import tracking
    from q2l.sweep import record
    from q2l.sweep.leaderboard import COMPLETED, STOPPED, TrialRow
    from q2l.sweep.space import parse_space

    space = parse_space(cfg)
    parent = record.open_parent_run(
        cfg, space, sweep_name="scale", sweep_path="/none", settings={"searcher": "tpe", "scheduler": "asha"}
    )
    client, exp = tracking.client(cfg), tracking.ensure_experiment(cfg)
    rows = []
    for i in range(n):
        tid = f"{i:05d}"
        tags = {"mlflow.parentRunId": parent, record.TRIAL_TAG: tid, record.SWEEP_TAG: "scale"}
        run = client.create_run(exp, run_name=f"trial-{tid}", tags=tags).info.run_id
        values = {**cfg.flat(), "loss.gamma_neg": 4 * i / n, "optim.lr": 10 ** (-4 + 2 * i / n)}
        epochs = EPOCHS if i % 3 == 0 else 1
        history = [float(10 + i % 17 + e) for e in range(epochs)]
        status = COMPLETED if epochs == EPOCHS else STOPPED
        test = history[-1] - 1 if status == COMPLETED else math.nan
        rows.append(
            TrialRow(tid, status, {}, values, max(history), test, epochs, history, 64.0 * epochs, run)
        )
    return space, parent, rows


def _record_seconds(n: int) -> float:
    """Seconds of one ``record_sweep`` over ``n`` trial rows, against a fresh SQLite MLflow store."""
    from q2l.sweep.record import record_sweep

    with tempfile.TemporaryDirectory(prefix="q2l-record-") as tmp:
        cfg = _config(Path(tmp))
        space, parent, rows = _rows_with_runs(cfg, n)
        start = time.perf_counter()
        record_sweep(cfg, rows, space, parent_run_id=parent, sweep_name="scale", wall_seconds=1.0, cpus=1)
        return time.perf_counter() - start


def record_time(sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """Seconds of ``record_sweep`` for each number of rows, each against a fresh SQLite MLflow store.

    An untimed round goes first: the first ``record_sweep`` in a process also pays for importing and setting
    up its plotting, which would land on the smallest size and fake a falling cost per row.
    """
    _record_seconds(5)
    out = []
    for n in sizes:
        seconds = _record_seconds(n)
        out.append({"rows": n, "record_s": seconds, "ms_per_row": 1000 * seconds / n})
    return out


def run(trials: int = 100, concurrent: int = 2, sizes: tuple[int, ...] = (25, 50, 100)) -> dict[str, Any]:
    """Both measurements; ``growth`` is record time per row at the largest size over the smallest."""
    record = record_time(sizes)
    result = {
        "record": record,
        "record_growth_per_row": record[-1]["ms_per_row"] / record[0]["ms_per_row"],
        "searcher": searcher_alone(trials),
        "driver": driver_overhead(trials, concurrent),
    }
    return result


def markdown(result: dict[str, Any]) -> str:
    """The scale figures as markdown."""
    d, s = result["driver"], result["searcher"]
    lines = [
        f"{d['trials']} scripted trials through Tune ({d['max_concurrent_trials']} at once, the sweep's "
        f"searcher on SQLite + ASHA): {d['wall_s']:.0f} s, {d['s_per_trial']:.2f} s per trial "
        f"(searcher alone {1000 * s['s_per_trial']:.0f} ms per trial); study: {d['study_states']}",
        "",
        "| trial rows | record_sweep s | ms per row |",
        "|---|---|---|",
    ]
    lines += [f"| {r['rows']} | {r['record_s']:.1f} | {r['ms_per_row']:.0f} |" for r in result["record"]]
    return "\n".join(lines) + "\n"


def part(args: Any, out: Path) -> dict[str, Any]:
    """``q2l bench sweep_scale``: run both measurements, print and write ``sweep_scale.md``."""
    result = run(trials=args.scale_trials, concurrent=args.scale_concurrent)
    table = markdown(result)
    print(table)
    (out / "sweep_scale.md").write_text(table)
    return result
