"""Ray storage as a sweep's Tune sees it: a Tune state file's digest is recorded before its bytes are written.

Tune writes its state (``tuner.pkl``, the experiment, searcher and callback state, the trials' pickles) to
storage through the ``storage_filesystem`` of its run config. q2l gives it ``recording_filesystem``: the
real filesystem of ``ray.storage_path`` behind a pyarrow handler that buffers each state file
(``state_integrity.is_state_file``) written into a sweep folder this process records, has the sweep's
``StateRecorder`` record its SHA-256 in the MLflow parent run, and only then writes it, under a temporary
name first and moved into place, so storage never holds a state file whose digest is not recorded, even
when the driver is killed mid-upload. Every other file (Ray Train's checkpoints, logs) passes straight
through. Uploads run on Tune's sync thread; recording adds one MLflow write per state file uploaded.

In a process that records no sweep (a trial's actor, a Train worker) the handler passes everything through.
"""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow
import pyarrow.fs

from q2l.sweep.state_integrity import StateRecorder, is_state_file
from q2l.sweep.storage import filesystem

_LOCK = threading.Lock()
_RECORDERS: dict[str, StateRecorder] = {}  # sweep folder (path in its filesystem) -> its recorder


@contextmanager
def recording(recorder: StateRecorder) -> Iterator[None]:
    """While inside, state files written into ``recorder``'s sweep folder through a recording filesystem
    are recorded by it first."""
    _, path = filesystem(recorder.manifest.path)
    key = path.rstrip("/")
    with _LOCK:
        _RECORDERS[key] = recorder
    try:
        yield
    finally:
        with _LOCK:
            _RECORDERS.pop(key, None)


def recording_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(recording filesystem, path in it) of ``ray.storage_path`` ``uri``: what Tune gets as its storage."""
    fs, path = filesystem(uri)
    return pyarrow.fs.PyFileSystem(RecordingHandler(fs)), path


def _recorder_of(path: str) -> tuple[StateRecorder, str] | None:
    """(recorder, path relative to its sweep folder) when ``path`` is a state file of a recorded sweep."""
    with _LOCK:
        for root, recorder in _RECORDERS.items():
            if path.startswith(root + "/"):
                rel = path[len(root) + 1 :]
                return (recorder, rel) if is_state_file(rel) else None
    return None


class _RecordedUpload(io.BytesIO):
    """The bytes of one state file: recorded, then written to a temporary name and moved into place."""

    def __init__(self, fs: pyarrow.fs.FileSystem, path: str, recorder: StateRecorder, rel: str) -> None:
        super().__init__()
        self.fs, self.path, self.recorder, self.rel = fs, path, recorder, rel

    def close(self) -> None:
        if self.closed:
            return
        data = self.getvalue()
        super().close()
        self.recorder.add(self.rel, data)  # raises when it cannot record: then nothing reaches storage
        parent, _, name = self.path.rpartition("/")
        part = f"{parent}/.{name}.{uuid.uuid4().hex}.part"  # no state file's name (is_state_file)
        with self.fs.open_output_stream(part) as out:
            out.write(data)
        self.fs.move(part, self.path)


class RecordingHandler(pyarrow.fs.FileSystemHandler):
    """A pyarrow filesystem handler over ``fs`` that records state files before writing them (module doc)."""

    def __init__(self, fs: pyarrow.fs.FileSystem) -> None:
        self.fs = fs

    def __reduce__(self):
        return RecordingHandler, (self.fs,)

    def __eq__(self, other) -> bool:
        return isinstance(other, RecordingHandler) and self.fs.equals(other.fs)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"q2l-recorded-{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self._refuse_unrecordable(dest, "moving")
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self._refuse_unrecordable(dest, "copying")
        self.fs.copy_file(src, dest)

    def _refuse_unrecordable(self, path: str, what: str) -> None:
        """Bytes that come from storage (a move, a copy) or are appended there are not the driver's own:
        recording them would vouch for whatever storage holds. Tune does none of this to its state."""
        if _recorder_of(path) is not None:
            raise OSError(f"{path}: {what} onto a recorded sweep state file is not supported")

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        target = _recorder_of(path)
        if target is None:
            return self.fs.open_output_stream(path, metadata=metadata)
        return pyarrow.PythonFile(_RecordedUpload(self.fs, path, *target), mode="w")

    def open_append_stream(self, path, metadata):
        self._refuse_unrecordable(path, "appending")
        return self.fs.open_append_stream(path, metadata=metadata)
