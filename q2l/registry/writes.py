"""The registry writes of a promotion or rollback, made so that an interruption leaves nothing half done.

A promotion moves two aliases and writes tags and description lines: several calls, any of which may be the
last one made (a killed process, a lost connection). So the whole set of writes is decided first and
recorded on the registered model (tag ``q2l.pending``) before any of them is made; then tags, aliases (in
the order given: ``previous-champion`` before ``champion`` on a promotion) and description lines are
written, and the record is deleted last. Every write sets a value (descriptions append a line only if it is
not there yet), so making them again is harmless: the next ``q2l promote`` or ``--rollback`` on the model
finds a leftover record and completes it before doing anything else (``complete_pending``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from q2l.progress import get_logger
from q2l.registry.aliases import RegistryUsageError

PENDING_TAG = "q2l.pending"


@dataclass
class RegistryWrites:
    """What one promotion or rollback writes: ``aliases`` in order (None deletes), tags, description lines."""

    action: str
    aliases: list[tuple[str, str | None]]
    version_tags: dict[str, dict[str, str]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        """The record stored in the model's ``q2l.pending`` tag."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RegistryWrites:
        """The writes recorded by ``to_json``."""
        raw = json.loads(text)
        return cls(
            raw["action"], [tuple(pair) for pair in raw["aliases"]], raw["version_tags"], raw["descriptions"]
        )


def _append_description(client, model: str, version: str, line: str) -> None:
    current = client.get_model_version(model, version).description or ""
    if line in current.splitlines():
        return
    client.update_model_version(model, version, description=f"{current}\n{line}" if current else line)


def _set_alias(client, model: str, alias: str, version: str | None) -> None:
    if version is not None:
        client.set_registered_model_alias(model, alias, version)
    elif alias in client.get_registered_model(model).aliases:
        client.delete_registered_model_alias(model, alias)


def _make(client, model: str, writes: RegistryWrites) -> None:
    for version, tags in writes.version_tags.items():
        for key, value in tags.items():
            client.set_model_version_tag(model, version, key, value)
    for alias, version in writes.aliases:
        _set_alias(client, model, alias, version)
    for version, line in writes.descriptions.items():
        _append_description(client, model, version, line)
    client.delete_registered_model_tag(model, PENDING_TAG)


def apply_writes(client, model: str, writes: RegistryWrites) -> None:
    """Record ``writes`` on the registered model, make them, then delete the record."""
    client.set_registered_model_tag(model, PENDING_TAG, writes.to_json())
    _make(client, model, writes)


def pending_writes(client, model: str) -> RegistryWrites | None:
    """The writes of an interrupted promotion or rollback of ``model``, or None."""
    text = client.get_registered_model(model).tags.get(PENDING_TAG)
    if not text:
        return None
    try:
        return RegistryWrites.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        raise RegistryUsageError(
            f"model {model!r}: unreadable tag {PENDING_TAG} ({e}); inspect and delete it"
        ) from None


def complete_pending(client, model: str) -> RegistryWrites | None:
    """Complete an interrupted promotion or rollback of ``model`` (if any); returns what was completed."""
    writes = pending_writes(client, model)
    if writes is not None:
        moves = ", ".join(f"@{a} -> {'v' + v if v else 'removed'}" for a, v in writes.aliases)
        get_logger().info(f"completing the interrupted {writes.action} of {model}: {moves}")
        _make(client, model, writes)
    return writes
