"""Ray Tune's Optuna searcher, telling Optuna how each trial really ended (multi-fidelity correct).

Ray's ``OptunaSearch`` tells Optuna that a trial the scheduler (ASHA) stopped is COMPLETE with its truncated
score, and an errored trial that had reported is COMPLETE too: TPE then ranks a one-epoch score as a final
one. ``MultiFidelityOptunaSearch`` reports the metric once per epoch (``trial.report(value, step=epoch)``)
and tells a trial that ended with the final (test) report COMPLETE, one that errored FAIL, and one that
ended without either (stopped by the scheduler) PRUNED, whose value Optuna takes from its last epoch. Each
Optuna trial carries the Tune trial id (user attribute ``q2l.trial_id``, as its MLflow run's tag).

The study is written as trials go, Tune's state only every so often: after a hard kill the restored searcher
can be older or newer than Tune's trials and than the study. ``reconcile`` makes it follow both (see
``resumable_search.py``): a rerun of a trial the study holds as finished leaves the study as it was.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from optuna.trial import Trial, TrialState
from ray.tune.search.optuna import OptunaSearch

from q2l.sweep.record import TRIAL_TAG
from q2l.sweep.study import WARM_START_ATTR
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
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if self.metric not in result or TIME_ATTR not in result:
            return
        step = int(result[TIME_ATTR])
        seen = self._reported.setdefault(trial_id, set())
        if step in seen:
            return
        self._ot_trials[trial_id].report(float(result[self.metric]), step)
        seen.add(step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell Optuna COMPLETE (final report), FAIL (error or no finite metric) or PRUNED (stopped)."""
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
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
            self._ot_study.tell(self._ot_trials[trial_id], told, state=state)
        except Exception as exc:  # noqa: BLE001 - e.g. told before a restore: Tune must go on
            logger.warning(f"optuna: cannot tell trial {trial_id} {state.name}: {exc}")
        self._completed_trials.add(trial_id)
        self._reported.pop(trial_id, None)

    def reconcile(self, tune_trials: Mapping[str, bool]) -> None:
        """Follow Tune's restored trials (id → still to run) and the study after a ``--resume``.

        A trial the study holds as finished, or that will not run again, is done for the searcher (a rerun
        reports nothing); one still to run resumes with the epochs the study holds. A study trial left
        RUNNING that will not run again (Tune lost it or finished it unseen) is told FAIL.
        """
        mine = {
            t.user_attrs[TRIAL_TAG]: t
            for t in self._ot_study.get_trials(deepcopy=False)
            if TRIAL_TAG in t.user_attrs and WARM_START_ATTR not in t.user_attrs
        }
        self._ot_trials, self._completed_trials, self._reported = {}, set(), {}
        for trial_id, to_run in tune_trials.items():
            frozen = mine.get(trial_id)
            if frozen is None:  # not in the study (deleted by hand): nothing to tell it
                continue
            self._ot_trials[trial_id] = Trial(self._ot_study, frozen._trial_id)
            if frozen.state.is_finished() or not to_run:
                self._completed_trials.add(trial_id)
            else:
                self._reported[trial_id] = set(frozen.intermediate_values)
        for trial_id, frozen in mine.items():
            if frozen.state == TrialState.RUNNING and not tune_trials.get(trial_id, False):
                self._ot_study.tell(frozen.number, state=TrialState.FAIL)
                logger.info(f"optuna: trial {trial_id} (#{frozen.number}) will not run again: told FAIL")
