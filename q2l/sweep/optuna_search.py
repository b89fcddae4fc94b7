"""Ray Tune's Optuna searcher, telling Optuna how each trial really ended (multi-fidelity correct).

Ray's ``OptunaSearch`` tells Optuna that a trial the scheduler (ASHA) stopped is COMPLETE with its truncated
score, and an errored trial that had reported is COMPLETE too: TPE then ranks a one-epoch score as a final
one. ``MultiFidelityOptunaSearch`` reports the metric once per epoch (``trial.report(value, step=epoch)``)
and tells a trial that ended with the final (test) report COMPLETE, one that errored FAIL, and one that
ended without either (stopped by the scheduler) PRUNED, whose value Optuna takes from its last epoch. Each
Optuna trial carries the Tune trial id (user attribute ``q2l.trial_id``, as its MLflow run's tag).

The study is written as trials go, Tune's state only every so often: after a SIGKILL, ``--resume`` can rerun
a trial the study already holds as finished. Its rerun leaves the study as it was.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from q2l.sweep.record import TRIAL_TAG
from q2l.train import EPOCH_KEY as TIME_ATTR
from q2l.train import FINAL_METRIC

logger = logging.getLogger(__name__)


class MultiFidelityOptunaSearch(OptunaSearch):
    """``OptunaSearch`` with per-epoch intermediate values and PRUNED/FAIL/COMPLETE as the trial ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reported: dict[str, set[int]] = {}  # epochs already reported per trial (pickled with the rest)

    def suggest(self, trial_id: str) -> dict | None:
        """Ray's suggestion; the Optuna trial also records the Tune trial id (its MLflow run's tag)."""
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(TRIAL_TAG, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Report the metric at step = epoch (the final test report repeats the last epoch: skipped)."""
        if trial_id in self._completed_trials or self.metric not in result or TIME_ATTR not in result:
            return
        step = int(result[TIME_ATTR])
        seen = self._reported.setdefault(trial_id, set())
        if step in seen:
            return
        try:
            self._ot_trials[trial_id].report(float(result[self.metric]), step)
        except UpdateFinishedTrialError:
            # the study is ahead of Tune's saved state: the trial ended and was told before the driver was
            # killed, Tune's last snapshot still had it running, and --resume runs it again. The study keeps
            # what it was told.
            logger.info(f"optuna: trial {trial_id} already ended in the study; its rerun is not reported")
        seen.add(step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell Optuna COMPLETE (final report), FAIL (error or no finite metric) or PRUNED (stopped)."""
        if trial_id in self._completed_trials:
            return
        result = result or {}
        # the result that made the scheduler stop the trial reaches the searcher only here
        self.on_trial_result(trial_id, result)
        value = result.get(self.metric)
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        if error or (FINAL_METRIC in result and not finite):
            state, told = TrialState.FAIL, None
        elif FINAL_METRIC in result:
            state, told = TrialState.COMPLETE, float(value)
        else:
            state, told = TrialState.PRUNED, None
        try:
            # skip_if_finished: told before a hard kill, rerun after --resume (see on_trial_result)
            self._ot_study.tell(self._ot_trials[trial_id], told, state=state, skip_if_finished=True)
        except Exception as exc:  # noqa: BLE001 - e.g. told before a restore: Tune must go on
            logger.warning(f"optuna: cannot tell trial {trial_id} {state.name}: {exc}")
        self._completed_trials.add(trial_id)
        self._reported.pop(trial_id, None)
