"""The promotion gate's rules and the side-by-side table a promotion prints and records."""

from __future__ import annotations

import math
from dataclasses import dataclass

from q2l.config import PromoteConfig
from q2l.metrics import MetricSummary

# how many per-class changes the table lists
TABLE_CLASS_ROWS = 5
_TABLE_METRICS = (
    ("map", "mAP"),
    ("cf1", "CF1"),
    ("of1", "OF1"),
    ("cp", "CP"),
    ("cr", "CR"),
    ("op", "OP"),
    ("or_", "OR"),
)


@dataclass
class GateCheck:
    """One rule of the gate and how the candidate fared."""

    name: str
    passed: bool
    detail: str


def _class_changes(candidate: MetricSummary, champion: MetricSummary, label_names: list[str]):
    """(candidate AP − champion AP, name, candidate AP, champion AP) in AP points, classes scored by both."""
    return [
        (100 * (float(a) - float(b)), name, 100 * float(a), 100 * float(b))
        for a, b, name in zip(candidate.per_class_ap, champion.per_class_ap, label_names, strict=True)
        if not (math.isnan(float(a)) or math.isnan(float(b)))
    ]


def gate(
    candidate: MetricSummary, champion: MetricSummary | None, pc: PromoteConfig, label_names: list[str]
) -> list[GateCheck]:
    """The gate's checks: floor, improvement over the champion by ``min_delta``, largest per-class AP drop.

    Per-class drops are in AP points (0-100), over classes with positives in the evaluation data.
    """
    cand = candidate.map
    checks = [
        GateCheck(
            "floor", not math.isnan(cand) and cand >= pc.min_map, f"mAP {cand:.2f} >= floor {pc.min_map:.2f}"
        )
    ]
    if champion is None:
        return checks
    need = champion.map + pc.min_delta
    checks.append(
        GateCheck(
            "delta",
            not math.isnan(cand) and cand >= need,
            f"mAP {cand:.2f} >= champion {champion.map:.2f} {pc.min_delta:+.2f} = {need:.2f}",
        )
    )
    drops = [(-delta, name) for delta, name, _, _ in _class_changes(candidate, champion, label_names)]
    worst, worst_name = max(drops, default=(0.0, "-"))
    checks.append(
        GateCheck(
            "class_drop",
            worst <= pc.max_class_drop,
            f"largest per-class AP drop {max(worst, 0.0):.2f} ({worst_name}) <= {pc.max_class_drop:.2f}",
        )
    )
    return checks


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def comparison_table(
    candidate_label: str,
    candidate: MetricSummary,
    champion_label: str | None,
    champion: MetricSummary | None,
    label_names: list[str],
    checks: list[GateCheck],
    header: str,
) -> str:
    """The side-by-side table: mAP, CF1, OF1 (and CP/CR/OP/OR), largest per-class AP changes, the gate."""
    champ_col = champion_label or "(no champion)"
    width = max(12, len(candidate_label), len(champ_col)) + 2
    lines = [header, f"{'metric':<18}{candidate_label:>{width}}{champ_col:>{width}}{'change':>10}"]
    for key, name in _TABLE_METRICS:
        a = getattr(candidate, key)
        b = getattr(champion, key) if champion is not None else None
        change = f"{a - b:+.2f}" if b is not None and not (math.isnan(a) or math.isnan(b)) else "-"
        lines.append(f"{name:<18}{_fmt(a):>{width}}{_fmt(b):>{width}}{change:>10}")
    if champion is not None:
        changes = _class_changes(candidate, champion, label_names)
        changes.sort(key=lambda c: (-abs(c[0]), c[1]))
        lines.append(f"largest per-class AP changes (of {len(changes)} classes):")
        for delta, name, a, b in changes[:TABLE_CLASS_ROWS]:
            lines.append(f"  {name[:16]:<16}{a:>{width}.2f}{b:>{width}.2f}{delta:>+10.2f}")
    lines.append("gate:")
    for c in checks:
        lines.append(f"  [{'pass' if c.passed else 'FAIL'}] {c.name}: {c.detail}")
    return "\n".join(lines)
