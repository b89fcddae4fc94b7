"""Progress lines for people: the ``q2l`` logger, printed to stdout as ``[q2l] message``.

Every platform layer reports through this one logger (driver and Ray workers alike: Ray forwards a worker's
stdout to the driver). Ray Train replaces ``print`` in its workers with a logger that q2l silences, and the
workers' root logger is set to WARNING, so the ``q2l`` logger keeps its own handler and does not propagate.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "q2l"


class _StdoutHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is at the time of each line (pytest and Ray replace it)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # noqa: D102 - logging.StreamHandler's attribute
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def get_logger() -> logging.Logger:
    """The ``q2l`` progress logger (INFO to stdout), configured on first use."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("[q2l] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
