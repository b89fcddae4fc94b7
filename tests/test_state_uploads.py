"""Storage never holds a Tune state file whose digest is not recorded (q2l/sweep/recorded_storage.py).

A real Tune experiment on a local Ray saves its state after every step (far more often than a q2l sweep),
with its storage behind the recording filesystem, while a watcher reads the storage folder and then the
record in a real MLflow store, again and again. A driver can be SIGKILLed at any of those moments, so at
every one of them each state file in storage must match a recorded digest: otherwise ``--resume`` after the
kill would refuse it. Fast tests check the filesystem itself: the record comes first, a failed record keeps
the bytes out of storage, and the filesystem survives the pickling that sends it to Tune's trial actors.
"""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import pyarrow.fs
import pytest

from q2l.config import config_from_dict
from q2l.sweep.recorded_storage import recording, recording_filesystem
from q2l.sweep.state_integrity import (
    Manifest,
    StateRecorder,
    folder_digests,
    recorded_manifest,
    verify_state,
)

NAME = "watched"


@pytest.fixture
def sweep(mlflow_store, tmp_path):
    """(config, sweep folder, parent run id) with a parent run made as q2l makes it."""
    from mlflow import MlflowClient

    cfg = config_from_dict(
        {"mlflow": {"results_dir": str(tmp_path / "results"), "experiment": "q2l-test"}}, "test"
    )
    client = MlflowClient(tracking_uri=mlflow_store)
    folder = tmp_path / "ray" / NAME
    tags = {"q2l.kind": "sweep", "q2l.sweep": NAME, "q2l.sweep_path": str(folder)}
    run_id = client.create_run(client.create_experiment("q2l-test"), run_name=NAME, tags=tags).info.run_id
    return cfg, folder, run_id


def test_a_state_file_is_recorded_before_it_is_written_and_other_files_pass_through(sweep):
    cfg, folder, run_id = sweep
    fs, root = recording_filesystem(str(folder.parent))
    recorder = StateRecorder(cfg, run_id, Manifest(NAME, str(folder)))
    seen_in_storage_when_recorded = []
    add = recorder.add

    def add_and_look(rel, data):
        seen_in_storage_when_recorded.append((folder / rel).exists())
        add(rel, data)

    recorder.add = add_and_look
    with recording(recorder):
        fs.create_dir(f"{root}/{NAME}/trial-a")
        for rel, data in [("experiment_state-x.json", b"{}"), ("trial-a/params.pkl", b"p")]:
            with fs.open_output_stream(f"{root}/{NAME}/{rel}") as f:
                f.write(data)
        with fs.open_output_stream(f"{root}/{NAME}/trial-a/result.json") as f:
            f.write(b"{}")  # not a state file: not recorded
        # bytes from storage are not the driver's: a copy onto a state file is refused, not recorded
        with pytest.raises(OSError, match="copying onto a recorded sweep state file"):
            fs.copy_file(f"{root}/{NAME}/experiment_state-x.json", f"{root}/{NAME}/search_gen_state-x.json")
    assert seen_in_storage_when_recorded == [False, False]
    assert sorted(recorder.manifest.files) == ["experiment_state-x.json", "trial-a/params.pkl"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "experiment_state-x.json",
        "trial-a",
    ]  # no temporary file left behind, nothing copied
    assert verify_state(cfg, NAME, str(folder), run_id).files == recorder.manifest.files

    # outside `recording` (a trial actor's process) nothing is recorded and everything is written
    with fs.open_output_stream(f"{root}/{NAME}/experiment_state-x.json") as f:
        f.write(b'{"later": 1}')
    assert recorded_manifest(cfg, NAME, str(folder), run_id).files == recorder.manifest.files


def test_a_state_file_that_cannot_be_recorded_never_reaches_storage(sweep):
    cfg, folder, run_id = sweep
    fs, root = recording_filesystem(str(folder.parent))
    recorder = StateRecorder(cfg, "no-such-run", Manifest(NAME, str(folder)))
    fs.create_dir(f"{root}/{NAME}")
    with (
        recording(recorder),
        pytest.raises(Exception, match="no-such-run"),
        fs.open_output_stream(f"{root}/{NAME}/tuner.pkl") as f,
    ):
        f.write(b"tuner")
    assert list(folder.iterdir()) == []


def test_the_recording_filesystem_pickles_for_tunes_actors(tmp_path):
    fs, root = recording_filesystem(str(tmp_path))
    copy = pickle.loads(pickle.dumps(fs))
    assert copy.equals(fs) and isinstance(copy, pyarrow.fs.PyFileSystem)
    with copy.open_output_stream(f"{root}/log.txt") as f:
        f.write(b"x")
    assert (tmp_path / "log.txt").read_bytes() == b"x"


class StorageWatcher(threading.Thread):
    """Reads the storage folder, then the record (in that order: a file seen in storage must already be in
    the record read after it), and keeps every state file whose digest the record lacks."""

    def __init__(self, cfg, folder: Path, run_id: str) -> None:
        super().__init__(daemon=True)
        self.cfg, self.folder, self.run_id = cfg, folder, run_id
        self.stop = threading.Event()
        self.checks = 0
        self.unrecorded: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            in_storage = folder_digests(str(self.folder))
            manifest = recorded_manifest(self.cfg, NAME, str(self.folder), self.run_id)
            files = manifest.files if manifest else {}
            self.unrecorded += [rel for rel, d in in_storage.items() if d not in files.get(rel, [])]
            self.checks += 1
            time.sleep(0.01)


@pytest.mark.slow
def test_a_tune_run_never_leaves_an_unrecorded_state_file_in_storage(ray_local, sweep, monkeypatch):
    from ray import tune

    cfg, folder, run_id = sweep

    def steps(config):  # defined here: pickled by value, as the workers cannot import this module
        for i in range(25):
            time.sleep(0.05)
            tune.report({"score": config["x"] * i})

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")  # Tune saves and uploads its state after every step
    recorder = StateRecorder(cfg, run_id, Manifest(NAME, str(folder)))
    fs, root = recording_filesystem(str(folder.parent))
    watcher = StorageWatcher(cfg, folder, run_id)
    watcher.start()
    try:
        with recording(recorder):
            grid = tune.Tuner(
                tune.with_resources(steps, {"cpu": 1}),
                param_space={"x": tune.grid_search([1, 2, 3])},
                tune_config=tune.TuneConfig(max_concurrent_trials=1),
                run_config=tune.RunConfig(name=NAME, storage_path=root, storage_filesystem=fs, verbose=0),
            ).fit()
    finally:
        watcher.stop.set()
        watcher.join(timeout=60)
    assert not grid.errors and len(grid) == 3
    assert watcher.checks > 20, watcher.checks  # it watched the whole run, not only its end
    assert watcher.unrecorded == []
    recorded = recorded_manifest(cfg, NAME, str(folder), run_id).files
    assert {"tuner.pkl", "experiment_state", "basic-variant-state", "params.pkl"} <= {
        rel.rsplit("/", 1)[-1].split("-20")[0] for rel in recorded
    }
    assert max(len(v) for k, v in recorded.items() if k.startswith("experiment_state-")) > 1
    assert verify_state(cfg, NAME, str(folder), run_id).files == recorded
