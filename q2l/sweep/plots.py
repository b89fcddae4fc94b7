"""A sweep's Optuna plots (history, per-epoch curves, importances, parallel coordinates) as PNG files.

They are drawn from a study rebuilt from the leaderboard rows, with one parameter per config key (a
conditional parameter's cases merged), so the plots read in config keys rather than Optuna's per-case names.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from q2l.sweep.leaderboard import COMPLETED, FAILED, STOPPED, TrialRow

TARGET = "held-out mAP"


def _distributions(rows: Sequence[TrialRow], space_keys: Sequence[str]) -> dict[str, Any]:
    """One Optuna distribution per config key that took 2+ values among ``rows``."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = {}
    for key in space_keys:
        distinct = list(dict.fromkeys(r.values.get(key) for r in rows))
        if len(distinct) < 2:
            continue  # fixed (or never varied): nothing to plot
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
            lo, hi = min(distinct), max(distinct)
            if all(isinstance(v, int) for v in distinct):
                dists[key] = IntDistribution(lo, hi)
            else:
                dists[key] = FloatDistribution(lo, hi, log=lo > 0 and hi / lo >= 100)
        else:
            dists[key] = CategoricalDistribution([str(v) for v in distinct])
    return dists


def plot_study(rows: Sequence[TrialRow], space_keys: Sequence[str]):
    """An in-memory Optuna study of the trials, in the states the searcher told its own study.

    Completed trials are COMPLETE with their best held-out mAP, trials ASHA stopped PRUNED with their
    per-epoch values, failed trials FAIL (without parameters: their values may lie outside the others').
    """
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    ran = [r for r in rows if r.status != FAILED and math.isfinite(r.holdout_map)]
    ran_ids = {id(r) for r in ran}
    dists = _distributions(ran, space_keys)
    states = {COMPLETED: TrialState.COMPLETE, STOPPED: TrialState.PRUNED}
    study = optuna.create_study(direction="maximize", study_name="sweep")
    trials = []
    for r in sorted(rows, key=lambda r: r.order):
        if id(r) not in ran_ids:
            trials.append(create_trial(state=TrialState.FAIL))
            continue
        params = {
            k: (str(r.values[k]) if isinstance(d, CategoricalDistribution) else r.values[k])
            for k, d in dists.items()
        }
        trials.append(
            create_trial(
                params=params,
                distributions=dists,
                value=r.holdout_map,
                intermediate_values=dict(enumerate(r.history, 1)),
                state=states[r.status],
            )
        )
    study.add_trials(trials)
    return study


def _plots(study) -> dict[str, Callable[[], Any]]:
    """The plots that can be drawn for ``study`` (parameter plots need 2+ complete trials with parameters)."""
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as vis

    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: vis.plot_optimization_history(study, target_name=TARGET),
        "intermediate_values": lambda: vis.plot_intermediate_values(study),
    }
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(complete) >= 2 and complete[0].distributions:
        # PED-ANOVA: Optuna's own estimator (the default fANOVA needs scikit-learn)
        plots["param_importances"] = lambda: vis.plot_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator(), target_name=TARGET
        )
        plots["parallel_coordinate"] = lambda: vis.plot_parallel_coordinate(study, target_name=TARGET)
    return plots


def write_plots(
    rows: Sequence[TrialRow], space_keys: Sequence[str], out_dir: Path
) -> tuple[list[Path], list[str]]:
    """Optimisation history, per-epoch curves, parameter importances, parallel coordinates as PNG files.

    Returns (files written, notes on plots that could not be drawn, e.g. too few trials).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plots = _plots(plot_study(rows, space_keys))
    notes = (
        []
        if "param_importances" in plots
        else ["parameter plots need 2+ completed trials with varied values"]
    )
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is "experimental"
                ax = draw()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
        except Exception as e:  # noqa: BLE001 - one plot that cannot be drawn must not lose the sweep record
            notes.append(f"{name}: {type(e).__name__}: {e}")
    return written, notes
