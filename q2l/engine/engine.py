"""The training engine: one object that trains, evaluates and checkpoints a Query2Label model (plain PyTorch).

It owns the optimizer (AdamW, per-group weight decay), the OneCycle schedule (stepped per optimizer step,
per-rank step count), the autocast policy (+ GradScaler for fp16), gradient clipping and accumulation, the
EMA of the weights, the DDP wrap (when a process group is initialised), optional ``torch.compile``, early
stopping, and the best weights so far (model or EMA, whichever scored the better holdout mAP:
``best_weights``, checkpointed with the rest; ``load_best_weights`` for the test evaluation).
Batches arrive as uint8 images and are normalised on the device with the backbone's mean/std. Epochs are
seeded from (seed, rank, epoch), so resuming at an epoch boundary replays the uninterrupted run on every
rank; the checkpoint also carries this process's RNG states, so a resume mid-epoch is exact on a single
process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from q2l.config import Config
from q2l.data.mixing import mix_batch
from q2l.engine.checkpoint import rng_state, set_rng_state
from q2l.engine.distributed import (
    broadcast_buffers,
    gather_predictions,
    get_rank,
    get_world_size,
    is_distributed,
    wrap_ddp,
)
from q2l.engine.ema import build_ema
from q2l.engine.normalize import Uint8Normalizer
from q2l.engine.optim import build_optimizer, build_scheduler
from q2l.engine.precision import fp32_depthwise_convs, resolve_precision
from q2l.engine.results import EpochResult, NonFiniteLossError, Predictions, better_source
from q2l.engine.seed import derive_seed, seed_everything
from q2l.metrics import MetricSummary, summarize

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
STEADY_AFTER_STEPS = 2  # steps excluded from ``steady_images_per_s`` (allocator / cudnn / compile warm-up)


def _state_on_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s state dict on the CPU (a copy even when the module is on the CPU)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in state.items()}


def _set_sampler_epoch(loader: Iterable, epoch: int) -> None:
    """Reshuffle a DistributedSampler (or any sampler with ``set_epoch``) for this epoch."""
    samplers = [
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ]
    for sampler in {id(s): s for s in samplers if s is not None}.values():
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)


class Engine:
    """Train / evaluate / checkpoint ``model`` with ``loss_fn`` per ``cfg`` (sections train, optim, data).

    ``steps_per_epoch`` is this rank's number of training batches (``len(train_loader)``). ``progress``, if
    given, is called after every training batch with ``{"epoch", "step", "steps", "loss", "lr", "images"}``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        cfg: Config,
        steps_per_epoch: int,
        device: torch.device | str,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        self.steps_per_epoch = steps_per_epoch
        self.progress = progress
        self.rank, self.world_size = get_rank(), get_world_size()
        tc = cfg.train
        self.precision = resolve_precision(tc.precision, self.device, tc.channels_last)
        if self.device.type == "cuda":
            # every training batch has one shape (squish resize): cuDNN times its algorithms once per
            # shape and keeps the fastest (process-wide, as torch offers it)
            torch.backends.cudnn.benchmark = True
        self.grad_accum_steps = tc.grad_accum_steps

        data_config = getattr(model, "data_config", None)
        if not isinstance(data_config, dict) or "mean" not in data_config or "std" not in data_config:
            raise ValueError(
                f"{type(model).__name__} has no data_config with mean/std (needed to normalise images)"
            )
        # uint8 → normalised float in one fused step: (x/255 − mean)/std = (x − 255·mean)/(255·std)
        self._normalize = Uint8Normalizer(data_config["mean"], data_config["std"], self.device)

        self.model = model.to(self.device, memory_format=self.precision.memory_format)
        if self.precision.device_type == "cpu" and self.precision.dtype == torch.bfloat16:
            fp32_depthwise_convs(self.model)  # before the EMA copy, which inherits it
        self.loss_fn = loss_fn.to(self.device)
        self._ddp = None
        train_model: nn.Module = self.model
        if is_distributed():
            # static_graph breaks no_sync accumulation (pytorch#143580) and is unproven under compile
            static = self.grad_accum_steps == 1 and not tc.compile
            self._ddp = train_model = wrap_ddp(self.model, self.device, static_graph=static)
        # after the DDP wrap, which broadcasts rank 0's weights: every rank's EMA starts equal
        self.ema = build_ema(self.model, tc.ema_decay) if tc.ema_decay is not None else None
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.optim, tc.epochs, steps_per_epoch, self.grad_accum_steps
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.use_scaler else None
        self.compile_seconds: float | None = None
        if tc.compile:
            # compile the training forward only; evaluation stays eager (it would compile model and EMA again)
            train_model = torch.compile(train_model)
        self._train_model = train_model
        self._mix_generator = torch.Generator()
        self._mixing = cfg.data.cutmix_alpha > 0 or cfg.data.mixup_alpha > 0

        self.epoch = 0  # finished epochs: the next fit() starts here
        self.global_step = 0  # optimizer steps taken
        self.best_map = -math.inf
        self.best_epoch = -1
        self.epochs_without_improvement = 0
        # {"model": state dict on CPU, "source": "ema" | "model", "epoch": 1-based, "holdout_map": float}
        self.best_weights: dict[str, Any] | None = None

    # ---------------------------------------------------------------- batches
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] → normalised float on the engine's device, in the policy's memory format."""
        if images.dtype != torch.uint8:
            raise TypeError(f"Engine expects uint8 images (normalised on the device), got {images.dtype}")
        # convert the layout while still uint8 (4× less memory traffic than after the cast)
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=self.precision.memory_format)
        return self._normalize(x)

    def _forward_backward(
        self, images: torch.Tensor, targets: torch.Tensor, scale: float, sync: bool
    ) -> torch.Tensor:
        x = self._prepare(images)
        y = targets.to(self.device, non_blocking=True).float()
        if self._mixing:
            d = self.cfg.data
            x, y = mix_batch(x, y, self._mix_generator, d.cutmix_alpha, d.mixup_alpha, d.mix_prob)
        no_sync = self._ddp.no_sync() if self._ddp is not None and not sync else contextlib.nullcontext()
        with no_sync:
            with self.precision.autocast():
                logits = self._train_model(x)
            loss = self.loss_fn(logits.float(), y)  # fp32 loss on the logits (docs/design.md §3)
            if loss.ndim != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            scaled = loss * scale
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()

    def _loss_value(self, loss: torch.Tensor, epoch: int, step: int) -> float:
        """The loss averaged over ranks; raises ``NonFiniteLossError`` on every rank together."""
        if self.world_size > 1:
            # one scalar all-reduce: a NaN on any rank reaches every rank, so all raise together and none is
            # left waiting in a collective
            loss = loss.clone()
            dist.all_reduce(loss)  # SUM: gloo has no AVG
            loss /= self.world_size
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(epoch, step, value, self.global_step)
        return value

    def _optimizer_step(self) -> float:
        """Unscale, clip, step, schedule, EMA; returns the learning rate that was used."""
        clip = self.cfg.optim.grad_clip
        if clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1
        if self.ema is not None:
            # the warm-up position is the number of optimizer steps: global_step owns it (timm keeps none)
            self.ema.update(self.model, step=self.global_step)
        return lr

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step on one batch (no accumulation); returns the loss (notebooks, benchmarks)."""
        self._train_model.train()
        loss = self._forward_backward(images, targets, 1.0, sync=True)
        value = self._loss_value(loss, self.epoch, 0)
        self._optimizer_step()
        return value

    # ---------------------------------------------------------------- epochs
    def _begin_epoch(self, loader: Iterable, epoch: int) -> int:
        """Check the loader's length, seed the epoch, set train mode; returns the number of batches."""
        n = len(loader)
        if n != self.steps_per_epoch:
            raise ValueError(
                f"the training loader has {n} batches but the Engine was built with steps_per_epoch="
                f"{self.steps_per_epoch}: the OneCycle schedule would not fit (pass this rank's len(loader))"
            )
        _set_sampler_epoch(loader, epoch)
        seed_everything(self.cfg.train.seed, self.rank, epoch)
        self._mix_generator.manual_seed(derive_seed(self.cfg.train.seed, self.rank, epoch, 1))
        self._train_model.train()
        return n

    def train_one_epoch(self, loader: Iterable, epoch: int) -> dict[str, float]:
        """Train on every batch of ``loader``; returns the epoch's statistics.

        loss (mean over batches and ranks), lr (of the last step), images (this rank), seconds, images_per_s,
        steady_images_per_s (without the first 2 steps), skipped_images (bad images the collate dropped),
        optimizer_steps, and compile_seconds (first step, compilation included) when compiling.
        """
        n = self._begin_epoch(loader, epoch)
        accum = self.grad_accum_steps
        losses: list[float] = []
        images_seen = steady_images = optimizer_steps = skipped = 0
        lr = self.optimizer.param_groups[0]["lr"]
        pending = False  # gradients accumulated but not yet stepped
        start = steady_start = time.perf_counter()
        for i, batch in enumerate(loader):
            images, targets = batch[0], batch[1]
            skipped += getattr(batch, "skipped", 0)  # q2l.data's collate counts the bad images it dropped
            group_start = (i // accum) * accum
            last_in_group = i + 1 == min(group_start + accum, n)
            if images.shape[0] == 0:
                if self.world_size > 1:
                    # ranks must run the same forward/backward sequence or DDP's all-reduce waits forever
                    raise RuntimeError(
                        f"epoch {epoch}, step {i}: every image of the batch was dropped on rank {self.rank}"
                    )
            else:
                step_start = time.perf_counter()
                loss = self._forward_backward(
                    images, targets, 1.0 / (min(group_start + accum, n) - group_start), sync=last_in_group
                )
                pending = True
                value = self._loss_value(loss, epoch, i)
                losses.append(value)
                images_seen += images.shape[0]
                if i >= STEADY_AFTER_STEPS:
                    steady_images += images.shape[0]
            if last_in_group and pending:
                lr = self._optimizer_step()
                optimizer_steps += 1
                pending = False
            if i == 0 and losses and self.cfg.train.compile and self.compile_seconds is None:
                self.compile_seconds = time.perf_counter() - step_start
                log.info("torch.compile: the first training step took %.1f s", self.compile_seconds)
            if i + 1 == STEADY_AFTER_STEPS:
                steady_start = time.perf_counter()
            if self.progress is not None and losses:
                self.progress(
                    {
                        "epoch": epoch,
                        "step": i,
                        "steps": n,
                        "loss": losses[-1],
                        "lr": lr,
                        "images": images_seen,
                    }
                )
        seconds = time.perf_counter() - start
        steady_seconds = time.perf_counter() - steady_start
        stats = {
            "loss": sum(losses) / len(losses) if losses else math.nan,
            "lr": lr,
            "images": images_seen,
            "seconds": seconds,
            "images_per_s": images_seen / seconds if seconds > 0 else math.nan,
            "steady_images_per_s": (
                steady_images / steady_seconds if steady_images and steady_seconds > 0 else math.nan
            ),
            "skipped_images": skipped,
            "optimizer_steps": optimizer_steps,
        }
        if self.compile_seconds is not None:
            stats["compile_seconds"] = self.compile_seconds
        return stats

    @torch.no_grad()
    def predict(self, loader: Iterable, ema: bool = False) -> Predictions:
        """Sigmoid probabilities of the model (or its EMA) over ``loader``, gathered from all ranks.

        Every rank gets the full set, without the DistributedSampler's padding duplicates, sorted by index.
        """
        if ema and self.ema is None:
            raise ValueError("predict(ema=True) but the EMA is off (train.ema_decay is None)")
        model = self.ema.module if ema else self.model
        broadcast_buffers(model)  # every shard evaluated with rank 0's BatchNorm statistics
        was_training = model.training
        model.eval()
        scores, targets, indices = [], [], []
        try:
            for images, batch_targets, batch_indices in loader:
                if images.shape[0] == 0:
                    continue
                with self.precision.autocast():
                    logits = model(self._prepare(images))
                scores.append(torch.sigmoid(logits.float()))
                targets.append(batch_targets.float())
                indices.append(torch.as_tensor(batch_indices).long())
        finally:
            model.train(was_training)
        if not scores:
            raise ValueError(f"predict: the loader yielded no images on rank {self.rank}")
        gathered = gather_predictions(torch.cat(scores), torch.cat(targets), torch.cat(indices))
        return Predictions(*gathered)

    def evaluate(self, loader: Iterable) -> tuple[MetricSummary, MetricSummary | None]:
        """Metrics of the model and of its EMA (None when the EMA is off) on ``loader``."""
        p = self.predict(loader)
        summary = summarize(p.scores, p.targets)
        if self.ema is None:
            return summary, None
        q = self.predict(loader, ema=True)
        return summary, summarize(q.scores, q.targets)

    def fit(
        self, train_loader: Iterable, holdout_loader: Iterable, start_epoch: int = 0
    ) -> Iterator[EpochResult]:
        """Train from ``start_epoch`` to ``train.epochs``, evaluating model and EMA on the holdout.

        Yields an ``EpochResult`` per epoch (checkpoint there: ``state_dict()`` reflects the finished
        epoch) and stops after ``train.early_stop_patience`` epochs without improving the best holdout mAP
        of model and EMA.
        """
        patience = self.cfg.train.early_stop_patience
        for epoch in range(start_epoch, self.cfg.train.epochs):
            stats = self.train_one_epoch(train_loader, epoch)
            holdout, holdout_ema = self.evaluate(holdout_loader)
            source, current = better_source(holdout, holdout_ema)
            best = not math.isnan(current) and current > self.best_map
            if best:
                self.best_map, self.best_epoch, self.epochs_without_improvement = current, epoch, 0
            else:
                self.epochs_without_improvement += 1
            if best or self.best_weights is None:
                # also the first epoch when its mAP is NaN: there are always weights to test after one epoch
                self._keep_best(source, epoch, current)
            self.epoch = epoch + 1
            stop = patience is not None and self.epochs_without_improvement >= patience
            yield EpochResult(epoch, stats, holdout, holdout_ema, best, stop, self.best_map)
            if stop:
                return

    def _keep_best(self, source: str, epoch: int, holdout_map: float) -> None:
        module = self.ema.module if source == "ema" else self.model
        self.best_weights = {
            "model": _state_on_cpu(module),
            "source": source,
            "epoch": epoch + 1,
            "holdout_map": float(holdout_map),
        }

    def load_best_weights(self) -> dict[str, Any] | None:
        """Load the best epoch's weights (model or EMA) into ``self.model``, e.g. for the test evaluation.

        Returns ``best_weights`` (whose ``source``, ``epoch`` and ``holdout_map`` describe them), or None
        with the model unchanged when no epoch has finished.
        """
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights["model"])
        return self.best_weights

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume to an identical next step (``torch.load(weights_only=True)``-safe).

        Local to this process (no collective): the RNG states are this rank's. Save rank 0's.
        """
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            # the EMA's warm-up position is global_step
            "ema": {"module": self.ema.module.state_dict()} if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_map": self.best_map,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
            "best_weights": self.best_weights,
            "rng": rng_state(self.device),
            "mix_generator": self._mix_generator.get_state(),
            "rank": self.rank,
            "world_size": self.world_size,
            "config": self.cfg.to_yaml(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output.

        RNG states are restored on the rank that saved them; other ranks are re-seeded from
        (seed, rank, epoch) at the next epoch start, as the uninterrupted run was.
        """
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT} (no Engine state?)"
            )
        saved_total = state["scheduler"]["total_steps"]
        if saved_total != self.scheduler.total_steps:
            raise ValueError(
                f"checkpoint schedule has {saved_total} optimizer steps, this run"
                f" {self.scheduler.total_steps}: train.epochs, train.batch_size, train.grad_accum_steps,"
                " the data or the worker count changed"
            )
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError(
                "checkpoint and config disagree on the EMA (train.ema_decay None in one of them)"
            )
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"]["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.best_map = float(state["best_map"])
        self.best_epoch = int(state["best_epoch"])
        self.epochs_without_improvement = int(state["epochs_without_improvement"])
        best = state.get("best_weights")  # absent in checkpoints written before the Engine kept them
        self.best_weights = None if best is None else {**best, "model": _cpu(best["model"])}
        if state["rank"] == self.rank:
            set_rng_state(state["rng"], self.device)
            self._mix_generator.set_state(state["mix_generator"])
