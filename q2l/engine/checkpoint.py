"""Checkpoint files and RNG states, in a form ``torch.load(weights_only=True)`` accepts.

weights_only admits tensors and plain containers of str/int/float/bool/None only, so numpy's RNG state (a
tuple holding a uint32 array) becomes a dict with an int64 tensor, and Python's ``random`` state becomes
lists.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """The RNG states of this process: torch CPU, ``device`` if it is a CUDA device, numpy and ``random``."""
    device = torch.device(device) if device is not None else None
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None,
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def set_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Restore what ``rng_state`` returned; the CUDA state goes to ``device`` when that is a CUDA device."""
    device = torch.device(device) if device is not None else None
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` with ``torch.save`` atomically (temp file + rename: never half a file).

    A write that fails (a full disk, a file-size limit) raises ``OSError`` naming the file and the space left;
    the checkpoint already at ``path``, if any, is kept as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except RuntimeError as e:  # torch's zip writer reports a failed write as "enforce fail: unexpected pos"
        free_mib = shutil.disk_usage(path.parent).free / 2**20
        raise OSError(f"could not write checkpoint {path} ({free_mib:.0f} MiB free on its disk): {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` with ``weights_only=True`` (no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise ValueError(f"checkpoint {path} cannot be loaded safely: {e}") from e
