"""The label table every format is read into, the data-set error, and content hashing.

A ``LabelTable`` is what a format reader returns: image keys (the name as written in the annotations),
absolute paths, an int8 target matrix (1 positive, 0 negative, -1 unknown), the label names, and the
sha256 of the annotation content it was read from (the fingerprint and the label cache use it).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data set that cannot be used as configured (missing/malformed annotations, empty set …)."""


def raise_first(problems: list[str]) -> None:
    """Raise the first problem as ``DataError`` (with how many more there are), if there is any."""
    if problems:
        more = f" (and {len(problems) - 1} more; run `q2l data validate`)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


@dataclass
class LabelTable:
    """Images and their multi-hot labels, as read from one annotation source."""

    keys: list[str]
    paths: list[str]
    targets: np.ndarray  # int8 [N, K]
    label_names: list[str]
    content_hash: str

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, indices: np.ndarray) -> LabelTable:
        """The rows ``indices`` (in that order)."""
        return LabelTable(
            keys=[self.keys[i] for i in indices],
            paths=[self.paths[i] for i in indices],
            targets=self.targets[indices],
            label_names=self.label_names,
            content_hash=self.content_hash,
        )


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    memo_key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASH_MEMO[memo_key] = h.hexdigest()
    return _HASH_MEMO[memo_key]


def label_cache_dir(root: str | Path, cache_dir: str | None) -> Path:
    """Where parsed labels are cached: ``<cache_dir>/labels`` or ``<root>/.q2l_cache``."""
    return Path(cache_dir) / "labels" if cache_dir else Path(root) / ".q2l_cache"


def save_cached_table(path: Path, keys: list[str], targets: np.ndarray, label_names: list[str]) -> None:
    """Write parsed labels atomically; an unwritable location just means no cache (reads stay correct)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(
            tmp, keys=np.array(keys, dtype=str), targets=targets, label_names=np.array(label_names, dtype=str)
        )
        os.replace(tmp, path)
    except OSError:
        pass


def load_cached_table(path: Path) -> tuple[list[str], np.ndarray, list[str]] | None:
    """Parsed labels from ``save_cached_table``, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["keys"].tolist(), z["targets"].astype(np.int8), z["label_names"].tolist()
    except (OSError, ValueError, KeyError):
        return None
