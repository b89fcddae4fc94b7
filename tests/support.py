"""Helpers shared by the test modules: a free port, the current MLflow URI for a block, waiting on an event.

Import them as ``from support import free_port, mlflow_uri, wait_for`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from q2l.ray_runtime import free_port

__all__ = ["HANG_GUARD_S", "free_port", "mlflow_uri", "wait_for"]

# how long a wait may take before a test calls it a hang: generous, so a busy machine never fails a test
HANG_GUARD_S = 600.0


@contextmanager
def mlflow_uri(uri: str) -> Iterator[str]:
    """Make ``uri`` MLflow's tracking and registry URI inside the block; the previous ones come back after."""
    import mlflow

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def wait_for(check: Callable[[], object], what: str, timeout: float = HANG_GUARD_S, poll: float = 0.2):
    """Poll ``check`` until it returns something true and return that; fail after ``timeout`` (a hang).

    ``timeout`` only guards against hangs; it is never a statement about speed. ``check`` may raise (an
    assertion that the watched process is still alive, say) to end the wait early.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"still waiting for {what} after {timeout:.0f} s (a hang?)"
        time.sleep(poll)
