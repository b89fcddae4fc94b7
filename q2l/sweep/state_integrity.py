"""Digests of a sweep's Tune state, kept in its MLflow parent run and checked before ``--resume`` loads it.

``Tuner.restore`` unpickles files from the sweep folder in Ray storage, which anyone with write access to
that storage can replace: ``tuner.pkl``, the newest ``experiment_state-*.json`` (JSON with cloudpickled
trials inside), ``search_gen_state-*.json`` (a pickle despite its name), ``searcher-state-*.pkl``,
``callback-states-*.pkl`` when present, and the result of the restored run reads each failed trial's
``trial-<id>/error.pkl``. So the driver records a SHA-256 of each such file (every ``*.pkl`` and top-level
``*.json`` outside ``trials/``, ``q2l_sweep.json`` aside) in tags of the sweep's MLflow parent run, where
only MLflow users can write, and ``--resume`` refuses the folder unless every one of them matches.

The digests are recorded before the bytes reach storage: Tune writes its state to storage through the
recording filesystem of ``recorded_storage.py``, which has the sweep's ``StateRecorder`` record each state
file's digest and only then writes it (to a temporary name, moved into place). So a driver killed at any
moment leaves in storage only state files whose digests are recorded. Each file keeps its last
``_HISTORY`` digests (a kill between the record and the write leaves the previous version in storage).

Ray Train's folders under ``trials/`` are read by the trial workers (weights with ``weights_only=True``,
JSON), never unpickled by the driver, and are not covered.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import threading
from dataclasses import asdict, dataclass, field

from q2l import tracking
from q2l.config import Config
from q2l.sweep.record import SWEEP_TAG
from q2l.sweep.storage import STATE_FILE, filesystem, join

TUNER_FILE = "tuner.pkl"
TRAIN_DIR = "trials"  # Ray Train's checkpoint folders (see the module docstring)
EXPERIMENT_STATE = "experiment_state-*.json"  # what Tune restores trials from (the newest one)
STATE_TAG = "q2l.state"  # tags q2l.state.sha256, q2l.state.chunks, q2l.state.manifest.<i>
_CHUNK_CHARS = 7500  # MLflow holds tag values of up to 8000 characters
_TAGS_PER_BATCH = 100  # MLflow's limit per log_batch
_HISTORY = 6


class SweepStateError(Exception):
    """The sweep's saved state could not be verified; nothing of it was loaded."""


def is_state_file(rel: str) -> bool:
    """Whether ``rel`` (relative to the sweep folder) is a file whose digest must be recorded."""
    top, _, rest = rel.partition("/")
    if not rest:
        return top != STATE_FILE and top.endswith((".pkl", ".json"))
    return top != TRAIN_DIR and rel.endswith(".pkl")


@dataclass
class Manifest:
    """The recorded digests of one sweep: file (relative to its folder) -> digests, newest first."""

    sweep: str
    path: str
    files: dict[str, list[str]] = field(default_factory=dict)

    def merged(self, seen: dict[str, str]) -> Manifest:
        """This manifest with the digests in ``seen`` added as each file's newest."""
        files = {k: list(v) for k, v in self.files.items()}
        for rel, digest in seen.items():
            old = [d for d in files.get(rel, []) if d != digest]
            files[rel] = [digest, *old][:_HISTORY]
        return Manifest(self.sweep, self.path, files)

    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_digests(root: str) -> dict[str, str]:
    """Digest of every state file (``is_state_file``) in the sweep folder or staging folder ``root``."""
    import pyarrow.fs

    fs, base = filesystem(root)
    base = base.rstrip("/")
    out = {}
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
    for info in infos:
        if info.type == pyarrow.fs.FileType.Directory and info.base_name != TRAIN_DIR:
            infos_below = fs.get_file_info(pyarrow.fs.FileSelector(info.path, recursive=True))
        else:
            infos_below = [info]
        for f in infos_below:
            rel = f.path[len(base) :].lstrip("/")
            if f.type == pyarrow.fs.FileType.File and is_state_file(rel):
                with fs.open_input_stream(f.path) as stream:
                    out[rel] = _sha256(stream.read())
    return out


# ------------------------------------------------------------------------------------------ MLflow record
def write_manifest(cfg: Config, run_id: str, manifest: Manifest) -> None:
    """Record ``manifest`` in tags of the parent run (chunks first, their digest last: a torn write fails)."""
    from mlflow.entities import RunTag

    text = manifest.text()
    chunks = [text[i : i + _CHUNK_CHARS] for i in range(0, len(text), _CHUNK_CHARS)]
    tags = [RunTag(f"{STATE_TAG}.manifest.{i}", c) for i, c in enumerate(chunks)]
    tags += [
        RunTag(f"{STATE_TAG}.chunks", str(len(chunks))),
        RunTag(f"{STATE_TAG}.sha256", _sha256(text.encode())),
    ]
    client = tracking.client(cfg)
    for i in range(0, len(tags), _TAGS_PER_BATCH):
        client.log_batch(run_id, tags=tags[i : i + _TAGS_PER_BATCH])


def _read_manifest(tags: dict[str, str]) -> Manifest | None:
    """The manifest in a parent run's tags; None when there is none or it is incomplete."""
    try:
        n = int(tags[f"{STATE_TAG}.chunks"])
        text = "".join(tags[f"{STATE_TAG}.manifest.{i}"] for i in range(n))
    except (KeyError, ValueError):
        return None
    if _sha256(text.encode()) != tags.get(f"{STATE_TAG}.sha256"):
        return None
    raw = json.loads(text)
    return Manifest(raw["sweep"], raw["path"], {k: list(v) for k, v in raw["files"].items()})


def _parent_tags(cfg: Config, name: str, path: str, run_id: str) -> dict[str, str]:
    """The tags of the parent run ``run_id`` (named in q2l_sweep.json, which storage writers can change),
    once it is checked to be sweep ``name``'s, at ``path``, in this config's experiment."""
    from mlflow.exceptions import MlflowException

    client = tracking.client(cfg)
    where = f"--resume: {join(path, STATE_FILE)} names MLflow run {run_id!r} as sweep {name}'s parent run"
    try:
        run = client.get_run(str(run_id))
    except MlflowException:
        raise SweepStateError(f"{where}, and there is no such run") from None
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    tags = run.data.tags
    expected = {"q2l.kind": "sweep", SWEEP_TAG: name, "q2l.sweep_path": path, "mlflow.runName": name}
    wrong = [f"{k} = {tags.get(k)!r}" for k, v in expected.items() if tags.get(k) != v]
    if exp is None or run.info.experiment_id != exp.experiment_id:
        wrong.append(f"experiment id {run.info.experiment_id} (not {cfg.mlflow.experiment!r})")
    if wrong:
        raise SweepStateError(
            f"{where}, but that run is not it ({'; '.join(wrong)}); nothing was loaded from {path}"
        )
    return tags


def recorded_manifest(cfg: Config, name: str, path: str, run_id: str) -> Manifest | None:
    """The digests recorded for sweep ``name`` at ``path`` in its parent run ``run_id`` (None: no record)."""
    manifest = _read_manifest(_parent_tags(cfg, name, path, run_id))
    if manifest is None or (manifest.sweep, manifest.path) != (name, path):
        return None
    return manifest


# ------------------------------------------------------------------------------------------ verification
def verify_state(cfg: Config, name: str, path: str, run_id: str) -> Manifest:
    """Check every state file in the sweep folder ``path`` against the digests recorded in its parent run.

    Returns the recorded manifest; raises ``SweepStateError`` naming the file (and what to do) when a file
    is unrecorded or differs, when there is no record, or when no experiment state is left to restore.
    """
    manifest = recorded_manifest(cfg, name, path, run_id)
    if manifest is None:
        raise SweepStateError(
            f"MLflow parent run {run_id} of sweep {name} holds no record of the digests of its Tune "
            f"state (tags {STATE_TAG}.*), so {path} cannot be verified and nothing was loaded from it "
            f"(a sweep started before q2l recorded them, or one whose driver died before recording any). "
            f"Start the sweep afresh under a new name: your `q2l tune` command without --resume, with "
            f"--set tune.name={name}-restart"
        )
    found = folder_digests(path)
    for rel, digest in sorted(found.items()):
        known = manifest.files.get(rel)
        if known is None or digest not in known:
            raise SweepStateError(_refusal(name, path, run_id, rel, digest, recorded=known is not None))
    if not any(fnmatch.fnmatch(rel, EXPERIMENT_STATE) for rel in found):
        raise SweepStateError(
            f"{path} holds no Tune experiment state ({EXPERIMENT_STATE}) to restore; start the "
            f"sweep afresh: your `q2l tune` command without --resume, with --set tune.name={name}-restart"
        )
    return manifest


def _refusal(name: str, path: str, run_id: str, rel: str, digest: str, *, recorded: bool) -> str:
    file = join(path, rel)
    what = (
        f"differs from every version sweep {name}'s driver recorded (sha256 {digest[:16]}...)"
        if recorded
        else "was never recorded by the sweep's driver"
    )
    head = (
        f"{file} {what} in MLflow parent run {run_id}; nothing was loaded from {path}. Something "
        f"other than the sweep's driver wrote it."
    )
    fresh = f"your `q2l tune` command without --resume, with --set tune.name={name}-restart"
    if rel == TUNER_FILE:
        return f"{head} The sweep cannot be resumed without it: start it afresh, {fresh}"
    return (
        f"{head} To resume from the state that does verify, remove it (Tune then restores from the "
        f"older state files; trials after them run again): rm '{file}' and run the same `q2l tune --resume` "
        f"command again; or start afresh, {fresh}"
    )


# ------------------------------------------------------------------------------------------ recording
class StateRecorder:
    """Records the digests of a sweep's Tune state files in its MLflow parent run, one file at a time, as
    ``recorded_storage.py`` is about to write each to storage."""

    def __init__(self, cfg: Config, run_id: str, manifest: Manifest) -> None:
        self.cfg, self.run_id, self.manifest = cfg, run_id, manifest
        self._lock = threading.Lock()

    def add(self, rel: str, data: bytes) -> None:
        """Record ``data`` as the newest version of the state file ``rel`` (relative to the sweep folder)."""
        with self._lock:
            manifest = self.manifest.merged({rel: _sha256(data)})
            if manifest.files != self.manifest.files:
                write_manifest(self.cfg, self.run_id, manifest)
                self.manifest = manifest
