"""A sweep's trials as leaderboard rows: what each trial reached, ranked, as text, markdown and CSV.

Nothing here imports Ray or MLflow: ``results.py`` turns Tune's results into ``TrialRow`` objects first.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

COMPLETED, STOPPED, FAILED = "completed", "stopped", "failed"
# leaderboard columns always shown (config key → header); other searched keys are appended
_FIXED_COLUMNS = {
    "model.backbone": "backbone",
    "model.hidden_dim": "width",
    "loss.gamma_neg": "gamma_neg",
    "loss.gamma_pos": "gamma_pos",
    "loss.clip": "clip",
    "optim.lr": "lr",
}


@dataclass(eq=False)  # rows are compared by identity: a sweep's trials are distinct even with equal values
class TrialRow:
    """One trial's outcome, as the leaderboard and the MLflow record need it."""

    trial_id: str
    status: str  # completed | stopped (by the scheduler) | failed
    sampled: dict[str, Any]  # the searcher's config (Optuna parameter names)
    values: dict[str, Any]  # the resolved config, flat (section.key → value)
    holdout_map: float = math.nan  # best held-out mAP over the epochs it ran
    test_map: float = math.nan  # of the best weights; only trials that ran to the end have one
    epochs: int = 0
    history: list[float] = field(default_factory=list)  # held-out mAP of each epoch
    train_images: float = 0.0  # images trained on, all epochs and workers
    run_id: str | None = None  # the child MLflow run
    error: str | None = None
    order: int = 0  # creation order in the sweep (Optuna's trial number)


def fmt(value: Any) -> str:
    """A leaderboard cell: 4 significant digits, ``-`` for missing or NaN."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 0.01 or abs(value) >= 1000 else f"{value:.4g}"
    return "-" if value is None else str(value)


def ranked(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Best held-out mAP first; failed trials last."""
    return sorted(
        rows, key=lambda r: (r.status == FAILED, -(r.holdout_map if math.isfinite(r.holdout_map) else -1e9))
    )


def leaderboard(rows: Sequence[TrialRow], space_keys: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows of text) for the ranked trials: config columns, held-out/test mAP, epochs, status."""
    keys = list(_FIXED_COLUMNS) + [k for k in space_keys if k not in _FIXED_COLUMNS]
    header = ["rank", "trial"] + [_FIXED_COLUMNS.get(k, k) for k in keys]
    header += ["holdout_map", "test_map", "epochs", "status", "run_id"]
    body = []
    for i, r in enumerate(ranked(rows), 1):
        status = {STOPPED: "stopped by ASHA"}.get(r.status, r.status) + (f": {r.error}" if r.error else "")
        body.append(
            [str(i), r.trial_id]
            + [fmt(r.values.get(k)) for k in keys]
            + [fmt(r.holdout_map), fmt(r.test_map), str(r.epochs), status, r.run_id or "-"]
        )
    return header, body


def format_text(header: list[str], body: list[list[str]], max_cell: int = 60) -> str:
    """A fixed-width table for the terminal (long cells such as errors are cut)."""
    cells = [[c if len(c) <= max_cell else c[: max_cell - 1] + "…" for c in row] for row in [header, *body]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(header: list[str], body: list[list[str]]) -> str:
    """The leaderboard as a markdown table."""

    def esc(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def format_csv(header: list[str], body: list[list[str]]) -> str:
    """The leaderboard as CSV text."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(body)
    return buf.getvalue()
