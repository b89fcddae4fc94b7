"""The registry's alias names and tags (one owner for each), and looking versions up by number or alias.

``@challenger`` is what a sweep registers (``q2l/sweep/record.py``), ``@champion`` what is served,
``@previous-champion`` what ``q2l promote --rollback`` returns to. Every client comes from ``q2l.tracking``.
"""

from __future__ import annotations

from q2l.config import Config

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
# prefix of the tags a promotion writes on the promoted version (``q2l.promotion.gate`` ...)
TAG = "q2l.promotion."
DEMOTED_TAG = "q2l.demoted"
ROLLED_BACK_TAG = "q2l.rolled_back"


class RegistryUsageError(Exception):
    """Unknown model, version or alias, or no evaluation data: nothing was evaluated or changed (exit 2)."""


def open_registry(cfg: Config):
    """The MLflow client of ``cfg``'s store; ``TrackingUnavailableError`` if there is no such store."""
    from q2l import tracking

    return tracking.client(cfg, must_exist=True)


def require_model(client, name: str) -> None:
    """``RegistryUsageError`` listing the registered models unless ``name`` is one."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise RegistryUsageError(
            f"unknown registered model {name!r} (registered: {', '.join(known) if known else 'none'})"
        ) from None


def alias_version(client, name: str, alias: str):
    """The model version behind ``alias``, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def alias_number(client, name: str, alias: str) -> str | None:
    """The version number (text) behind ``alias``, or None when the alias is not set."""
    mv = alias_version(client, name, alias)
    return str(mv.version) if mv is not None else None


def resolve(client, name: str, ref: str):
    """``ref`` is ``@alias`` or a version number; the ModelVersion, or ``RegistryUsageError``."""
    from mlflow.exceptions import MlflowException

    ref = ref.strip()
    if ref.startswith("@"):
        mv = alias_version(client, name, ref[1:])
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
