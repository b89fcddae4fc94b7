"""Tune's search algorithm for a sweep, made to agree with the restored trials on ``--resume``.

Tune saves the trials (``experiment_state-*.json``) and the search algorithm (``search_gen_state-*.json``,
``searcher-state-*.pkl``) as separate files, and uploads them one by one; the Optuna study is written as
trials go. A driver killed mid-upload (or between two saves) leaves them out of step:

- a search algorithm older than the trials still counts a finished trial as running, so at
  ``max_concurrent_trials`` it never suggests again: the resumed sweep waits for ever;
- one newer than the trials knows trials Tune has lost: it counts them against ``num_samples``, and their
  Optuna trials stay RUNNING in the study;
- trials older than the study rerun trials that the study already holds as finished.

``ResumableSearch`` restores the search algorithm as Tune does, then takes the trials of the experiment state
Tune restored (the newest, as Tune picks it) as the truth: the concurrency limiter counts exactly the trials
still to run, the trial counter is the number of trials, and the Optuna searcher follows the study
(``MultiFidelityOptunaSearch.reconcile``).
"""

from __future__ import annotations

import fnmatch
import json
import os

from ray.tune.experiment import Trial
from ray.tune.search import ConcurrencyLimiter, SearchGenerator

from q2l.progress import get_logger
from q2l.sweep.optuna_search import MultiFidelityOptunaSearch
from q2l.sweep.state_integrity import EXPERIMENT_STATE

FINISHED = (Trial.TERMINATED, Trial.ERROR)  # statuses of a trial that will not run again on resume

log = get_logger()


def restored_trials(folder: str) -> dict[str, bool]:
    """Trial id → whether it is still to run, from the newest experiment state in ``folder`` (Tune's pick)."""
    names = fnmatch.filter(os.listdir(folder), EXPERIMENT_STATE)
    if not names:
        return {}
    with open(os.path.join(folder, max(names)), encoding="utf-8") as f:
        state = json.load(f)
    trials = {}
    for trial_json, _ in state["trial_data"]:
        trial = json.loads(trial_json)
        trials[trial["trial_id"]] = trial["status"] not in FINISHED
    return trials


class ResumableSearch(SearchGenerator):
    """The sweep's searcher under a concurrency limit, consistent with Tune's trials after a restore."""

    def __init__(self, searcher: MultiFidelityOptunaSearch, max_concurrent: int) -> None:
        super().__init__(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent))

    def restore_from_dir(self, dirpath: str) -> None:
        """Tune's restore, then the counts and the study brought in line with the restored trials."""
        super().restore_from_dir(dirpath)
        trials = restored_trials(dirpath)
        to_run = {t for t, unfinished in trials.items() if unfinished}
        limiter: ConcurrencyLimiter = self.searcher
        if limiter.live_trials != to_run or self._counter != len(trials):
            log.info(
                f"resume: the saved searcher counted {self._counter} trial(s), {len(limiter.live_trials)} "
                f"running; Tune's saved trials are {len(trials)}, {len(to_run)} to run: following Tune's"
            )
        limiter.live_trials = set(to_run)
        limiter.num_unfinished_live_trials = len(to_run)
        limiter.cached_results = {}
        self._counter = len(trials)
        self._finished = False  # the Optuna searcher never ends a sweep by itself: num_samples does
        limiter.searcher.reconcile(trials)
