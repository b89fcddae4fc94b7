"""Where a sweep keeps its state: ``<ray.storage_path>/<sweep name>/`` (local folder or URI).

It holds Tune's state, ``q2l_sweep.json`` (the MLflow parent run id, the resolved base config, the wall time)
and ``trials/trial-<id>/`` (each trial's Ray Train checkpoints). Anyone who can write Ray storage can write
here: ``state_integrity.py`` checks Tune's pickles against digests kept in MLflow before ``--resume``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

from q2l.config import Config, ConfigError
from q2l.sweep import record as sweep_record

STATE_FILE = "q2l_sweep.json"
# keys whose relative paths would resolve inside a Ray job's temporary copy of the working dir
_PATH_KEYS = ("data.root", "model.pretrained_path", "ray.storage_path")


def storage_root(cfg: Config) -> str:
    """``ray.storage_path`` as an absolute local path or a URI."""
    path = cfg.ray.storage_path
    if "://" in path:
        return join(path)
    return os.path.abspath(os.path.expanduser(path))


def filesystem(uri: str):
    """(pyarrow filesystem, path in it) of a local path or URI."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def join(root: str, *parts: str) -> str:
    """``root/part/...``; a URI's query (``s3://b/p?endpoint_override=...``) stays at the end."""
    base, sep, query = root.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def read_state(sweep_path: str) -> dict[str, Any] | None:
    """The sweep's ``q2l_sweep.json`` (None when there is none)."""
    import pyarrow.fs

    fs, path = filesystem(join(sweep_path, STATE_FILE))
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_state(sweep_path: str, state: dict[str, Any]) -> None:
    """Write ``q2l_sweep.json`` into the sweep folder."""
    fs, path = filesystem(join(sweep_path, STATE_FILE))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(state, indent=2).encode())


def _default_prefix(cfg: Config) -> str:
    return f"sweep-{sweep_record.registered_model_name(cfg).removeprefix('q2l-')}"


def _latest_sweep(root: str, prefix: str) -> str | None:
    """The newest sweep folder under ``root`` whose name starts with ``prefix`` and that has a state file."""
    import pyarrow.fs

    fs, path = filesystem(root)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except OSError:
        return None
    names = sorted(
        i.base_name
        for i in infos
        if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(prefix)
    )
    for name in reversed(names):  # names end with a sortable timestamp
        if read_state(join(root, name)) is not None:
            return name
    return None


def resolve_sweep(cfg: Config, resume: bool) -> tuple[str, str]:
    """(name, path) of the sweep: ``tune.name``, else a new timestamped name (the latest on ``--resume``)."""
    root = storage_root(cfg)
    name = cfg.tune.name
    if resume:
        name = name or _latest_sweep(root, _default_prefix(cfg) + "-")
        if not name or read_state(join(root, name)) is None:
            what = f"named {cfg.tune.name!r}" if cfg.tune.name else f"named {_default_prefix(cfg)}-*"
            raise ConfigError(
                f"--resume: no sweep {what} under {root} (set tune.name to the sweep to resume)"
            )
        return name, join(root, name)
    if name is None:
        name = f"{_default_prefix(cfg)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if read_state(join(root, name)) is not None:
        raise ConfigError(
            f"tune.name = {name!r}: a sweep of that name exists under {root}; pass --resume to continue it "
            f"or choose another name"
        )
    return name, join(root, name)


def check_job_paths(cfg: Config) -> None:
    """Inside a Ray job with a working dir, relative paths would point into the job's temporary copy."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job or "working_dir" not in json.loads(job).get("runtime_env", {}):
        return
    flat = cfg.flat()
    # the results folder holds the embedded MLflow store and, unless tune.storage says otherwise, the study
    uses_results = not cfg.mlflow.tracking_uri or not cfg.tune.storage
    keys = list(_PATH_KEYS) + (["mlflow.results_dir"] if uses_results else [])
    for key in keys:
        value = flat[key]
        if isinstance(value, str) and "://" not in value and not os.path.isabs(os.path.expanduser(value)):
            raise ConfigError(
                f"{key} = {value!r} is relative, and this Ray job runs in a temporary copy of its working "
                f"dir: data and results would be looked for and left there. Pass absolute paths, e.g. "
                f"--set {key}=$PWD/{value} (experiments/jobs/submit_sweep.sh does)"
            )
