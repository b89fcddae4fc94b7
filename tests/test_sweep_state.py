"""The sweep state's digests (q2l/sweep/state_integrity.py): nothing in the sweep folder is unpickled by
``--resume`` unless it matches what the driver recorded in the MLflow parent run.

Fast tests check the digest record against a real SQLite MLflow store and real files; slow ones run real
sweeps (``q2l tune`` in a subprocess, as in test_tune.py), interrupt them with SIGINT or SIGKILL, replace
state files with pickles whose unpickling would create a marker file, and resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_tune import cli_env, q2l_tune, sweep_config, sweep_runs

from q2l.config import config_from_dict
from q2l.sweep.state_integrity import (
    STATE_TAG,
    Manifest,
    SweepStateError,
    folder_digests,
    is_state_file,
    verify_state,
    write_manifest,
)

NAME = "guarded"


class _Marker:
    """Unpickling it runs a command that creates ``path``: what a crafted state file would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def crafted_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Marker(marker))


# ------------------------------------------------------------------------------------------ fast
@pytest.fixture
def store(mlflow_store, tmp_path):
    """(config, sweep folder, staging folder, parent run id) with a parent run made as q2l makes it."""
    from mlflow import MlflowClient

    cfg = config_from_dict(
        {"mlflow": {"results_dir": str(tmp_path / "results"), "experiment": "q2l-test"}}, "test"
    )
    client = MlflowClient(tracking_uri=mlflow_store)
    exp = client.create_experiment("q2l-test")
    sweep = tmp_path / "ray" / NAME
    tags = {"q2l.kind": "sweep", "q2l.sweep": NAME, "q2l.sweep_path": str(sweep)}
    run_id = client.create_run(exp, run_name=NAME, tags=tags).info.run_id
    staging = tmp_path / "staging"
    files = {
        "tuner.pkl": pickle.dumps({"tuner": 1}),
        "experiment_state-2026-01-01_00-00-00.json": b'{"trial_data": []}',
        "searcher-state-2026-01-01_00-00-00.pkl": pickle.dumps({"searcher": 1}),
        "search_gen_state-2026-01-01_00-00-00.json": pickle.dumps({"gen": 1}),
        "trial-a/params.pkl": pickle.dumps({"lr": 0.1}),
        "trial-a/error.pkl": pickle.dumps(ValueError("boom")),
        "trial-a/result.json": b"{}",
        "trials/trial-a/checkpoint_1/engine.pt": b"weights",
        "q2l_sweep.json": json.dumps({"parent_run_id": run_id}).encode(),
    }
    for rel, data in files.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    return cfg, sweep, staging, run_id


def record_and_upload(cfg, sweep: Path, staging: Path, run_id: str, manifest: Manifest | None = None):
    """What the driver does: record the staging folder's digests, then Tune uploads it."""
    manifest = (manifest or Manifest(NAME, str(sweep))).merged(folder_digests(str(staging)))
    write_manifest(cfg, run_id, manifest)
    shutil.copytree(staging, sweep, dirs_exist_ok=True)
    return manifest


def test_which_files_are_recorded():
    assert is_state_file("tuner.pkl") and is_state_file("experiment_state-x.json")
    assert is_state_file("search_gen_state-x.json") and is_state_file("callback-states-x.pkl")
    assert is_state_file("trial-a/error.pkl") and is_state_file("trial-a/deep/er/x.pkl")
    assert not is_state_file("q2l_sweep.json")  # q2l's own JSON, never unpickled
    assert not is_state_file("trial-a/result.json") and not is_state_file("trials/trial-a/x.pkl")


def test_recorded_state_verifies_and_a_replaced_pickle_is_refused_by_name(store, tmp_path):
    cfg, sweep, staging, run_id = store
    recorded = record_and_upload(cfg, sweep, staging, run_id)
    assert "trials/trial-a/checkpoint_1/engine.pt" not in recorded.files
    assert verify_state(cfg, NAME, str(sweep), run_id).files == recorded.files

    target = sweep / "searcher-state-2026-01-01_00-00-00.pkl"
    original = target.read_bytes()
    target.write_bytes(crafted_pickle(tmp_path / "marker"))
    with pytest.raises(SweepStateError, match=f"{target} differs from every version") as e:
        verify_state(cfg, NAME, str(sweep), run_id)
    assert f"rm '{target}'" in str(e.value) and "q2l tune --resume" in str(e.value)
    assert not (tmp_path / "marker").exists()
    target.write_bytes(original)

    # q2l's JSON and Ray Train's folders are not Tune pickles: changes there are not refused here
    (sweep / "q2l_sweep.json").write_text('{"parent_run_id": "x"}')
    (sweep / "trials" / "trial-a" / "checkpoint_1" / "engine.pt").write_bytes(b"other")
    verify_state(cfg, NAME, str(sweep), run_id)


@pytest.mark.parametrize(
    "extra", ["callback-states-2999-01-01_00-00-00.pkl", "trial-b/error.pkl", "notes.json"]
)
def test_an_unrecorded_state_file_is_refused(store, tmp_path, extra):
    cfg, sweep, staging, run_id = store
    record_and_upload(cfg, sweep, staging, run_id)
    (sweep / extra).parent.mkdir(parents=True, exist_ok=True)
    (sweep / extra).write_bytes(crafted_pickle(tmp_path / "marker"))
    with pytest.raises(SweepStateError, match=f"{sweep / extra} was never recorded"):
        verify_state(cfg, NAME, str(sweep), run_id)


def test_a_replaced_tuner_file_cannot_be_removed_away(store, tmp_path):
    cfg, sweep, staging, run_id = store
    record_and_upload(cfg, sweep, staging, run_id)
    (sweep / "tuner.pkl").write_bytes(crafted_pickle(tmp_path / "marker"))
    with pytest.raises(SweepStateError, match="start it afresh.*--set tune.name=guarded-restart") as e:
        verify_state(cfg, NAME, str(sweep), run_id)
    assert "rm '" not in str(e.value)


def test_storage_behind_the_staging_folder_verifies_but_bytes_never_produced_do_not(store):
    cfg, sweep, staging, run_id = store
    manifest = record_and_upload(cfg, sweep, staging, run_id)
    # the driver saves again (recorded) and is killed before the upload: storage holds the older version
    state = staging / "experiment_state-2026-01-01_00-00-00.json"
    state.write_bytes(b'{"trial_data": [1]}')
    write_manifest(cfg, run_id, manifest.merged(folder_digests(str(staging))))
    verify_state(cfg, NAME, str(sweep), run_id)
    (sweep / state.name).write_bytes(b'{"trial_data": [2]}')
    with pytest.raises(SweepStateError, match=state.name):
        verify_state(cfg, NAME, str(sweep), run_id)
    # a removed file is not loaded; with no experiment state left there is nothing to resume
    (sweep / state.name).unlink()
    with pytest.raises(SweepStateError, match="no Tune experiment state"):
        verify_state(cfg, NAME, str(sweep), run_id)


def test_no_record_is_refused_with_the_next_command(store):
    cfg, sweep, staging, run_id = store
    shutil.copytree(staging, sweep)
    with pytest.raises(SweepStateError, match="holds no record.*--set tune.name=guarded-restart"):
        verify_state(cfg, NAME, str(sweep), run_id)


def test_a_tampered_record_is_no_record(store):
    from mlflow import MlflowClient

    from q2l.tracking import tracking_uri

    cfg, sweep, staging, run_id = store
    record_and_upload(cfg, sweep, staging, run_id)
    MlflowClient(tracking_uri=tracking_uri(cfg)).set_tag(run_id, f"{STATE_TAG}.manifest.0", "{}")
    with pytest.raises(SweepStateError, match="holds no record"):
        verify_state(cfg, NAME, str(sweep), run_id)


def test_the_parent_run_must_be_this_sweeps(store):
    """q2l_sweep.json (in Ray storage) names the parent run: pointing it elsewhere is refused."""
    from mlflow import MlflowClient

    from q2l.tracking import tracking_uri

    cfg, sweep, staging, run_id = store
    record_and_upload(cfg, sweep, staging, run_id)
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    exp = client.get_experiment_by_name("q2l-test").experiment_id
    tags = {"q2l.kind": "sweep", "q2l.sweep": "other", "q2l.sweep_path": str(sweep.parent / "other")}
    other = client.create_run(exp, run_name="other", tags=tags).info.run_id
    write_manifest(
        cfg, other, Manifest("other", str(sweep.parent / "other")).merged(folder_digests(str(sweep)))
    )
    with pytest.raises(SweepStateError, match=f"names MLflow run '{other}'.*q2l.sweep = 'other'"):
        verify_state(cfg, NAME, str(sweep), other)
    with pytest.raises(SweepStateError, match="there is no such run"):
        verify_state(cfg, NAME, str(sweep), "0" * 32)


def test_a_large_record_is_kept_in_chunks(store):
    from mlflow import MlflowClient

    from q2l.tracking import tracking_uri

    cfg, sweep, staging, run_id = store
    for i in range(300):  # a 300-trial sweep: one params.pkl each
        (staging / f"trial-{i:04d}").mkdir()
        (staging / f"trial-{i:04d}" / "params.pkl").write_bytes(pickle.dumps(i))
    record_and_upload(cfg, sweep, staging, run_id)
    tags = MlflowClient(tracking_uri=tracking_uri(cfg)).get_run(run_id).data.tags
    assert int(tags[f"{STATE_TAG}.chunks"]) > 1
    assert len(verify_state(cfg, NAME, str(sweep), run_id).files) == 306


# ------------------------------------------------------------------------------------------ slow
def wait_for_trials(proc, log_file: Path, sweep_dir: Path, n: int) -> None:
    """Until ``n`` trial folders exist (one trial at a time: the first ``n - 1`` have finished)."""
    while len(list(sweep_dir.glob("trial-*"))) < n:
        assert proc.poll() is None, f"ended early:\n{log_file.read_text()[-4000:]}"
        time.sleep(1)


def resume(config: Path):
    return subprocess.run(
        q2l_tune(config, "--resume"), env=cli_env(), capture_output=True, text=True, timeout=420
    )


def start_sweep(config: Path, log_file: Path) -> subprocess.Popen:
    with log_file.open("w") as out:
        # its own process group: after a SIGKILL the local Ray it started is stopped by that group's id
        return subprocess.Popen(
            q2l_tune(config), env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def interrupted_sweep(cfg, tmp_path: Path, sig: int) -> tuple[Path, Path, Path]:
    """A two-trial sweep sent ``sig`` once both trials have started; (config, sweep folder, its log)."""
    config = sweep_config(cfg, tmp_path, num_samples=2, max_concurrent_trials=1, scheduler="none", name=NAME)
    sweep_dir = Path(cfg.ray.storage_path) / NAME
    log_file = tmp_path / "sweep.log"
    proc = start_sweep(config, log_file)
    try:
        wait_for_trials(proc, log_file, sweep_dir, 2)
        proc.send_signal(sig)
        proc.wait(timeout=180)
    finally:
        stop_group(proc)  # the local Ray it started
    return config, sweep_dir, log_file


@pytest.mark.slow
def test_interrupted_sweep_refuses_crafted_state_and_resumes_untouched(mlflow_tmp_config, tmp_path):
    cfg = mlflow_tmp_config
    config, sweep_dir, log_file = interrupted_sweep(cfg, tmp_path, signal.SIGINT)
    assert "continue it with --resume" in log_file.read_text()
    (parent,), children = sweep_runs(cfg)
    assert int(parent.data.tags[f"{STATE_TAG}.chunks"]) >= 1

    marker = tmp_path / "pwned"
    evil = crafted_pickle(marker)
    (searcher,) = sweep_dir.glob("searcher-state-*.pkl")
    (experiment,) = sweep_dir.glob("experiment_state-*.json")
    trial = next(sweep_dir.glob("trial-*"))
    embedded = {"trial_data": [], "runner_data": {"_type": "CLOUDPICKLE_FALLBACK", "value": evil.hex()}}
    attacks = {  # file -> crafted content (None: put the original back afterwards; else remove it)
        searcher: evil,
        sweep_dir / "tuner.pkl": evil,
        experiment: json.dumps(embedded).encode(),
        sweep_dir / "callback-states-2999-01-01_00-00-00.pkl": evil,
        trial / "error.pkl": evil,
    }
    for target, crafted in attacks.items():
        original = target.read_bytes() if target.exists() else None
        target.write_bytes(crafted)
        out = resume(config)
        assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
        assert str(target) in out.stderr and "nothing was loaded" in out.stderr
        assert not marker.exists()
        if original is None:
            target.unlink()
        else:
            target.write_bytes(original)

    # q2l_sweep.json points the sweep at another run (a trial's): refused before anything is read
    state_file = sweep_dir / "q2l_sweep.json"
    state = state_file.read_text()
    state_file.write_text(state.replace(parent.info.run_id, children[0].info.run_id))
    out = resume(config)
    assert out.returncode == 2 and "that run is not it" in out.stderr, out.stderr[-3000:]
    state_file.write_text(state)

    out = resume(config)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    assert not marker.exists()
    (parent,), children = sweep_runs(cfg)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_completed"] == 2


@pytest.mark.slow
def test_sweep_resumes_after_its_driver_is_killed(mlflow_tmp_config, tmp_path):
    """SIGKILL leaves no chance to record at the end: the digests recorded while it ran verify the state."""
    cfg = mlflow_tmp_config
    config, _, _ = interrupted_sweep(cfg, tmp_path, signal.SIGKILL)
    out = resume(config)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    (parent,), children = sweep_runs(cfg)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_completed"] == 2
