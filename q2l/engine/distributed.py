"""torch.distributed helpers: rank/world size, the DDP wrap, gathering predictions, small collectives."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and outside a process group)."""
    return get_rank() == 0


def wrap_ddp(model: nn.Module, device: torch.device, static_graph: bool) -> DistributedDataParallel:
    """DDP with gradients as bucket views (no extra copy of the grads).

    ``static_graph`` lets DDP skip the unused-parameter search and supports activation checkpointing; it
    must be False with gradient accumulation under ``no_sync`` (a known DDP bug, pytorch#143580).
    """
    device = torch.device(device)
    return DistributedDataParallel(
        model,
        device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None,
        gradient_as_bucket_view=True,
        static_graph=static_graph,
    )


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (BatchNorm statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training forward every rank holds
    its own running statistics (and so does each rank's EMA); evaluation must use one model on all shards.
    """
    if is_distributed() and get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo works on CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """``values`` summed element-wise over all ranks, on every rank (identity without a group or world 1).

    One float64 all-reduce (on the current CUDA device under NCCL, on CPU under gloo): collective, so every
    rank must call it with a list of the same length.
    """
    if not is_distributed() or get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)  # SUM
    return t.cpu().tolist()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank (identity without a group or world 1).

    Collective: every rank must call it; the values other ranks pass are ignored.
    """
    if not is_distributed() or get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_predictions(
    scores: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ranks' (scores [n_r, K], targets [n_r, K], indices [n_r]) joined, de-duplicated, sorted by index.

    Every rank gets the full result (on CPU). A DistributedSampler pads the set by repeating samples so
    that all ranks get equal counts: those repeats carry an index already seen and are dropped (first
    occurrence kept). Uses a padded ``all_gather`` of tensors, which works with gloo and NCCL and avoids
    pickling.
    """
    if not (len(scores) == len(targets) == len(indices)):
        raise ValueError(
            f"gather_predictions: lengths differ ({len(scores)}, {len(targets)}, {len(indices)})"
        )
    indices = indices.long()
    if is_distributed() and get_world_size() > 1:
        scores, targets, indices = (_all_gather_rows(t) for t in (scores, targets, indices))
    scores, targets, indices = scores.cpu(), targets.cpu(), indices.cpu()
    order = torch.argsort(indices, stable=True)
    indices = indices[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    order = order[keep]
    return scores[order], targets[order], indices[keep]


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (rows may differ per rank) over ranks, in rank order."""
    device = _comm_device()
    t = t.to(device).contiguous()
    world = get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.long, device=device))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])
