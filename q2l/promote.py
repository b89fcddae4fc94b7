"""Gated promotion in the MLflow model registry: candidate vs champion on the same data, then move aliases.

``promote`` evaluates the candidate (default ``@challenger``) and the current ``@champion`` on the same split
(``promote.split``), with each model's own packaged preprocessing and the data set's label order, and applies
the gate (``promote.min_map``, ``promote.min_delta``, ``promote.max_class_drop``; with no champion the floor
alone decides). It logs the side-by-side table to an evaluation run in the experiment
``<mlflow.experiment>-promotions``; on a pass it moves ``champion`` to the candidate, the old champion to
``previous-champion``, and records tags and a description line on the version.

``rollback`` undoes the last promotion: ``champion`` goes back to ``previous-champion``, and
``previous-champion`` moves one step further back (to the version that the restored one had replaced when it
was promoted, recorded in its ``q2l.promotion.replaced`` tag) or is removed when there is none. Repeated
rollbacks therefore walk back through the promotion history; the demoted version is never re-promoted
without passing the gate again.

Errors: ``RegistryUsageError`` (unknown model/version/alias, missing evaluation data: exit 2),
``LabelMismatchError`` (candidate vs champion or evaluation data: refused, exit 1). Neither changes the
registry.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from q2l.config import Config, PromoteConfig
from q2l.evaluate import (
    EvalSplit,
    EvaluationDataError,
    LabelMismatchError,
    evaluate_split,
    label_order,
    load_split,
)
from q2l.metrics import MetricSummary
from q2l.packaging import PackagingError, Predictor, load_predictor

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
TAG = "q2l.promotion."
# how many per-class changes the table lists
TABLE_CLASS_ROWS = 5

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "PREVIOUS",
    "GateCheck",
    "LabelMismatchError",
    "PromotionResult",
    "RegistryUsageError",
    "RollbackResult",
    "comparison_table",
    "gate",
    "promote",
    "rollback",
    "run_promote",
]


class RegistryUsageError(Exception):
    """Unknown model, version or alias, or no evaluation data: nothing was evaluated or changed (exit 2)."""


@dataclass
class GateCheck:
    """One rule of the gate and how the candidate fared."""

    name: str
    passed: bool
    detail: str


@dataclass
class PromotionResult:
    """What ``promote`` found and did.

    ``status``: promoted | refused | would-promote | would-refuse (dry run) | unchanged (already champion).
    """

    model: str
    candidate_version: str
    champion_version: str | None
    status: str
    checks: list[GateCheck]
    table: str
    candidate: MetricSummary | None = None
    champion: MetricSummary | None = None
    fingerprint: str | None = None
    eval_run_id: str | None = None

    @property
    def passed(self) -> bool:
        """Whether every gate check passed."""
        return all(c.passed for c in self.checks)

    @property
    def exit_code(self) -> int:
        """0 promoted (or would be, or already champion), 1 refused."""
        return 0 if self.status in ("promoted", "would-promote", "unchanged") else 1


@dataclass
class RollbackResult:
    """The champion before and after a rollback, and where ``previous-champion`` points now (None: gone)."""

    model: str
    demoted_version: str
    champion_version: str
    previous_version: str | None = field(default=None)


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
    drops = [
        (100 * (float(b) - float(a)), name)
        for a, b, name in zip(candidate.per_class_ap, champion.per_class_ap, label_names, strict=True)
        if not (math.isnan(float(a)) or math.isnan(float(b)))
    ]
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
    for key, name in (
        ("map", "mAP"),
        ("cf1", "CF1"),
        ("of1", "OF1"),
        ("cp", "CP"),
        ("cr", "CR"),
        ("op", "OP"),
        ("or_", "OR"),
    ):
        a = getattr(candidate, key)
        b = getattr(champion, key) if champion is not None else None
        change = f"{a - b:+.2f}" if b is not None and not (math.isnan(a) or math.isnan(b)) else "-"
        lines.append(f"{name:<18}{_fmt(a):>{width}}{_fmt(b):>{width}}{change:>10}")
    if champion is not None:
        changes = [
            (100 * (float(a) - float(b)), name, 100 * float(a), 100 * float(b))
            for a, b, name in zip(candidate.per_class_ap, champion.per_class_ap, label_names, strict=True)
            if not (math.isnan(float(a)) or math.isnan(float(b)))
        ]
        changes.sort(key=lambda c: (-abs(c[0]), c[1]))
        lines.append(f"largest per-class AP changes (of {len(changes)} classes):")
        for delta, name, a, b in changes[:TABLE_CLASS_ROWS]:
            lines.append(f"  {name[:16]:<16}{a:>{width}.2f}{b:>{width}.2f}{delta:>+10.2f}")
    lines.append("gate:")
    for c in checks:
        lines.append(f"  [{'pass' if c.passed else 'FAIL'}] {c.name}: {c.detail}")
    return "\n".join(lines)


def _client(cfg: Config):
    """Point MLflow (tracking + registry) at the configured store and return a client."""
    import mlflow

    from q2l.tracking import tracking_uri

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not os.path.isfile(uri.removeprefix("sqlite:///")):
        raise RegistryUsageError(f"no MLflow store at {uri} (mlflow.tracking_uri / mlflow.results_dir)")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _require_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise RegistryUsageError(
            f"unknown registered model {name!r} (registered: {', '.join(known) if known else 'none'})"
        ) from None


def _alias_version(client, name: str, alias: str):
    """The model version behind ``alias``, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _resolve(client, name: str, ref: str):
    """``ref`` is ``@alias`` or a version number; the ModelVersion, or ``RegistryUsageError``."""
    from mlflow.exceptions import MlflowException

    ref = ref.strip()
    if ref.startswith("@"):
        mv = _alias_version(client, name, ref[1:])
        if mv is None:
            raise RegistryUsageError(
                f"model {name!r} has no alias {ref!r} (set it, or pass --candidate VERSION)"
            )
        return mv
    if not ref.isdigit():
        raise RegistryUsageError(f"--candidate {ref!r}: expected a version number or @alias")
    try:
        return client.get_model_version(name, ref)
    except MlflowException:
        raise RegistryUsageError(f"model {name!r} has no version {ref}") from None


def _load(name: str, version: str) -> Predictor:
    try:
        return load_predictor(f"models:/{name}/{version}")
    except PackagingError as e:
        raise RegistryUsageError(f"model {name!r} version {version} cannot be loaded: {e}") from None


def _splits_for(cfg: Config, predictors: list[Predictor]) -> dict[int, EvalSplit]:
    """The evaluation split once per distinct image size among ``predictors``."""
    out = {}
    for p in predictors:
        if p.image_size not in out:
            try:
                out[p.image_size] = load_split(cfg.data, cfg.promote.split, p.image_size)
            except EvaluationDataError as e:
                raise RegistryUsageError(str(e)) from None
    return out


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _log_evaluation_run(
    cfg: Config, result: PromotionResult, label_names: list[str], candidate_ref: str
) -> str:
    """An MLflow run in ``<experiment>-promotions`` with both models' metrics and the table; its id."""
    import mlflow

    from q2l.tracking import ensure_experiment

    experiment = f"{cfg.mlflow.experiment}-promotions"
    exp_id = ensure_experiment(cfg.replace({"mlflow.experiment": experiment}))
    tags = {
        "q2l.kind": "promotion",
        "q2l.model": result.model,
        "q2l.candidate_version": result.candidate_version,
        "q2l.candidate_ref": candidate_ref,
        "q2l.champion_version": result.champion_version or "none",
        "q2l.gate": "passed" if result.passed else "refused",
        "q2l.data_fingerprint": result.fingerprint or "",
        "q2l.split": cfg.promote.split,
    }
    name = f"promote {result.model} v{result.candidate_version}"
    with mlflow.start_run(experiment_id=exp_id, run_name=name, tags=tags) as run:
        mlflow.log_params({f"promote.{k}": v for k, v in vars(cfg.promote).items()})
        metrics = result.candidate.as_dict("candidate_")
        if result.champion is not None:
            metrics.update(result.champion.as_dict("champion_"))
        mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)})
        mlflow.log_text(result.table + "\n", "comparison.txt")
        per_class = {
            name: {
                "candidate_ap": _json_float(result.candidate.per_class_ap[i]),
                "champion_ap": _json_float(result.champion.per_class_ap[i])
                if result.champion is not None
                else None,
            }
            for i, name in enumerate(label_names)
        }
        mlflow.log_dict(
            {"checks": [vars(c) for c in result.checks], "per_class_ap": per_class}, "comparison.json"
        )
        return run.info.run_id


def _json_float(value) -> float | None:
    v = float(value)
    return None if math.isnan(v) else v


def _append_description(client, name: str, version: str, line: str) -> None:
    mv = client.get_model_version(name, version)
    text = f"{mv.description}\n{line}" if mv.description else line
    client.update_model_version(name, version, description=text)


def promote(
    cfg: Config,
    model: str,
    candidate: str = f"@{CHALLENGER}",
    *,
    dry_run: bool = False,
    batch_size: int = 64,
    progress: bool = False,
    echo: Callable[[str], None] = print,
) -> PromotionResult:
    """Evaluate ``candidate`` against ``@champion`` on ``promote.split`` and promote it if the gate passes.

    ``dry_run`` evaluates and prints but changes nothing (no run, no tag, no alias). Raises
    ``RegistryUsageError`` or ``LabelMismatchError`` (nothing changed); a refusal by the gate is a result with
    ``status == "refused"`` (an evaluation run is logged, the registry is unchanged).
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = _client(cfg)
    _require_model(client, model)
    cand_v = str(_resolve(client, model, candidate).version)
    champ_mv = _alias_version(client, model, CHAMPION)
    champ_version = str(champ_mv.version) if champ_mv is not None else None
    if champ_version == cand_v:
        echo(f"{model} version {cand_v} ({candidate}) is already @{CHAMPION}: nothing to do")
        return PromotionResult(model, cand_v, champ_version, "unchanged", [], "")

    cand = _load(model, cand_v)
    champ = _load(model, champ_version) if champ_version is not None else None
    if champ is not None:
        label_order(
            cand.label_names,
            champ.label_names,
            f"candidate v{cand_v}",
            f"champion v{champ_version}",
        )
    splits = _splits_for(cfg, [cand] + ([champ] if champ is not None else []))
    data = splits[cand.image_size]
    label_names = data.label_names
    label_order(cand.label_names, label_names, f"candidate v{cand_v}", "the evaluation data")
    if len({s.fingerprint for s in splits.values()}) != 1:
        raise RegistryUsageError(
            "the evaluation split differs between image sizes (data set changed while reading?)"
        )

    echo(f"evaluating {model} v{cand_v} ({candidate}) on the {data.split} split ({len(data)} images)")
    cand_summary = evaluate_split(cand, data, batch_size, progress)
    champ_summary = None
    if champ is not None:
        echo(f"evaluating {model} v{champ_version} (@{CHAMPION}) on the same split")
        champ_summary = evaluate_split(champ, splits[champ.image_size], batch_size, progress)

    checks = gate(cand_summary, champ_summary, cfg.promote, label_names)
    passed = all(c.passed for c in checks)
    header = (
        f"{model}: candidate v{cand_v} ({candidate}) vs "
        + (f"champion v{champ_version}" if champ_version else "no champion (floor only)")
        + f" | {data.split} split, {cand_summary.num_samples} images, data {data.fingerprint}"
    )
    table = comparison_table(
        f"v{cand_v}",
        cand_summary,
        f"v{champ_version}" if champ_version else None,
        champ_summary,
        label_names,
        checks,
        header,
    )
    if dry_run:
        status = "would-promote" if passed else "would-refuse"
    else:
        status = "promoted" if passed else "refused"
    result = PromotionResult(
        model,
        cand_v,
        champ_version,
        status,
        checks,
        table,
        cand_summary,
        champ_summary,
        data.fingerprint,
    )
    echo(table)
    if dry_run:
        echo(
            f"dry run: the candidate {'would be promoted' if passed else 'would be refused'}; nothing changed"
        )
        return result

    result.eval_run_id = _log_evaluation_run(cfg, result, label_names, candidate)
    if not passed:
        failed = ", ".join(c.name for c in checks if not c.passed)
        echo(
            f"REFUSED ({failed}): @{CHAMPION} stays {'v' + champ_version if champ_version else 'unset'}; "
            f"evaluation run {result.eval_run_id}"
        )
        return result

    client.set_registered_model_alias(model, CHAMPION, cand_v)
    if champ_version is not None:
        client.set_registered_model_alias(model, PREVIOUS, champ_version)
    when = _now()
    tags = {
        "gate": "passed",
        "time": when,
        "split": data.split,
        "data_fingerprint": data.fingerprint,
        "eval_run_id": result.eval_run_id,
        "replaced": champ_version or "",
        "candidate_map": f"{cand_summary.map:.4f}",
        "candidate_cf1": f"{cand_summary.cf1:.4f}",
        "candidate_of1": f"{cand_summary.of1:.4f}",
        "champion_map": f"{champ_summary.map:.4f}" if champ_summary else "none",
        "champion_cf1": f"{champ_summary.cf1:.4f}" if champ_summary else "none",
        "champion_of1": f"{champ_summary.of1:.4f}" if champ_summary else "none",
    }
    for key, value in tags.items():
        client.set_model_version_tag(model, cand_v, TAG + key, value)
    versus = (
        f"vs v{champ_version} {champ_summary.map:.2f} ({cand_summary.map - champ_summary.map:+.2f})"
        if champ_summary
        else "(first champion)"
    )
    _append_description(
        client,
        model,
        cand_v,
        f"{when} promoted to champion: {data.split} mAP {cand_summary.map:.2f} {versus}, "
        f"data {data.fingerprint}, evaluation run {result.eval_run_id}",
    )
    if champ_version is not None:
        client.set_model_version_tag(model, champ_version, "q2l.demoted", f"{when} by v{cand_v}")
    echo(
        f"PROMOTED: @{CHAMPION} -> v{cand_v}"
        + (f", @{PREVIOUS} -> v{champ_version}" if champ_version else "")
        + f"; evaluation run {result.eval_run_id}"
    )
    return result


def rollback(cfg: Config, model: str, echo: Callable[[str], None] = print) -> RollbackResult:
    """Move ``champion`` back to ``previous-champion`` and step ``previous-champion`` one promotion back."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    _require_model(client, model)
    champ = _alias_version(client, model, CHAMPION)
    prev = _alias_version(client, model, PREVIOUS)
    if champ is None:
        raise RegistryUsageError(f"model {model!r} has no @{CHAMPION}: nothing to roll back")
    if prev is None:
        raise RegistryUsageError(f"model {model!r} has no @{PREVIOUS}: nothing to roll back to")
    champ_v, prev_v = str(champ.version), str(prev.version)
    before = prev.tags.get(TAG + "replaced", "")
    if before and before not in (prev_v, champ_v):
        try:
            client.get_model_version(model, before)
        except MlflowException:
            before = ""
    else:
        before = ""
    when = _now()
    client.set_registered_model_alias(model, CHAMPION, prev_v)
    if before:
        client.set_registered_model_alias(model, PREVIOUS, before)
    else:
        client.delete_registered_model_alias(model, PREVIOUS)
    client.set_model_version_tag(model, champ_v, "q2l.rolled_back", f"{when} to v{prev_v}")
    _append_description(client, model, champ_v, f"{when} rolled back: @{CHAMPION} returned to v{prev_v}")
    _append_description(client, model, prev_v, f"{when} champion again (rollback from v{champ_v})")
    echo(
        f"ROLLED BACK: @{CHAMPION} v{champ_v} -> v{prev_v}; @{PREVIOUS} -> "
        + (f"v{before}" if before else "removed (no earlier champion recorded)")
    )
    return RollbackResult(model, champ_v, prev_v, before or None)


def run_promote(
    cfg: Config,
    model: str,
    candidate: str | None = None,
    *,
    dry_run: bool = False,
    rollback_: bool = False,
    echo: Callable[[str], None] = print,
    error: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> int:
    """``q2l promote`` (or ``--rollback``) as an exit code; messages go to ``echo``, errors to ``error``.

    0: promoted, would be promoted (dry run), already champion, or rolled back; 1: refused (gate or label
    mismatch); 2: usage error (unknown model/version/alias, no evaluation data, bad flag combination).
    """
    from q2l.tracking import TrackingUnavailableError

    try:
        if rollback_:
            if candidate is not None or dry_run:
                raise RegistryUsageError("--rollback takes neither --candidate nor --dry-run")
            rollback(cfg, model, echo)
            return 0
        ref = candidate or f"@{CHALLENGER}"
        # a progress bar per evaluation when a person watches (stderr is a terminal)
        return promote(cfg, model, ref, dry_run=dry_run, progress=sys.stderr.isatty(), echo=echo).exit_code
    except (RegistryUsageError, TrackingUnavailableError) as e:
        error(f"error: {e}")
        return 2
    except LabelMismatchError as e:
        error(f"REFUSED: {e}; nothing changed")
        return 1
