"""The sweep's searcher and study: samplers, the persisted study, warm starts, PRUNED trials for ASHA stops.

The fast tests use Optuna alone on a real SQLite study under ``tmp_path``. The slow ones run real Tune: a
trivial trainable through the sweep's own searcher and ASHA scheduler (deterministic stops), and two real
``q2l tune`` sweeps where the second warm-starts from the first.
"""

from __future__ import annotations

import json
import math
import pickle
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_tune import cli_env, client_for, q2l_tune, sweep_config, sweep_runs

from q2l.config import Config, ConfigError
from q2l.sweep import study as sweep_study
from q2l.sweep.resources import ResourcePlan
from q2l.sweep.space import parse_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {"loss.gamma_neg": {"uniform": [0, 4]}, "optim.lr": {"loguniform": [1e-4, 1e-2]}}


def config(tmp_path: Path, space: dict | None = None, **tune) -> Config:
    return Config().replace(
        {
            "mlflow.results_dir": str(tmp_path / "results"),
            "tune.space": space or SPACE,
            **{f"tune.{k}": v for k, v in tune.items()},
        }
    )


def earlier_sweep(tmp_path: Path, name: str = "earlier") -> list[optuna.trial.FrozenTrial]:
    """A finished sweep's study: two complete trials, one pruned after one epoch, one failed."""
    cfg = config(tmp_path)
    space = parse_space(cfg)
    sweep_study.create_study(cfg, space, name)
    study = sweep_study.load_study(cfg, name)
    for i, state in enumerate([TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE, TrialState.FAIL]):
        trial = study.ask()
        space(trial)
        trial.report(10.0 * i, step=1)
        study.tell(trial, 20.0 * i if state == TrialState.COMPLETE else None, state=state)
    return study.trials


def test_study_is_stored_under_the_results_folder_and_names_are_not_reused(tmp_path):
    cfg = config(tmp_path)
    assert sweep_study.storage_url(cfg) == f"sqlite:///{tmp_path}/results/optuna/optuna.db"
    earlier_sweep(tmp_path)
    # Optuna's own tools open it by the sweep's name
    loaded = optuna.load_study(study_name="earlier", storage=sweep_study.storage_url(cfg))
    assert [t.state for t in loaded.trials][:2] == [TrialState.COMPLETE, TrialState.PRUNED]
    with pytest.raises(ConfigError, match="tune.name = 'earlier': an Optuna study of that name exists"):
        sweep_study.check_new_study(cfg, parse_space(cfg), "earlier")


def test_password_is_hidden_in_the_shown_storage_url():
    shown = sweep_study.shown_url("postgresql+psycopg2://q2l:secret@db:5432/q2l_optuna")
    assert "secret" not in shown and shown.endswith("@db:5432/q2l_optuna")


def test_warm_start_copies_finished_and_pruned_trials_with_their_epochs(tmp_path):
    before = earlier_sweep(tmp_path)
    cfg = config(tmp_path, warm_start="earlier")
    space = parse_space(cfg)
    sweep_study.check_new_study(cfg, space, "later")
    sweep_study.create_study(cfg, space, "later")
    copied = sweep_study.load_study(cfg, "later").trials
    kept = [t for t in before if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert [t.state for t in copied] == [t.state for t in kept]
    assert [t.params for t in copied] == [t.params for t in kept]
    assert [t.intermediate_values for t in copied] == [t.intermediate_values for t in kept]
    assert [t.user_attrs[sweep_study.WARM_START_ATTR] for t in copied] == [
        f"earlier#{t.number}" for t in kept
    ]
    # the sampler goes on from them: the next trial is number 3
    assert sweep_study.load_study(cfg, "later").ask().number == len(kept)


def test_warm_start_leaves_out_trials_outside_a_narrowed_range(tmp_path):
    before = earlier_sweep(tmp_path)
    kept = [t for t in before if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    cut = sorted(t.params["loss.gamma_neg"] for t in kept)[1]  # keeps the two highest values
    narrowed = {**SPACE, "loss.gamma_neg": {"uniform": [cut, 4]}}
    cfg = config(tmp_path, narrowed, warm_start=["earlier"])
    trials, notes = sweep_study.warm_trials(cfg, parse_space(cfg), sweep_study.open_storage(cfg))
    assert len(trials) == 2 and all(t.params["loss.gamma_neg"] >= cut for t in trials)
    assert notes[-1] == "warm start: 1 trial(s) left out, with values outside this space's ranges"


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {**SPACE, "optim.lr": {"choice": [1e-3, 3e-3]}},
            r"tune.space.optim.lr: incompatible with sweep 'earlier' for tune.warm_start",
        ),
        (
            {**SPACE, "optim.lr": {"uniform": [1e-4, 1e-2]}},  # linear where it was log-scaled
            r"tune.space.optim.lr: incompatible with sweep 'earlier'",
        ),
        (
            {"loss.gamma_neg": {"uniform": [0, 4]}, "optim.lr": 1e-3},
            r"sweep 'earlier' searched 'optim.lr', which this space does not search \(tune.space.optim.lr",
        ),
    ],
)
def test_incompatible_warm_start_is_refused_naming_the_parameter(tmp_path, space, message):
    earlier_sweep(tmp_path)
    cfg = config(tmp_path, space, warm_start="earlier")
    with pytest.raises(ConfigError, match=message):
        sweep_study.check_new_study(cfg, parse_space(cfg), "later")
    assert "later" not in {s.study_name for s in optuna.get_all_study_summaries(sweep_study.storage_url(cfg))}


def test_warm_start_from_an_unknown_sweep_or_a_bad_value_is_refused(tmp_path):
    earlier_sweep(tmp_path)
    cfg = config(tmp_path, warm_start="nope")
    with pytest.raises(
        ConfigError, match=r"tune.warm_start: no study named 'nope' in .*\(studies there: earlier\)"
    ):
        sweep_study.check_new_study(cfg, parse_space(cfg), "later")
    with pytest.raises(ConfigError, match=r"tune.warm_start = 3: expected a sweep name or a list"):
        sweep_study.warm_start_names(config(tmp_path, warm_start=3))


def test_gp_searcher_builds_and_samples_the_space(tmp_path):
    from q2l.sweep.optuna_search import MultiFidelityOptunaSearch
    from q2l.sweep.search import searcher, settings

    cfg = config(tmp_path, searcher="gp", num_samples=12)
    space = parse_space(cfg)
    search = searcher(cfg, space, "gp-sweep")
    assert isinstance(search, MultiFidelityOptunaSearch)
    assert isinstance(search._sampler, optuna.samplers.GPSampler)
    suggested = search.suggest("t1")
    assert 0 <= suggested["loss.gamma_neg"] <= 4 and 1e-4 <= suggested["optim.lr"] <= 1e-2
    stored = sweep_study.load_study(cfg, "gp-sweep").trials
    assert len(stored) == 1 and stored[0].user_attrs["q2l.trial_id"] == "t1"
    plan = ResourcePlan(driver={}, per_worker={}, fits=1, max_concurrent=1)
    assert settings(cfg, plan)["searcher"] == "optuna-gp"


# ---------------------------------------------------------------- resume after a hard kill (torn saves)
# Tune saves the trials and the search algorithm as separate files, the study is written as trials go: a
# driver killed mid-save leaves them out of step. Tune's own files are written here by Tune's own code
# (``save_to_dir``); only the experiment state's trial list is written by hand, in Tune's format.
def _sweep_start(tmp_path: Path, name: str):
    """A new sweep's search algorithm (at most one trial at once) and its pickle as ``tuner.pkl`` holds it."""
    from q2l.sweep.search import search_algorithm

    cfg = config(tmp_path, searcher="optuna", num_samples=4)
    search = search_algorithm(cfg, parse_space(cfg), name, max_concurrent=1)
    from ray import cloudpickle  # as Tune pickles tuner.pkl

    return cfg, search, cloudpickle.dumps(search)


def _suggest(search, trial_id: str) -> dict:
    config = search.searcher.suggest(trial_id)
    search._counter += 1  # what Tune's create_trial_if_possible counts for each trial it creates
    return config


def _experiment_state(folder: Path, trials: dict[str, str]) -> None:
    """Tune's newest experiment state in ``folder`` with these trials (id → status)."""
    data = [[json.dumps({"trial_id": t, "status": status}), "{}"] for t, status in trials.items()]
    (folder / "experiment_state-2026-12-01_00-00-00.json").write_text(json.dumps({"trial_data": data}))


def test_resume_with_a_searcher_older_than_the_trials_goes_on_suggesting(tmp_path):
    # the hang a test run found: the saved searcher still counted a finished trial as running, so at one
    # trial at a time it never suggested again; and a rerun of a trial the study holds as finished failed a
    # CI run (UpdateFinishedTrialError)
    cfg, search, start = _sweep_start(tmp_path, "older")
    saved = tmp_path / "state"
    saved.mkdir()
    _suggest(search, "t1")
    search.on_trial_result("t1", {"epoch": 1, "best_holdout_map": 40.0})
    search.save_to_dir(str(saved), "2026-12-01_00-00-00")  # the searcher's last save: t1 running
    search.on_trial_complete("t1", {"epoch": 2, "best_holdout_map": 50.0, "test_map": 45.0})
    _suggest(search, "t2")
    search.on_trial_result("t2", {"epoch": 1, "best_holdout_map": 20.0})
    _experiment_state(saved, {"t1": "TERMINATED", "t2": "RUNNING"})  # the trials' later save, then the kill

    resumed = pickle.loads(start)  # --resume: the search algorithm of tuner.pkl, restored as Tune does
    resumed.restore_from_dir(str(saved))
    assert resumed.searcher.live_trials == {"t2"} and resumed._counter == 2
    resumed.on_trial_result("t2", {"epoch": 1, "best_holdout_map": 20.0})  # t2 reruns its first epoch
    resumed.on_trial_complete("t2", {"epoch": 2, "best_holdout_map": 30.0, "test_map": 25.0})
    assert resumed.searcher.suggest("t3") is not None  # a fresh trial: the sweep goes on
    t1, t2, t3 = sweep_study.load_study(cfg, "older").trials
    assert (t1.state, t1.value, t1.intermediate_values) == (TrialState.COMPLETE, 50.0, {1: 40.0, 2: 50.0})
    assert (t2.state, t2.value, t2.intermediate_values) == (TrialState.COMPLETE, 30.0, {1: 20.0, 2: 30.0})
    assert t3.state == TrialState.RUNNING and t3.user_attrs["q2l.trial_id"] == "t3"


def test_resume_with_a_searcher_newer_than_the_trials_fails_the_lost_trial(tmp_path):
    # the searcher was saved after t2 started, the trials before: Tune lost t2, which the study held RUNNING
    cfg, search, start = _sweep_start(tmp_path, "newer")
    saved = tmp_path / "state"
    saved.mkdir()
    _suggest(search, "t1")
    search.on_trial_complete("t1", {"epoch": 2, "best_holdout_map": 50.0, "test_map": 45.0})
    _experiment_state(saved, {"t1": "TERMINATED"})
    _suggest(search, "t2")
    search.on_trial_result("t2", {"epoch": 1, "best_holdout_map": 20.0})
    search.save_to_dir(str(saved), "2026-12-01_00-00-00")

    resumed = pickle.loads(start)
    resumed.restore_from_dir(str(saved))
    assert resumed.searcher.live_trials == set() and resumed._counter == 1  # t2 no longer counts
    assert resumed.searcher.suggest("t3") is not None
    states = [t.state for t in sweep_study.load_study(cfg, "newer").trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING]  # t2 will never finish


# ------------------------------------------------------------------------------------------ real Tune
def _scripted_trial(config: dict, *, counter: str) -> None:
    """Trial k (in creation order) reports scripted held-out mAPs per epoch, like the train layer does.

    0: 50, 60, 70 and the final test report; 1: 80, then fails; 2, 3: 10 and 20, below ASHA's cutoff.
    """
    from ray import tune

    path = Path(counter)
    k = int(path.read_text())
    path.write_text(str(k + 1))
    if k == 0:
        for epoch, value in enumerate([50.0, 60.0, 70.0], 1):
            tune.report({"epoch": epoch, "holdout_map": value, "best_holdout_map": value})
        tune.report({"epoch": 3, "best_holdout_map": 70.0, "test_map": 65.0})
        return
    if k == 1:
        tune.report({"epoch": 1, "holdout_map": 80.0, "best_holdout_map": 80.0})
        raise RuntimeError("scripted failure")
    value = 10.0 * (k - 1)
    for epoch in (1, 2, 3):
        tune.report({"epoch": epoch, "holdout_map": value, "best_holdout_map": value})


@pytest.mark.slow
def test_searcher_tells_optuna_complete_fail_and_pruned_for_asha_stops(ray_local, tmp_path):
    import sys

    from ray import cloudpickle, tune

    from q2l.sweep.search import scheduler, searcher

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    cfg = config(tmp_path, searcher="optuna", num_samples=4, grace_period=1).replace({"train.epochs": 4})
    counter = tmp_path / "counter"
    counter.write_text("0")
    tuner = tune.Tuner(
        tune.with_parameters(_scripted_trial, counter=str(counter)),
        tune_config=tune.TuneConfig(
            search_alg=searcher(cfg, parse_space(cfg), "scripted"),
            scheduler=scheduler(cfg),
            num_samples=4,
            max_concurrent_trials=1,  # one at a time: creation order is the script's order
        ),
        run_config=tune.RunConfig(
            name="scripted",
            storage_path=str(tmp_path / "ray"),
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=0,
        ),
    )
    tuner.fit()
    trials = sweep_study.load_study(cfg, "scripted").trials
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.PRUNED,
        TrialState.PRUNED,
    ]
    assert trials[0].value == 70.0 and trials[0].intermediate_values == {1: 50.0, 2: 60.0, 3: 70.0}
    assert trials[1].value is None and trials[1].intermediate_values == {1: 80.0}
    # stopped at the first rung (below the median of 50 and 80): pruned with that epoch, valued by it
    assert trials[2].intermediate_values == {1: 10.0} and trials[2].value == 10.0
    assert trials[3].intermediate_values == {1: 20.0} and trials[3].value == 20.0
    assert all(t.user_attrs["q2l.trial_id"] for t in trials)


@pytest.mark.slow
def test_sweep_study_matches_its_trials_and_a_warm_started_sweep_holds_them(mlflow_tmp_config, tmp_path):
    cfg = mlflow_tmp_config.replace({"ray.num_workers": 1})
    # rf 4 keeps only trials above the 75th percentile of the earlier ones at epoch 1: most are stopped
    first = sweep_config(cfg, tmp_path, num_samples=3, name="first", reduction_factor=4, grace_period=1)
    out = subprocess.run(q2l_tune(first), env=cli_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    assert "Optuna study first in sqlite:///" in out.stdout

    study = sweep_study.load_study(cfg, "first")
    client, _ = client_for(cfg)
    _, children = sweep_runs(cfg)
    by_trial = {c.data.tags["q2l.trial_id"]: c for c in children}
    assert sorted(t.user_attrs["q2l.trial_id"] for t in study.trials) == sorted(by_trial)
    for t in study.trials:
        run = by_trial[t.user_attrs["q2l.trial_id"]]
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "best_holdout_map")}
        status = run.data.tags["q2l.trial_status"]
        assert t.state == {"completed": TrialState.COMPLETE, "stopped": TrialState.PRUNED}[status]
        assert len(t.intermediate_values) == int(run.data.tags["q2l.epochs_run"])
        for step, value in t.intermediate_values.items():  # each epoch Tune saw, as MLflow logged it
            assert value == pytest.approx(history[step], abs=1e-4)
        assert math.isfinite(t.value)

    second = sweep_config(
        cfg, tmp_path, num_samples=1, name="second", reduction_factor=4, grace_period=1, warm_start="first"
    )
    out = subprocess.run(q2l_tune(second), env=cli_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    assert "warm start: 3 trial(s) from first" in out.stdout
    later = sweep_study.load_study(cfg, "second").trials
    copied = [t for t in later if sweep_study.WARM_START_ATTR in t.user_attrs]
    assert [(t.params, t.state, t.intermediate_values) for t in copied] == [
        (t.params, t.state, t.intermediate_values) for t in study.trials
    ]
    own = [t for t in later if t not in copied]
    assert len(own) == 1 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in own)
