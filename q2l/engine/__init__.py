"""Training engine (plain PyTorch): optimizer and schedule, precision, EMA, DDP, checkpoints, seeding."""

from q2l.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from q2l.engine.distributed import (
    all_reduce_sum,
    broadcast_object,
    gather_predictions,
    get_rank,
    get_world_size,
    is_distributed,
    is_main_process,
)
from q2l.engine.ema import build_ema
from q2l.engine.engine import Engine
from q2l.engine.optim import build_optimizer, build_scheduler, no_decay_names, param_groups
from q2l.engine.precision import PrecisionPolicy, cpu_bf16_supported, resolve_precision
from q2l.engine.results import EpochResult, NonFiniteLossError, Predictions, better_source
from q2l.engine.seed import derive_seed, seed_everything

__all__ = [
    "Engine",
    "EpochResult",
    "NonFiniteLossError",
    "Predictions",
    "PrecisionPolicy",
    "all_reduce_sum",
    "better_source",
    "broadcast_object",
    "build_ema",
    "build_optimizer",
    "build_scheduler",
    "cpu_bf16_supported",
    "derive_seed",
    "gather_predictions",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "is_main_process",
    "load_checkpoint",
    "no_decay_names",
    "param_groups",
    "resolve_precision",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]
