"""Gated promotion in the MLflow model registry: candidate vs champion on the same data, then move aliases.

``promote`` evaluates the candidate (default ``@challenger``) and the current ``@champion`` on the same split
(``promote.split``), with each model's own packaged preprocessing and the data set's label order, and applies
the gate (``promote.min_map``, ``promote.min_delta``, ``promote.max_class_drop``; with no champion the floor
alone decides; ``q2l/registry/gate.py``). It logs the side-by-side table to an evaluation run in the
experiment ``<mlflow.experiment>-promotions``; on a pass it moves ``previous-champion`` to the old champion,
then ``champion`` to the candidate, and records tags and a description line on the version.

``rollback`` undoes the last promotion: ``champion`` goes back to ``previous-champion``, and
``previous-champion`` moves one step further back (to the version that the restored one had replaced when it
was promoted, recorded in its ``q2l.promotion.replaced`` tag) or is removed when there is none. Repeated
rollbacks therefore walk back through the promotion history; the demoted version is never re-promoted
without passing the gate again.

The registry writes of both are recorded before they are made and completed by the next command if a run
is interrupted between them (``q2l/registry/writes.py``). Errors: ``RegistryUsageError`` (unknown
model/version/alias, missing evaluation data: exit 2), ``LabelMismatchError`` (candidate vs champion or
evaluation data: refused, exit 1). Neither changes the registry.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from q2l.config import Config
from q2l.metrics import MetricSummary
from q2l.packaging import PackagingError, Predictor, load_predictor
from q2l.progress import get_logger
from q2l.registry.aliases import (
    CHALLENGER,
    CHAMPION,
    DEMOTED_TAG,
    PREVIOUS,
    ROLLED_BACK_TAG,
    TAG,
    RegistryUsageError,
    alias_number,
    alias_version,
    open_registry,
    require_model,
    resolve,
)
from q2l.registry.evaluate import (
    EvalSplit,
    EvaluationDataError,
    LabelMismatchError,
    evaluate_split,
    label_order,
    load_split,
)
from q2l.registry.gate import GateCheck, comparison_table, gate
from q2l.registry.writes import RegistryWrites, apply_writes, complete_pending, pending_writes
from q2l.tracking.datasets import log_split

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "PREVIOUS",
    "TAG",
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
    split: str = ""
    label_names: list[str] = field(default_factory=list)

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


@dataclass
class _Contest:
    """The loaded candidate and champion and the split each is evaluated on (the same images)."""

    candidate: Predictor
    champion: Predictor | None
    splits: dict[int, EvalSplit]

    @property
    def data(self) -> EvalSplit:
        """The split at the candidate's image size (its label order is the reference)."""
        return self.splits[self.candidate.image_size]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load(cfg: Config, name: str, version: str) -> Predictor:
    from q2l.tracking.store import quiet_artifact_downloads, tracking_uri

    try:
        with quiet_artifact_downloads():
            return load_predictor(
                f"models:/{name}/{version}",
                tracking_uri=tracking_uri(cfg),
                max_pixels=cfg.data.max_image_pixels,
            )
    except PackagingError as e:
        raise RegistryUsageError(f"model {name!r} version {version} cannot be loaded: {e}") from None


def _load_contest(cfg: Config, model: str, cand_v: str, champ_v: str | None) -> _Contest:
    """Both models and the evaluation split; label sets must agree (``LabelMismatchError``)."""
    cand = _load(cfg, model, cand_v)
    champ = _load(cfg, model, champ_v) if champ_v is not None else None
    if champ is not None:
        label_order(cand.label_names, champ.label_names, f"candidate v{cand_v}", f"champion v{champ_v}")
    splits: dict[int, EvalSplit] = {}
    for p in [cand] + ([champ] if champ is not None else []):
        if p.image_size not in splits:
            try:
                splits[p.image_size] = load_split(cfg.data, cfg.promote.split, p.image_size)
            except EvaluationDataError as e:
                raise RegistryUsageError(str(e)) from None
    contest = _Contest(cand, champ, splits)
    label_order(cand.label_names, contest.data.label_names, f"candidate v{cand_v}", "the evaluation data")
    if len({s.fingerprint for s in splits.values()}) != 1:
        raise RegistryUsageError(
            "the evaluation split differs between image sizes (data set changed while reading?)"
        )
    return contest


def _judge(
    cfg: Config,
    model: str,
    ref: str,
    versions: tuple[str, str | None],
    contest: _Contest,
    batch_size: int,
    progress: bool,
    dry_run: bool,
) -> PromotionResult:
    """Evaluate both models on the same split, apply the gate, build the table."""
    log = get_logger()
    (cand_v, champ_v), data = versions, contest.data
    log.info(f"evaluating {model} v{cand_v} ({ref}) on the {data.split} split ({len(data)} images)")
    cand = evaluate_split(contest.candidate, data, batch_size, progress)
    champ = None
    if contest.champion is not None:
        log.info(f"evaluating {model} v{champ_v} (@{CHAMPION}) on the same split")
        champ = evaluate_split(
            contest.champion, contest.splits[contest.champion.image_size], batch_size, progress
        )
    checks = gate(cand, champ, cfg.promote, data.label_names)
    header = (
        f"{model}: candidate v{cand_v} ({ref}) vs "
        + (f"champion v{champ_v}" if champ_v else "no champion (floor only)")
        + f" | {data.split} split, {cand.num_samples} images, data {data.fingerprint}"
    )
    champ_col = f"v{champ_v}" if champ_v else None
    table = comparison_table(f"v{cand_v}", cand, champ_col, champ, data.label_names, checks, header)
    passed = all(c.passed for c in checks)
    status = (
        ("would-promote" if passed else "would-refuse") if dry_run else ("promoted" if passed else "refused")
    )
    return PromotionResult(
        model,
        cand_v,
        champ_v,
        status,
        checks,
        table,
        cand,
        champ,
        data.fingerprint,
        None,
        data.split,
        data.label_names,
    )


def _json_float(value) -> float | None:
    v = float(value)
    return None if math.isnan(v) else v


def _log_evaluation_run(cfg: Config, result: PromotionResult, candidate_ref: str, data: EvalSplit) -> str:
    """An MLflow run in ``<experiment>-promotions`` with both models' metrics and the table; its id.

    Its input is the evaluated split, logged as the same MLflow dataset as the training runs' split when the
    data are the same (name and digest from the data folder and fingerprint).
    """
    import time

    from mlflow.entities import Metric, Param

    from q2l import tracking

    exp_id = tracking.ensure_experiment(
        cfg.replace({"mlflow.experiment": f"{cfg.mlflow.experiment}-promotions"})
    )
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
    client = tracking.client(cfg)
    run_name = f"promote {result.model} v{result.candidate_version}"
    run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    log_split(
        client, run_id, data.split, data.dataset, data.label_names, data.fingerprint, data.data_cfg.root
    )
    metrics = result.candidate.as_dict("candidate_")
    if result.champion is not None:
        metrics.update(result.champion.as_dict("champion_"))
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if not math.isnan(v)],
        params=[Param(f"promote.{k}", str(v)) for k, v in vars(cfg.promote).items()],
    )
    client.log_text(run_id, result.table + "\n", "comparison.txt")
    per_class = {
        name: {
            "candidate_ap": _json_float(result.candidate.per_class_ap[i]),
            "champion_ap": _json_float(result.champion.per_class_ap[i])
            if result.champion is not None
            else None,
        }
        for i, name in enumerate(result.label_names)
    }
    client.log_dict(
        run_id, {"checks": [vars(c) for c in result.checks], "per_class_ap": per_class}, "comparison.json"
    )
    client.set_terminated(run_id)
    return run_id


def _promotion_writes(result: PromotionResult) -> RegistryWrites:
    """Tags and description line on the candidate, ``q2l.demoted`` on the old champion, then the aliases."""
    cand, champ, cand_v, champ_v = (
        result.candidate,
        result.champion,
        result.candidate_version,
        result.champion_version,
    )
    when = _now()
    tags = {
        "gate": "passed",
        "time": when,
        "split": result.split,
        "data_fingerprint": result.fingerprint or "",
        "eval_run_id": result.eval_run_id or "",
        "replaced": champ_v or "",
        "candidate_map": f"{cand.map:.4f}",
        "candidate_cf1": f"{cand.cf1:.4f}",
        "candidate_of1": f"{cand.of1:.4f}",
        "champion_map": f"{champ.map:.4f}" if champ else "none",
        "champion_cf1": f"{champ.cf1:.4f}" if champ else "none",
        "champion_of1": f"{champ.of1:.4f}" if champ else "none",
    }
    versus = f"vs v{champ_v} {champ.map:.2f} ({cand.map - champ.map:+.2f})" if champ else "(first champion)"
    line = (
        f"{when} promoted to champion: {result.split} mAP {cand.map:.2f} {versus}, "
        f"data {result.fingerprint}, evaluation run {result.eval_run_id}"
    )
    writes = RegistryWrites("promotion", [], {cand_v: {TAG + k: v for k, v in tags.items()}}, {cand_v: line})
    if champ_v is not None:
        writes.version_tags[champ_v] = {DEMOTED_TAG: f"{when} by v{cand_v}"}
        writes.aliases.append((PREVIOUS, champ_v))  # before champion moves: see q2l/registry/writes.py
    writes.aliases.append((CHAMPION, cand_v))
    return writes


def promote(
    cfg: Config,
    model: str,
    candidate: str = f"@{CHALLENGER}",
    *,
    dry_run: bool = False,
    batch_size: int = 64,
    progress: bool = False,
) -> PromotionResult:
    """Evaluate ``candidate`` against ``@champion`` on ``promote.split`` and promote it if the gate passes.

    ``dry_run`` evaluates and prints but changes nothing (no run, no tag, no alias). Raises
    ``RegistryUsageError`` or ``LabelMismatchError`` (nothing changed); a refusal by the gate is a result with
    ``status == "refused"`` (an evaluation run is logged, the registry is unchanged). Progress, the table and
    the verdict go to the ``q2l`` logger.
    """
    log = get_logger()
    client = open_registry(cfg)
    require_model(client, model)
    if dry_run and pending_writes(client, model) is not None:
        log.info(f"{model} has an interrupted promotion or rollback: the next promote/rollback completes it")
    elif not dry_run:
        complete_pending(client, model)
    cand_v = str(resolve(client, model, candidate).version)
    champ_v = alias_number(client, model, CHAMPION)
    if champ_v == cand_v:
        log.info(f"{model} version {cand_v} ({candidate}) is already @{CHAMPION}: nothing to do")
        return PromotionResult(model, cand_v, champ_v, "unchanged", [], "")

    contest = _load_contest(cfg, model, cand_v, champ_v)
    result = _judge(cfg, model, candidate, (cand_v, champ_v), contest, batch_size, progress, dry_run)
    for line in result.table.splitlines():
        log.info(line)
    if dry_run:
        verdict = "would be promoted" if result.passed else "would be refused"
        log.info(f"dry run: the candidate {verdict}; nothing changed")
        return result
    result.eval_run_id = _log_evaluation_run(cfg, result, candidate, contest.data)
    if not result.passed:
        failed = ", ".join(c.name for c in result.checks if not c.passed)
        kept = f"v{champ_v}" if champ_v else "unset"
        log.info(f"REFUSED ({failed}): @{CHAMPION} stays {kept}; evaluation run {result.eval_run_id}")
        return result
    apply_writes(client, model, _promotion_writes(result))
    moved = f", @{PREVIOUS} -> v{champ_v}" if champ_v else ""
    log.info(f"PROMOTED: @{CHAMPION} -> v{cand_v}{moved}; evaluation run {result.eval_run_id}")
    return result


def _earlier_champion(client, model: str, prev, champ_v: str) -> str | None:
    """The version ``prev`` replaced when it was promoted (its ``replaced`` tag), if it still exists."""
    from mlflow.exceptions import MlflowException

    before = prev.tags.get(TAG + "replaced", "")
    if not before or before in (str(prev.version), champ_v):
        return None
    try:
        client.get_model_version(model, before)
    except MlflowException:
        return None
    return before


def rollback(cfg: Config, model: str) -> RollbackResult:
    """Move ``champion`` back to ``previous-champion`` and step ``previous-champion`` one promotion back."""
    client = open_registry(cfg)
    require_model(client, model)
    done = complete_pending(client, model)
    if done is not None and done.action == "rollback":  # this command's interrupted run: now complete
        moved = dict(done.aliases)
        return RollbackResult(model, next(iter(done.version_tags)), moved[CHAMPION], moved[PREVIOUS])
    champ = alias_version(client, model, CHAMPION)
    prev = alias_version(client, model, PREVIOUS)
    if champ is None:
        raise RegistryUsageError(f"model {model!r} has no @{CHAMPION}: nothing to roll back")
    if prev is None:
        raise RegistryUsageError(f"model {model!r} has no @{PREVIOUS}: nothing to roll back to")
    champ_v, prev_v = str(champ.version), str(prev.version)
    before = _earlier_champion(client, model, prev, champ_v)
    when = _now()
    writes = RegistryWrites(
        "rollback",
        [(CHAMPION, prev_v), (PREVIOUS, before)],
        {champ_v: {ROLLED_BACK_TAG: f"{when} to v{prev_v}"}},
        {
            champ_v: f"{when} rolled back: @{CHAMPION} returned to v{prev_v}",
            prev_v: f"{when} champion again (rollback from v{champ_v})",
        },
    )
    apply_writes(client, model, writes)
    now_previous = f"v{before}" if before else "removed (no earlier champion recorded)"
    get_logger().info(f"ROLLED BACK: @{CHAMPION} v{champ_v} -> v{prev_v}; @{PREVIOUS} -> {now_previous}")
    return RollbackResult(model, champ_v, prev_v, before)


def run_promote(
    cfg: Config,
    model: str,
    candidate: str | None = None,
    *,
    dry_run: bool = False,
    rollback_: bool = False,
    error: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> int:
    """``q2l promote`` (or ``--rollback``) as an exit code; progress goes to the ``q2l`` logger, errors to
    ``error``.

    0: promoted, would be promoted (dry run), already champion, or rolled back; 1: refused (gate or label
    mismatch); 2: usage error (unknown model/version/alias, no or unreadable evaluation data, bad flags).
    """
    from q2l.tracking import TrackingUnavailableError

    try:
        if rollback_:
            if candidate is not None or dry_run:
                raise RegistryUsageError("--rollback takes neither --candidate nor --dry-run")
            rollback(cfg, model)
            return 0
        ref = candidate or f"@{CHALLENGER}"
        # a progress bar per evaluation when a person watches (stderr is a terminal)
        return promote(cfg, model, ref, dry_run=dry_run, progress=sys.stderr.isatty()).exit_code
    except (RegistryUsageError, EvaluationDataError, TrackingUnavailableError) as e:
        error(f"error: {e}")
        return 2
    except LabelMismatchError as e:
        error(f"REFUSED: {e}; nothing changed")
        return 1
