"""Sweep search spaces written in YAML over any config key, turned into an Optuna define-by-run function.

``tune.space`` maps dotted config keys to a distribution::

    model.backbone: {choice: [tf_efficientnet_lite0, resnet18]}   # categorical
    model.hidden_dim: {int: [64, 256], step: 64}                  # integers (optional step, or log: true)
    loss.gamma_neg: {uniform: [0, 4]}                             # floats (optional step)
    optim.lr: {loguniform: [1e-5, 1e-3]}                          # floats sampled on a log scale
    loss.clip: 0.05                                               # a fixed value (no search)
    model.hidden_dim:                                             # conditional: one case per backbone
      when: model.backbone
      cases: {resnet18: {choice: [128, 256]}, tf_efficientnet_lite0: 64}

A conditional entry (``when`` + ``cases``) depends on an unconditional ``choice`` parameter and needs one
case per choice; a case is a distribution or a fixed value. Optuna forbids one name with different
distributions, so a conditional parameter is suggested under a per-case name ``key|value``;
``SearchSpace.overrides`` maps a sampled Tune config back to config keys.

``parse_space(cfg)`` validates everything once (keys, shapes, and every reachable value against the config's
own checks) and raises ``ConfigError`` naming ``tune.space.<key>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from q2l.config import Config, ConfigError

if TYPE_CHECKING:
    import optuna

KINDS = ("choice", "int", "uniform", "loguniform")
# Sweeping these would change the sweep itself, the trial resources or where results go.
FORBIDDEN_SECTIONS = ("tune", "ray", "mlflow", "promote")
# Integer ranges up to this many values are checked value by value against the config (else the bounds).
_MAX_CHECKED_INTS = 512


@dataclass(frozen=True)
class Dist:
    """One distribution (or a fixed value when ``kind == "fixed"``) for one config key."""

    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple = ()
    value: Any = None

    def optuna_distribution(self) -> optuna.distributions.BaseDistribution:
        """The matching ``optuna.distributions`` object (not defined for fixed values)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return FloatDistribution(self.low, self.high, log=self.kind == "loguniform", step=self.step)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        """Draw a value for ``name`` from ``trial`` (define-by-run)."""
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        if self.kind == "uniform":
            return trial.suggest_float(name, self.low, self.high, step=self.step)
        return trial.suggest_float(name, self.low, self.high, log=True)

    def values_to_check(self) -> list:
        """Values that must pass config validation: each choice, each integer of a small range, the bounds."""
        if self.kind == "fixed":
            return [self.value]
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            step = self.step or 1
            count = (self.high - self.low) // step + 1
            if not self.log and count <= _MAX_CHECKED_INTS:
                return list(range(self.low, self.high + 1, step))
            return [self.low, self.high]
        return [self.low, self.high]

    def describe(self) -> Any:
        """The YAML form this distribution was written in (for logging)."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "choice":
            return {"choice": list(self.choices)}
        out: dict[str, Any] = {self.kind: [self.low, self.high]}
        if self.step is not None:
            out["step"] = self.step
        if self.log:
            out["log"] = True
        return out


@dataclass(frozen=True)
class Param:
    """A config key with its distribution, or one distribution per value of another (``when``) parameter."""

    key: str
    dist: Dist | None = None
    when: str | None = None
    cases: tuple[tuple[Any, Dist], ...] = ()

    def case_for(self, when_value: Any) -> tuple[Any, Dist]:
        """The (case value, distribution) used when the ``when`` parameter took ``when_value``."""
        for value, dist in self.cases:
            if value == when_value:
                return value, dist
        raise KeyError(f"tune.space.{self.key}: no case for {self.when} = {when_value!r}")

    def optuna_name(self, when_value: Any = None) -> str:
        """The Optuna parameter name: the key, or ``key|value`` per case (Tune splits names on '/')."""
        if self.when is None:
            return self.key
        return f"{self.key}|{str(when_value).replace('/', '_')}"


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space; calling it on an Optuna trial samples one configuration (define-by-run).

    The object is picklable (Tune checkpoints the searcher, including this function, for ``--resume``).
    """

    params: tuple[Param, ...] = field(default_factory=tuple)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any] | None:
        """Suggest every parameter; fixed values are returned so that they show in the trial's config."""
        chosen: dict[str, Any] = {}
        fixed: dict[str, Any] = {}
        for p in self._ordered():
            when_value = chosen.get(p.when) if p.when else None
            dist = p.case_for(when_value)[1] if p.when else p.dist
            name = p.optuna_name(when_value)
            if dist.kind == "fixed":
                fixed[name] = dist.value
                chosen[p.key] = dist.value
            else:
                chosen[p.key] = dist.suggest(trial, name)
        return fixed or None

    def _ordered(self) -> list[Param]:
        # conditionals after the parameters they depend on, whatever the YAML order
        return [p for p in self.params if p.when is None] + [p for p in self.params if p.when is not None]

    def overrides(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Map a sampled Tune config (Optuna names) to config overrides ``{"section.key": value}``."""
        out: dict[str, Any] = {}
        for p in self._ordered():
            name = p.optuna_name(out.get(p.when)) if p.when else p.key
            if name not in sampled:
                raise KeyError(f"sampled config has no value for {name!r} (keys: {', '.join(sampled)})")
            out[p.key] = sampled[name]
        return out

    def distributions(self, sampled: dict[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
        """The Optuna distributions of the parameters a sampled config drew (fixed values excluded)."""
        values = self.overrides(sampled)
        out = {}
        for p in self._ordered():
            when_value = values.get(p.when) if p.when else None
            dist = p.case_for(when_value)[1] if p.when else p.dist
            if dist.kind != "fixed":
                out[p.optuna_name(when_value)] = dist.optuna_distribution()
        return out

    def describe(self) -> dict[str, Any]:
        """The space as plain data (YAML-serialisable), as written."""
        out: dict[str, Any] = {}
        for p in self.params:
            if p.when is None:
                out[p.key] = p.dist.describe()
            else:
                out[p.key] = {"when": p.when, "cases": {v: d.describe() for v, d in p.cases}}
        return out

    @property
    def keys(self) -> list[str]:
        """The config keys this space sets, in YAML order."""
        return [p.key for p in self.params]


def _number(value: Any, where: str, *, integer: bool) -> float | int:
    # YAML 1.1 reads 1e-5 (no dot) as a string: accept numbers written that way
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if integer:
        if float(value) != int(value):
            raise ConfigError(f"{where}: {value!r} is not an integer")
        return int(value)
    return float(value)


def _parse_dist(spec: Any, where: str) -> Dist:
    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise ConfigError(f"{where}: a list is ambiguous; write {{choice: {spec}}} to search over it")
        return Dist("fixed", value=spec)
    kinds = [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        raise ConfigError(
            f"{where}: expected exactly one of {', '.join(KINDS)} (or when + cases), got keys {sorted(spec)}"
        )
    kind = kinds[0]
    allowed = {"choice": {"choice"}, "int": {"int", "step", "log"}, "uniform": {"uniform", "step"}}.get(
        kind, {kind}
    )
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ConfigError(
            f"{where}: unknown key(s) {extra} for a {kind} distribution (allowed: {sorted(allowed)})"
        )
    body = spec[kind]
    if kind == "choice":
        if not isinstance(body, list) or not body:
            raise ConfigError(f"{where}: choice must be a non-empty list, got {body!r}")
        for c in body:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError(f"{where}: choice values must be scalars (str, number, bool), got {c!r}")
        if len({repr(c) for c in body}) != len(body):
            raise ConfigError(f"{where}: choice has duplicate values {body!r}")
        return Dist("choice", choices=tuple(body))
    if not isinstance(body, list) or len(body) != 2:
        raise ConfigError(f"{where}: {kind} must be [low, high], got {body!r}")
    integer = kind == "int"
    low, high = (_number(v, f"{where}.{kind}", integer=integer) for v in body)
    if low > high:
        raise ConfigError(f"{where}: {kind} low {low} is above high {high}")
    step = spec.get("step")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
    if step is not None:
        step = _number(step, f"{where}.step", integer=integer)
        if step <= 0:
            raise ConfigError(f"{where}.step: must be positive, got {step}")
        if log and step != 1:
            raise ConfigError(f"{where}: step and log cannot be combined")
    if (kind == "loguniform" or log) and low <= 0:
        raise ConfigError(f"{where}: a log-scale range needs low > 0, got {low}")
    return Dist(kind, low=low, high=high, step=step, log=log)


def _parse_param(key: str, spec: Any, known: dict[str, Any]) -> Param:
    where = f"tune.space.{key}"
    if key not in known:
        raise ConfigError(f"{where}: unknown config key {key!r} (write section.key, e.g. model.hidden_dim)")
    if key.partition(".")[0] in FORBIDDEN_SECTIONS:
        raise ConfigError(f"{where}: keys of the sections {', '.join(FORBIDDEN_SECTIONS)} cannot be searched")
    if isinstance(spec, dict) and ("when" in spec or "cases" in spec):
        extra = sorted(set(spec) - {"when", "cases"})
        if extra or "when" not in spec or "cases" not in spec:
            raise ConfigError(
                f"{where}: a conditional entry has exactly the keys when and cases, got {sorted(spec)}"
            )
        if not isinstance(spec["cases"], dict) or not spec["cases"]:
            raise ConfigError(
                f"{where}.cases: expected a mapping from values of {spec['when']} to distributions"
            )
        cases = tuple((v, _parse_dist(d, f"{where}.cases.{v}")) for v, d in spec["cases"].items())
        return Param(key, when=str(spec["when"]), cases=cases)
    return Param(key, dist=_parse_dist(spec, where))


def _link_conditionals(params: dict[str, Param]) -> dict[str, Param]:
    """Check every ``when`` names an unconditional choice and that cases and choices match one to one."""
    out = {}
    for key, p in params.items():
        if p.when is None:
            out[key] = p
            continue
        where = f"tune.space.{key}.when"
        parent = params.get(p.when)
        if parent is None:
            raise ConfigError(f"{where}: {p.when!r} is not a parameter of this space")
        if parent.when is not None or parent.dist.kind != "choice":
            raise ConfigError(f"{where}: {p.when!r} must be an unconditional choice parameter")
        choices = parent.dist.choices
        cases = []
        for value, dist in p.cases:
            # YAML may read case keys as another type than the choices (1 vs "1"): match by text too
            match = [c for c in choices if c == value or str(c) == str(value)]
            if not match:
                raise ConfigError(
                    f"tune.space.{key}.cases.{value}: not one of {p.when}'s choices {list(choices)}"
                )
            cases.append((match[0], dist))
        missing = [c for c in choices if c not in [v for v, _ in cases]]
        if missing:
            raise ConfigError(f"tune.space.{key}.cases: no case for {p.when} = {missing[0]!r}")
        out[key] = Param(key, when=p.when, cases=tuple(cases))
    return out


def _check_values(cfg: Config, param: Param) -> None:
    """Every reachable value must make a valid config on its own (types, ranges, cross-key rules)."""
    dists = [(None, param.dist)] if param.when is None else list(param.cases)
    for case, dist in dists:
        for value in dist.values_to_check():
            try:
                cfg.replace({param.key: value}, source="search space")
            except ConfigError as e:
                where = f"tune.space.{param.key}" + (f".cases.{case}" if case is not None else "")
                raise ConfigError(f"{where}: value {value!r} is invalid: {e}") from None


def parse_space(cfg: Config) -> SearchSpace:
    """Validate ``cfg.tune.space`` and return the ``SearchSpace``; errors name ``tune.space.<key>``."""
    raw = cfg.tune.space
    if not raw:
        raise ConfigError("tune.space: the search space is empty (add at least one key, e.g. optim.lr)")
    known = cfg.flat()
    params = {str(k): _parse_param(str(k), spec, known) for k, spec in raw.items()}
    params = _link_conditionals(params)
    for p in params.values():
        _check_values(cfg, p)
    if all((p.dist is not None and p.dist.kind == "fixed") for p in params.values()):
        raise ConfigError("tune.space: every entry is a fixed value; nothing to search")
    return SearchSpace(tuple(params.values()))
