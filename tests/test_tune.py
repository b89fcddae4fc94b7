"""Real sweeps: local Ray, Ray Train trials on the tiny demo set, a SQLite MLflow store under tmp_path.

Sweeps run through the CLI in a subprocess (``q2l tune``), as users run them: most get their own local Ray
(so these tests also cover its start-up), and the interrupt tests can send it a real SIGINT or SIGKILL. A
test whose expectations depend on how many trials fit at once joins a head started here with
``ray start --head --block --num-cpus 2`` (``ray_head``), so they hold on any machine; the job test submits
to such a head. A head is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from support import HANG_GUARD_S, free_port, wait_for

from q2l.config import Config, ConfigError
from q2l.ray_runtime import local_ray_env
from q2l.sweep.space import parse_space
from q2l.sweep.study import storage_url
from q2l.tracking import tracking_uri

REPO = Path(__file__).resolve().parents[1]
BAD_BACKBONE = "resnet_that_does_not_exist"

pytestmark = pytest.mark.slow


def sweep_config(base: Config, tmp_path: Path, **tune) -> Path:
    """``base`` (the tiny plumbing config) as a 1-worker sweep config file under ``tmp_path``."""
    cfg = base.replace(
        {
            "ray.num_workers": 1,
            "train.epochs": 2,
            "tune.searcher": "random",
            "tune.space": {
                "loss.gamma_neg": {"uniform": [0, 4]},
                "optim.lr": {"loguniform": [3e-4, 3e-3]},
            },
            **{f"tune.{k}": v for k, v in tune.items()},
        }
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(cfg.to_yaml())
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def q2l_tune(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "q2l.cli", "tune", "--config", str(config), *args]


def client_for(cfg: Config):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg), registry_uri=tracking_uri(cfg))
    return client, client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id


def sweep_runs(cfg: Config):
    """(parent runs, child runs) of the experiment."""
    client, exp = client_for(cfg)
    runs = client.search_runs([exp])
    parents = [r for r in runs if r.data.tags.get("q2l.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def seed_with_one_bad_backbone(cfg: Config, n: int) -> int:
    """A seed whose first ``n`` random draws contain the bad backbone exactly once, the good one first."""
    space = parse_space(cfg)
    for seed in range(200):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        picks = []
        for _ in range(n):
            trial = study.ask()
            space(trial)
            picks.append(trial.params["model.backbone"])
        if picks[0] == "resnet18" and picks.count(BAD_BACKBONE) == 1:
            return seed
    raise AssertionError("no seed draws the bad backbone exactly once")


def test_sweep_with_asha_records_trials_survives_a_bad_trial_and_registers_challenger(
    mlflow_tmp_config, tmp_path
):
    space = {
        "model.backbone": {"choice": ["resnet18", BAD_BACKBONE]},
        "loss.gamma_neg": {"uniform": [0, 4]},
        "optim.lr": {"loguniform": [3e-4, 3e-3]},
    }
    probe = mlflow_tmp_config.replace({"tune.space": space})
    seed = seed_with_one_bad_backbone(probe, 3)
    config = sweep_config(
        mlflow_tmp_config, tmp_path, num_samples=3, scheduler="asha", grace_period=1, seed=seed, space=space
    )
    cfg = mlflow_tmp_config
    with ray_head(cpus=HEAD_CPUS) as (env, address):
        out = subprocess.run(
            q2l_tune(config), env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=900
        )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    at_once = HEAD_CPUS  # the head's CPUs, 1 worker (1 CPU) per trial, drivers hold no CPU
    assert f"up to {at_once} at once" in out.stdout

    parents, children = sweep_runs(cfg)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len({c.data.tags["q2l.trial_id"] for c in children}) == 3

    # the bad backbone: the trial failed with an error that says so; the sweep went on
    failed = [c for c in children if c.data.tags["q2l.trial_status"] == "failed"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert f"'{BAD_BACKBONE}' is not a timm model name" in failed[0].data.tags["q2l.error"]
    assert failed[0].data.params["model.backbone"] == BAD_BACKBONE

    client, _ = client_for(cfg)
    epochs_run = 0
    for child in children:
        if child in failed:
            continue
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "holdout_map")
        assert sorted(m.step for m in history) == list(range(1, len(history) + 1))  # each epoch once
        stopped = child.data.tags["q2l.stopped_by_asha"] == "true"
        counted = int(child.data.tags["q2l.epochs_run"])  # the epochs Tune received
        # ASHA stops a trial at its epoch-1 rung, never at the last epoch (which ends with the test split)
        assert counted == (1 if stopped else 2)
        if stopped:
            # Tune's stop reaches the workers seconds later (the controller polls their reports): with
            # these ~1 s epochs a stopped trial may have logged more before it, so the record holds at least
            # the epochs Tune counted
            assert len(history) >= counted
        else:
            assert len(history) == counted and "test_map" in child.data.metrics
        epochs_run += counted
    metrics = parent.data.metrics
    assert metrics["trials_failed"] == 1 and metrics["trials_completed"] + metrics["trials_stopped"] == 2
    assert metrics["epochs_run"] == epochs_run and metrics["epoch_budget"] == 4
    # the sweep's training rate per CPU: every epoch of every trial trains on the same whole batches
    per_epoch = metrics["train_images"] / epochs_run
    batch = cfg.train.batch_size
    assert per_epoch > 0 and per_epoch == int(per_epoch) and int(per_epoch) % batch == 0
    rate = metrics["train_images"] / metrics["wall_seconds"] / at_once  # trials of 1 CPU at once
    assert metrics["train_images_per_s_per_cpu"] == pytest.approx(rate)
    held = f"({at_once} CPUs held by {at_once} trial(s) at once)"
    assert f"images/s per CPU over the sweep's wall time {held}" in out.stdout

    # leaderboard, plots, config and space on the parent run
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "leaderboard.csv",
        "leaderboard.md",
        "search_space.yaml",
        "sweep_config.yaml",
        "best_config.yaml",
    } <= (artifacts)
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/intermediate_values.png"} <= plots
    board = Path(client.download_artifacts(parent.info.run_id, "leaderboard.csv", str(tmp_path)))
    lines = board.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("rank,trial,backbone,width,gamma_neg")
    assert BAD_BACKBONE in lines[-1] and "failed" in lines[-1]  # failures rank last
    assert parent.data.params["sweep.searcher"] == "optuna-random"
    assert parent.data.params["sweep.scheduler"] == "asha"

    # the best trial's model is the new challenger, with its lineage
    mv = client.get_model_version_by_alias("q2l-demo", "challenger")
    best = parent.data.tags["q2l.best_run_id"]
    assert mv.run_id == best and mv.tags["q2l.parent_run_id"] == parent.info.run_id
    assert mv.tags["q2l.trial_id"] == parent.data.tags["q2l.best_trial"]
    assert float(mv.tags["q2l.holdout_map"]) == pytest.approx(metrics["best_holdout_map"], abs=1e-3)
    assert float(mv.tags["q2l.test_map"]) > 0 and "Best trial" in mv.description
    assert "registered q2l-demo version 1" in out.stdout and "leaderboard" in out.stdout


def progress_rows(sweep_dir: Path) -> dict[str, int]:
    """Tune's result rows per trial folder (a trial trained again would add rows)."""
    return {p.parent.name: len(p.read_text().splitlines()) for p in sweep_dir.glob("trial-*/result.json")}


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(mlflow_tmp_config, tmp_path):
    cfg = mlflow_tmp_config
    config = sweep_config(
        cfg, tmp_path, num_samples=3, max_concurrent_trials=1, scheduler="none", name="resumable"
    )
    log_file = tmp_path / "sweep.log"  # a file, not a pipe: nobody reads a pipe while we wait
    with log_file.open("w") as out:
        proc = subprocess.Popen(q2l_tune(config), env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
    sweep_dir = Path(cfg.ray.storage_path) / "resumable"
    try:
        # one trial at a time: once the second trial's folder exists, the first has finished, and the third
        # has not started, so the interrupt always finds a trial unfinished. (Files, not MLflow: a client
        # opening the SQLite store while the sweep creates it would race the schema.)
        def second_trial_started() -> bool:
            assert proc.poll() is None, f"ended before the interrupt:\n{log_file.read_text()[-4000:]}"
            return len(list(sweep_dir.glob("trial-*"))) >= 2

        wait_for(second_trial_started, "the second trial", poll=0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_file.read_text()
    assert proc.returncode != 0, log[-4000:]
    assert "continue it with --resume" in log
    parents, children = sweep_runs(cfg)
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert 1 <= len(finished) <= 2  # the first, and the second if it ended while the signal was on its way
    rows_before = progress_rows(sweep_dir)
    dirs = {c.info.run_id: f"trial-{c.data.tags['q2l.trial_id']}" for c in finished}
    assert all(rows_before[d] == 3 for d in dirs.values())  # two epochs and the final (test) report

    out = subprocess.run(
        q2l_tune(config, "--resume"), env=cli_env(), capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    parents, children = sweep_runs(cfg)
    assert len(parents) == 1 and parents[0].info.run_id == finished[0].data.tags["mlflow.parentRunId"]
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["trials_completed"] == 3
    finished_runs = [c for c in children if c.info.status == "FINISHED"]
    assert len({c.data.tags["q2l.trial_id"] for c in finished_runs}) == 3
    # the trials finished before the interrupt were not trained again: same run, same end, same two epochs
    client, _ = client_for(cfg)
    for first in finished:
        again = client.get_run(first.info.run_id)
        assert again.info.end_time == first.info.end_time
        assert [m.step for m in client.get_metric_history(first.info.run_id, "train_loss")] == [1, 2]
        assert progress_rows(sweep_dir)[dirs[first.info.run_id]] == 3
    assert client.get_model_version_by_alias("q2l-demo", "challenger").tags["q2l.parent_run_id"] == (
        parents[0].info.run_id
    )


def test_sweep_driver_killed_mid_sweep_is_finished_by_resume(mlflow_tmp_config, tmp_path):
    # SIGKILL: no handler runs, nothing is saved on the way out; --resume must still finish the sweep. Tune
    # saves its state only now and then (here only at the start: TUNE_GLOBAL_CHECKPOINT_S), the Optuna study
    # as trials go: killed once the study holds the first trial's first epoch, the resumed sweep reruns a
    # trial whose saved state is older than the study (the fast tests in test_sweep_search.py tear it more)
    cfg = mlflow_tmp_config
    config = sweep_config(
        cfg, tmp_path, num_samples=2, max_concurrent_trials=1, scheduler="none", name="killed"
    )
    log_file = tmp_path / "sweep.log"
    with log_file.open("w") as out:
        proc = subprocess.Popen(
            q2l_tune(config),
            env=cli_env(TUNE_GLOBAL_CHECKPOINT_S="3600"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: its local Ray goes with it below
        )
    sweep_dir = Path(cfg.ray.storage_path) / "killed"
    study = []
    try:
        # the study is created before Tune's first save: opened once that save is in storage
        def first_epoch_in_the_study() -> bool:
            assert proc.poll() is None, f"ended before the kill:\n{log_file.read_text()[-4000:]}"
            if not study and any(sweep_dir.glob("experiment_state*.json")):
                study.append(optuna.load_study(study_name="killed", storage=storage_url(cfg)))
            trials = study[0].get_trials(deepcopy=False) if study else []
            return bool(trials) and trials[0].state.name == "RUNNING" and 1 in trials[0].intermediate_values

        wait_for(first_epoch_in_the_study, "the first trial's first epoch in the study", poll=0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and whatever of its local Ray is left
        proc.wait(timeout=HANG_GUARD_S)
    wait_for(lambda: not group_alive(proc.pid), "the killed sweep's processes to exit")

    out, restarted = _resume_as_told(config)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    parents, children = sweep_runs(cfg)
    (parent,) = [p for p in parents if p.data.tags["q2l.sweep"] == (restarted or "killed")]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_completed"] == 2
    children = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    trial_ids = {c.data.tags["q2l.trial_id"] for c in children}
    assert len(trial_ids) == 2
    client, _ = client_for(cfg)
    for trial in trial_ids:
        runs = [c for c in children if c.data.tags["q2l.trial_id"] == trial]
        (done,) = [c for c in runs if c.info.status == "FINISHED"]  # one finished run per trial
        assert all(c.info.status in ("FINISHED", "KILLED") for c in runs)  # none left RUNNING
        steps = [m.step for m in client.get_metric_history(done.info.run_id, "train_loss")]
        assert sorted(steps) == [1, 2], trial  # each epoch once
    # the study: the rerun trial finished like the other, nothing left running
    study = optuna.load_study(study_name=restarted or "killed", storage=storage_url(cfg))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert {t.user_attrs["q2l.trial_id"] for t in study.trials} == trial_ids


def _resume_as_told(config: Path) -> tuple[subprocess.CompletedProcess, str | None]:
    """``q2l tune --resume``, then whatever its refusal says to do, as a user would: a hard kill can leave a
    state file newer than the last verified save; the refusal (exit 2, nothing loaded) names it and says to
    remove it and resume, or, when no verified state is left, to start afresh under a new ``tune.name``.

    Returns the last command's outcome and the name the sweep was restarted under (None if resumed).
    """
    args = ["--resume"]
    for _ in range(5):  # one file per refusal (experiment, search-generator and searcher state at most)
        out = subprocess.run(
            q2l_tune(config, *args), env=cli_env(), capture_output=True, text=True, timeout=HANG_GUARD_S
        )
        if out.returncode != 2 or args[0] != "--resume":
            break
        assert "nothing was loaded" in out.stderr or "no Tune experiment state" in out.stderr, out.stderr
        remove = re.search(r"rm '([^']+)' and run the same `q2l tune --resume`", out.stderr)
        afresh = re.search(r"without --resume, with --set (tune\.name=(\S+?)-restart)", out.stderr)
        if remove is not None:
            Path(remove.group(1)).unlink()
        elif afresh is not None:
            args = ["--set", afresh.group(1)]
        else:
            break
    return out, (args[1].split("=", 1)[1] if args[0] == "--set" else None)


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still running."""
    return subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, timeout=60).returncode == 0


def test_diverging_trial_fails_at_once_with_its_error(mlflow_tmp_config, tmp_path):
    # lr 10 with decoupled weight decay 1e4 scales the weights by about -4000 a step: NaN within epoch 1
    cfg = mlflow_tmp_config.replace({"optim.lr": 10.0, "optim.weight_decay": 1e4})
    space = {"loss.gamma_neg": {"uniform": [0, 4]}}
    config = sweep_config(cfg, tmp_path, num_samples=1, scheduler="none", name="diverging", space=space)
    out = subprocess.run(
        q2l_tune(config), env=cli_env(), capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]  # a failed trial does not fail the sweep
    assert log.count("starting:") == 1 and "resuming after epoch" not in log  # one attempt (max_failures 1)
    parents, (child,) = sweep_runs(cfg)
    assert parents[0].data.metrics["trials_failed"] == 1
    assert child.info.status == "FAILED" and child.data.tags["q2l.trial_status"] == "failed"
    assert "non-finite loss" in child.data.tags["q2l.error"]
    # no epoch reported, no final report, no second attempt
    assert sum(progress_rows(Path(cfg.ray.storage_path) / "diverging").values()) == 0


def test_bad_space_fails_before_ray_starts(mlflow_tmp_config):
    import ray

    from q2l.sweep.runner import run_sweep

    cfg = mlflow_tmp_config.replace({"tune.space": {"model.hidden_dim": {"int": [31, 33]}}})
    ray_before = ray.is_initialized()  # another test file's session Ray may be up
    with pytest.raises(ConfigError, match="tune.space.model.hidden_dim: value 31 is invalid"):
        run_sweep(cfg)
    assert ray.is_initialized() == ray_before
    assert not Path(cfg.ray.storage_path).exists()


# ------------------------------------------------------------------------------------- a head started here
HEAD_CPUS = 2  # the CPUs a head started here offers, whatever the machine has
RAY_BIN = Path(sys.executable).parent / "ray"


@contextlib.contextmanager
def ray_head(cpus: int, **extra_env: str) -> Iterator[tuple[dict[str, str], str]]:
    """A Ray head started here (``ray start --head --block``, ``cpus`` CPUs, dashboard, all on loopback).

    Yields (the environment for commands that use it, its GCS address for ``RAY_ADDRESS``). Its processes
    get q2l's settings for a local Ray, its own dashboard as the state API (``local_ray_env``).
    At the end it is stopped by its pid (never ``ray stop``, which would stop every head on the machine),
    and the block waits until everything it started is gone.
    """
    # a short temp dir: Ray's socket paths must stay under 107 characters
    ray_tmp = tempfile.mkdtemp(prefix="q2l-head-", dir="/tmp")
    dashboard, port = free_port(), free_port()
    env = cli_env(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # jobs run `q2l` from here
        RAY_TMPDIR=ray_tmp,
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="1",
        RAY_AUTH_MODE="token",  # the head asks for a token: our own, so ~/.ray/auth_token is left alone
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        **local_ray_env(f"http://127.0.0.1:{dashboard}"),  # for `ray job` and the head's processes
        **extra_env,
    )
    head = subprocess.Popen(
        [
            str(RAY_BIN),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--num-cpus={cpus}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: stopped below by its pid
    )
    try:

        def jobs_api_up() -> bool:
            assert head.poll() is None, head.stdout.read()[-3000:]
            r = subprocess.run([str(RAY_BIN), "job", "list"], env=env, capture_output=True, timeout=120)
            return r.returncode == 0

        wait_for(jobs_api_up, "the head's jobs API", timeout=300, poll=1)
        yield env, f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # everything the head started is gone (waited for, without a deadline other than the hang guard)
    wait_for(lambda: not group_alive(head.pid), "the head's processes to exit")


def test_sweep_submitted_as_a_ray_job_to_a_head_started_here(mlflow_tmp_config, tmp_path):
    cfg = mlflow_tmp_config
    config = sweep_config(cfg, tmp_path, num_samples=2, scheduler="none", name="jobsweep")
    job_id = f"q2l-test-{secrets.token_hex(4)}"
    with ray_head(cpus=HEAD_CPUS, Q2L_JOB_ID=job_id) as (env, _):
        out = subprocess.run(
            [str(REPO / "experiments/jobs/submit_sweep.sh"), str(config)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
        )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert f"Job '{job_id}' succeeded" in log
    assert "sweep jobsweep: 2 trials on the Ray cluster" in out.stdout  # followed logs of the job
    parents, children = sweep_runs(cfg)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert (Path(cfg.ray.storage_path) / "jobsweep" / "q2l_sweep.json").is_file()  # results came home
