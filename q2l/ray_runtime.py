"""The Ray runtime q2l runs on: joining a cluster or starting a local Ray, and reading workers' errors.

Every command that needs Ray enters ``ray_session``: it joins ``RAY_ADDRESS`` (Ray's own convention) or an
already initialised Ray, and otherwise starts a quiet local Ray bound to loopback, with the environment its
processes need (``local_ray_env``), and stops it on exit.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager


def local_ray_env(api_server_address: str = "http://127.0.0.1:1") -> dict[str, str]:
    """Environment for a local Ray started by q2l (set before ``ray.init``; its processes inherit it).

    - ``RAY_API_SERVER_ADDRESS``: Ray Train's placement-group cleaner asks the state API whether a train
      controller is alive. It finds the API server by auto-detection, which can pick another Ray instance on
      the same machine (the last ``ray start``); that one does not know our controller, so the cleaner
      removes our placement group and kills the workers mid-run. A sweep needs a real answer (when ASHA
      stops a trial, only the cleaner frees its workers' CPUs), so it points this at its own dashboard; a
      single run has no dashboard, and a closed port makes the cleaner's check fail harmlessly.
    - ``RAY_LOGGER_LEVEL=error``: a failing check warns every second.
    - ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``: nothing to watch on one machine; it logs an object-store
      warning at start.
    """
    return {
        "RAY_API_SERVER_ADDRESS": api_server_address,
        "RAY_LOGGER_LEVEL": "error",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def ray_session(dashboard: bool = False) -> Iterator[bool]:
    """Join ``RAY_ADDRESS`` (or an initialised Ray), else start a local Ray; yields whether it is local.

    ``dashboard``: a local Ray gets a dashboard on loopback and its state API is what Ray Train's
    placement-group cleaner asks (see ``local_ray_env``); sweeps need it, single runs do not.
    """
    import ray

    if ray.is_initialized():
        yield False
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        try:
            yield False
        finally:
            ray.shutdown()
        return
    if dashboard:
        port = free_port()
        env = local_ray_env(f"http://127.0.0.1:{port}")
        options = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
    else:
        env = local_ray_env()
        options = {"include_dashboard": False}
    with _environment(env):
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            logging_level=logging.WARNING,
            **options,
        )
        try:
            yield True
        finally:
            ray.shutdown()


def storage_join(root: str, *parts: str) -> str:
    """``root/part/...`` for a Ray storage path; a URI's query (``s3://b/p?k=v``) stays at the end."""
    base, sep, query = root.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def alive_nodes() -> list[dict[str, float]]:
    """Each alive node's resources (``ray.nodes()``)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def error_line(text: str) -> str:
    """The most telling line of an error text (a Ray traceback): the last ``SomeError: message`` line."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    pattern = re.compile(r"^([\w.]+(Error|Exception|Interrupt)|\w+Error\(.*)")
    for line in reversed(lines):
        if pattern.match(line):
            return line
    return lines[-1] if lines else "unknown error"


def worker_error(err: BaseException) -> str:
    """The workers' own error line from a Ray Train failure (rank 0 first)."""
    failures = getattr(err, "worker_failures", None) or {}
    texts = [str(failures[r]) for r in sorted(failures)] or [str(err)]
    return error_line(texts[0])
