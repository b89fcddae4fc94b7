"""One rank's view of a training run: what the worker built, where it records, and how it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from q2l.config import Config


@dataclass
class WorkerRun:
    """One rank's view of a training run: what it built and where it records."""

    cfg: Config
    loop_config: dict[str, Any]
    rank: int
    world: int
    device: Any  # torch.device
    splits: Any  # q2l.data.Splits
    loader_kw: dict[str, Any]  # build_loader's keywords for this rank
    train_loader: Any
    engine: Any  # q2l.engine.Engine
    folder: Path  # the checkpoint folder rank 0 reports
    meta: dict[str, Any] = field(default_factory=dict)
    recorder: Any = None  # rank 0's RunRecorder
    run_id: str | None = None
    monitor: Any = None  # the system-metrics monitor of another node's local rank 0 (rank 0's: recorder)
    stored: str | None = None  # where Ray stored rank 0's latest checkpoint folder

    def report(self, metrics: dict[str, Any]) -> str | None:
        """Every rank reports ``metrics``; rank 0 attaches the checkpoint folder and returns where Ray
        stored it (None on other ranks, or when Ray skipped the report)."""
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(self.folder)) if self.rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)
        if ckpt is None:
            return None
        stored = ray.train.get_checkpoint()  # the persisted one: report uploads synchronously
        uri = _storage_uri(stored) if stored is not None else None
        if uri is None or uri == self.stored:  # a skipped report leaves the previous checkpoint
            return None
        self.stored = uri
        return uri


def _storage_uri(stored) -> str:
    """A Ray checkpoint's location as a path (local storage) or URI (``s3://...``)."""
    kind = stored.filesystem.type_name
    return stored.path if kind == "local" else f"{kind}://{stored.path}"
