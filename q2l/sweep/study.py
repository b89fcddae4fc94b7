"""A sweep's Optuna study: where it is stored, which sampler draws, and warm starts from earlier sweeps.

Each sweep searches in a persisted study named after the sweep, in ``tune.storage`` (an Optuna RDB URL;
default ``sqlite:///<mlflow.results_dir>/optuna/optuna.db``), so Optuna's own tools can open it
(``optuna.load_study(study_name=<sweep>, storage=<url>)``, ``optuna-dashboard <url>``). ``tune.warm_start``
copies earlier sweeps' finished and pruned trials (with their per-epoch values) into a new sweep's study
before its first trial, so the sampler starts from what they learned.

A warm start needs every parameter of the earlier trials in the new space with a distribution Optuna accepts
under the same name (same kind, same log scale, same choices); anything else is a ``ConfigError`` naming
``tune.space.<key>``. Earlier trials with a value outside a narrowed range are left out (a note counts
them).

Nothing here imports Ray: the searcher benchmark drives these samplers with Optuna's ask/tell.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from q2l.config import Config, ConfigError
from q2l.progress import get_logger
from q2l.tracking.store import results_dir, sqlite_file

if TYPE_CHECKING:
    import optuna

    from q2l.sweep.space import SearchSpace

DIRECTION = "maximize"  # the sweep's metric is a held-out mAP
STUDY_FILE = "optuna/optuna.db"  # under mlflow.results_dir
WARM_START_ATTR = "q2l.warm_start_from"  # user attribute of a copied trial: "<sweep>#<trial number>"
SAMPLERS = {"optuna": "optuna-tpe", "gp": "optuna-gp", "random": "optuna-random"}  # tune.searcher → label

log = get_logger()


def storage_url(cfg: Config) -> str:
    """``tune.storage``, else a SQLite file under ``mlflow.results_dir`` (absolute)."""
    if cfg.tune.storage:
        return cfg.tune.storage
    root = results_dir(cfg)
    if "://" in root:
        raise ConfigError(
            f"tune.storage: mlflow.results_dir = {root!r} is remote; set tune.storage to an Optuna RDB URL "
            "(e.g. postgresql://user@host/q2l_optuna)"
        )
    return f"sqlite:///{root}/{STUDY_FILE}"


def shown_url(url: str) -> str:
    """The storage URL with any password hidden (for logs and MLflow params)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: RDBStorage will say so
        return url


def dashboard_command(cfg: Config) -> str:
    """How to browse the sweeps' studies (``pip install 'q2l[dashboard]'``)."""
    return f"optuna-dashboard {shown_url(storage_url(cfg))}"


def open_storage(cfg: Config) -> optuna.storages.RDBStorage:
    """The study storage (a SQLite file's folder is created); ``ConfigError`` when it cannot be opened."""
    import optuna

    url = storage_url(cfg)
    db = sqlite_file(url)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # noqa: BLE001 - bad URL, missing driver, unreachable server: one clear message
        raise ConfigError(
            f"tune.storage = {shown_url(url)!r}: cannot open the Optuna storage ({type(e).__name__}: {e})"
        ) from None


def sampler(kind: str, seed: int, num_samples: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of ``tune.searcher``: ``optuna`` (TPE), ``gp`` (Gaussian process) or ``random``."""
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Optuna's default of 10 random start-up trials would make a small sweep pure random search
    startup = min(10, max(2, math.ceil(num_samples / 3)))
    if kind == "gp":
        # conditional parameters fall back to random draws; that is expected, not worth a warning per trial
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    if kind == "optuna":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    raise ConfigError(f"tune.searcher = {kind!r} must be one of {', '.join(SAMPLERS)}")


def warm_start_names(cfg: Config) -> list[str]:
    """``tune.warm_start`` as a list of sweep names (empty when unset)."""
    raw = cfg.tune.warm_start
    if raw is None:
        return []
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"tune.warm_start = {raw!r}: expected a sweep name or a list of sweep names")
    return list(dict.fromkeys(names))


def _space_distributions(space: SearchSpace) -> dict[str, tuple[str, optuna.distributions.BaseDistribution]]:
    """Every Optuna parameter name the space can suggest → (where it is written, its distribution)."""
    out = {}
    for p in space.params:
        cases = [(None, p.dist)] if p.when is None else list(p.cases)
        for value, dist in cases:
            if dist.kind != "fixed":
                where = f"tune.space.{p.key}" + (f".cases.{value}" if p.when else "")
                out[p.optuna_name(value)] = (where, dist.optuna_distribution())
    return out


def _check_trial_fits(trial: optuna.trial.FrozenTrial, dists: dict, sweep: str) -> None:
    """Raise ``ConfigError`` naming the parameter when an earlier trial's parameter cannot join the study."""
    from optuna.distributions import check_distribution_compatibility

    for name, old in trial.distributions.items():
        if name not in dists:
            key = name.split("|", 1)[0]
            raise ConfigError(
                f"tune.warm_start: sweep {sweep!r} searched {name!r}, which this space does not search "
                f"(tune.space.{key} is missing or fixed): its trials do not fit this sweep"
            )
        where, new = dists[name]
        try:
            check_distribution_compatibility(old, new)
        except ValueError as e:
            raise ConfigError(
                f"{where}: incompatible with sweep {sweep!r} for tune.warm_start: it searched {old}, this "
                f"space searches {new} ({e})"
            ) from None


def warm_trials(
    cfg: Config, space: SearchSpace, storage: optuna.storages.BaseStorage
) -> tuple[list[optuna.trial.FrozenTrial], list[str]]:
    """The earlier sweeps' finished and pruned trials as new trials for ``space``, and notes on them.

    Raises ``ConfigError`` for an unknown sweep or a parameter that does not fit (see the module docstring).
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    names = warm_start_names(cfg)
    if not names:
        return [], []
    known = {s.study_name for s in storage.get_all_studies()}
    dists = _space_distributions(space)
    trials, outside = [], 0
    for sweep in names:
        if sweep not in known:
            raise ConfigError(
                f"tune.warm_start: no study named {sweep!r} in {shown_url(storage_url(cfg))} "
                f"(studies there: {', '.join(sorted(known)) or 'none'})"
            )
        study = optuna.load_study(study_name=sweep, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            _check_trial_fits(t, dists, sweep)
            try:
                trials.append(
                    create_trial(
                        state=t.state,
                        value=t.value,
                        params=t.params,
                        distributions={name: dists[name][1] for name in t.params},
                        intermediate_values=t.intermediate_values,
                        user_attrs={**t.user_attrs, WARM_START_ATTR: f"{sweep}#{t.number}"},
                    )
                )
            except ValueError:  # a value outside this space's (narrower) range
                outside += 1
    notes = [f"warm start: {len(trials)} trial(s) from {', '.join(names)}"]
    if outside:
        notes.append(f"warm start: {outside} trial(s) left out, with values outside this space's ranges")
    return trials, notes


def check_new_study(cfg: Config, space: SearchSpace, name: str) -> None:
    """Before any trial: the study name is free and ``tune.warm_start`` fits (``ConfigError`` otherwise)."""
    storage = open_storage(cfg)
    if name in {s.study_name for s in storage.get_all_studies()}:
        url = shown_url(storage_url(cfg))
        raise ConfigError(
            f"tune.name = {name!r}: an Optuna study of that name exists in {url} (an earlier sweep's); "
            f"choose another name, or delete it: optuna delete-study --study-name {name} --storage {url}"
        )
    warm_trials(cfg, space, storage)


def create_study(cfg: Config, space: SearchSpace, name: str) -> optuna.storages.RDBStorage:
    """Create the sweep's study (seeded by ``tune.warm_start``); returns its storage for the searcher."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(cfg)
    trials, notes = warm_trials(cfg, space, storage)
    study = optuna.create_study(storage=storage, study_name=name, direction=DIRECTION)
    study.add_trials(trials)
    for note in notes:
        log.info(note)
    log.info(f"Optuna study {name} in {shown_url(storage_url(cfg))}; browse it: {dashboard_command(cfg)}")
    return storage


def load_study(cfg: Config, name: str) -> optuna.Study:
    """A sweep's study, as Optuna's own tools see it."""
    import optuna

    return optuna.load_study(study_name=name, storage=open_storage(cfg))
