"""The seed's way of training Query2Label, timed side by side with q2l's fast path.

Variants (all train the same Query2Label with the same ASL loss, computed in fp32 on the logits):

- ``seed``: what the project started from. The loader decodes with PIL and runs torchvision v1 transforms
  (Resize → RandAugment → ToTensor → Normalize), so float32 normalised batches cross to the device (4× the
  bytes of uint8); NCHW, ``torch.optim.AdamW`` with its default implementation (not fused), OneCycleLR, no
  EMA; fp16 autocast with a GradScaler on CUDA, plain fp32 on a CPU (the seed's autocast was CUDA-only).
- ``default``: q2l's ``Engine`` with its default precision policy (``train.precision=auto``: bf16 autocast
  on CUDA and on CPUs with native bf16, else fp32; channels_last), uint8 batches normalised on the device,
  fused AdamW on CUDA, EMA; ``default+compile`` adds ``torch.compile`` (its first step, compilation
  included, is reported separately).
- ``fp32``: the Engine in fp32 NCHW (the reference for the CPU fast-path target); ``bf16-nchw``: bf16
  without channels_last (to separate the two effects).

Measurements: ``measure_sequential`` (one variant at a time: step time, first-step time, peak memory; for a
dedicated GPU), ``measure_interleaved`` (all variants built first, timed in alternating rounds; ratios per
round, for a shared and loaded CPU), ``measure_with_loader`` (each side's real DataLoader over JPEG files,
so decode and transforms are included), ``loader_cpu_ms_per_image`` and ``flops_per_image``. MFU is the
achieved FLOP/s over a matmul peak measured in the same run for the row's precision, only where the device
runs that precision natively (``common.native_precisions``); elsewhere it is None ("-" in the tables).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.io import encode_jpeg, write_file

from q2l.config import Config, DataConfig, config_from_dict
from q2l.data.dataset import MultiLabelDataset
from q2l.data.loaders import build_loader
from q2l.data.transforms import Augment, seed_for
from q2l.engine import Engine, resolve_precision, seed_everything
from q2l.losses import build_loss
from q2l.models import build_model

from .common import native_precisions, utilisation
from .train_step_bench import DTYPES, forward_flops_per_image, matmul_peak

NUM_CLASSES = 80
# Query2Label's official R101 settings (docs/design.md §2): d = 2048 = ResNet-101's channels (no projection)
OFFICIAL = {"resnet101": {"hidden_dim": 2048, "num_heads": 4, "dim_feedforward": 8192}}
ENGINE_VARIANTS = {
    "default": {},
    "default+compile": {"compile": True},
    "fp32": {"precision": "fp32", "channels_last": False},
    "bf16-nchw": {"precision": "bf16", "channels_last": False},
}
VARIANTS = ("seed", *ENGINE_VARIANTS)
# loader-included variants: the step each is timed with; device-decode is q2l's loader with data.decode =
# device (workers read bytes, the training device decodes, resizes and augments)
LOADER_VARIANTS = {"seed": "seed", "default": "default", "device-decode": "default"}
SEED_MEAN, SEED_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the seed's v1 Normalize
SCHEDULE_STEPS = 100_000  # OneCycle length for benchmarks: long enough that any step count fits


def model_section(backbone: str, **overrides) -> dict:
    """The ``model`` config section: official settings for known backbones, q2l's defaults otherwise."""
    return {"backbone": backbone, "pretrained": False, **OFFICIAL.get(backbone, {}), **overrides}


def engine_config(model: dict, image_size: int, batch_size: int, **train) -> Config:
    """A validated Config for benchmarking the Engine (``train`` overrides the train section).

    Backbones start from random weights unless ``model`` says otherwise: speed does not depend on them, and
    a benchmark must not download.
    """
    return config_from_dict(
        {
            "model": {"pretrained": False, **model},
            "data": {"image_size": image_size},
            "train": {"epochs": 1, "batch_size": batch_size, **train},
        },
        "experiments/benchmarks",
    )


def sync(device: torch.device) -> None:
    """Wait for queued device work (timings on CUDA are otherwise meaningless)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SeedDataset(Dataset):
    """The seed's pipeline: PIL decode, v1 Resize → RandAugment → ToTensor → Normalize; float32 out."""

    def __init__(self, paths: list[str], targets: torch.Tensor, image_size: int):
        self.paths, self.targets = paths, targets
        self.tf = T.Compose(
            [
                T.Resize((image_size, image_size)),
                T.RandAugment(),
                T.ToTensor(),
                T.Normalize(SEED_MEAN, SEED_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB")), self.targets[i]


class SeedTrainer:
    """One training step the seed's way: float32 batch to the device, NCHW, default (non-fused) AdamW,
    OneCycleLR stepped per batch, no EMA; the loss value is read every step. On CUDA fp16 autocast with a
    GradScaler; on a CPU plain fp32, as the seed ran there (its autocast and scaler were CUDA-only)."""

    channels_last = False

    def __init__(self, cfg: Config, device: torch.device):
        self.device = device
        self.precision = seed_precision(device)
        self.model = build_model(cfg.model, NUM_CLASSES).to(device)
        self.loss_fn = build_loss(cfg.loss).to(device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=cfg.optim.lr, total_steps=SCHEDULE_STEPS, pct_start=cfg.optim.pct_start
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

    @staticmethod
    def host_batch(images: torch.Tensor) -> torch.Tensor:
        """What the seed's loader hands over for uint8 ``images``: normalised float32 on the host."""
        mean = torch.tensor(SEED_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(SEED_STD).view(1, 3, 1, 1)
        return (images.float() / 255 - mean) / std

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step on a host batch; returns the loss."""
        self.model.train()
        x = images.to(self.device, non_blocking=True)
        y = targets.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.precision == "fp16"):
            logits = self.model(x)
        loss = self.loss_fn(logits.float(), y)
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.item()


class EngineTrainer:
    """q2l's Engine behind the same interface as ``SeedTrainer`` (uint8 host batches)."""

    def __init__(self, cfg: Config, device: torch.device):
        self.engine = Engine(
            build_model(cfg.model, NUM_CLASSES), build_loss(cfg.loss), cfg, SCHEDULE_STEPS, device
        )
        self.model = self.engine.model
        self.precision = self.engine.precision.name
        self.channels_last = self.engine.precision.channels_last

    @staticmethod
    def host_batch(images: torch.Tensor) -> torch.Tensor:
        """The Engine takes the loader's uint8 batch as it is."""
        return images

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step (``Engine.train_step``); returns the loss."""
        return self.engine.train_step(images, targets)


Trainer = SeedTrainer | EngineTrainer


def build_trainer(
    variant: str, model: dict, image_size: int, batch_size: int, device: torch.device
) -> Trainer:
    """A fresh model and its training step for ``variant`` (one of ``VARIANTS``), seeded identically."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    seed_everything(0)
    if variant == "seed":
        return SeedTrainer(engine_config(model, image_size, batch_size), device)
    return EngineTrainer(engine_config(model, image_size, batch_size, **ENGINE_VARIANTS[variant]), device)


def synthetic_batch(batch_size: int, image_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images [B,3,S,S] and multi-hot targets [B,80] (~5 % positives)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    targets = (torch.rand(batch_size, NUM_CLASSES, generator=g) < 0.05).float()
    return images, targets


def _host_inputs(trainer: Trainer, images: torch.Tensor, targets: torch.Tensor, device: torch.device):
    x, y = trainer.host_batch(images), targets
    if device.type == "cuda":  # as a loader with pin_memory=True delivers them
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


def time_steps(
    trainer: Trainer, x: torch.Tensor, y: torch.Tensor, steps: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each of ``steps`` training steps on the same host batch.

    CPU seconds (all threads of this process) measure the work done, which a shared machine's load does not
    stretch as it stretches the wall clock.
    """
    wall, cpu = [], []
    for _ in range(steps):
        sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.step(x, y)
        sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def flops_per_image(model: dict, image_size: int, device: torch.device, images: int = 2) -> float:
    """Forward FLOPs per image of the model (``train_step_bench.forward_flops_per_image``, fp32)."""
    seed_everything(0)
    net = build_model(engine_config(model, image_size, 1).model, NUM_CLASSES).to(device)
    flops = forward_flops_per_image(net, torch.randn(images, 3, image_size, image_size, device=device))
    del net
    return flops


def _memory_fields(device: torch.device, static_bytes: int) -> dict:
    if device.type != "cuda":
        return {}
    return {
        "static_mib": static_bytes / 2**20,
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
    }


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_sequential(
    variant: str, model: dict, image_size: int, batch_size: int, device: torch.device, steps: int, warmup: int
) -> dict:
    """Build ``variant``, time ``warmup`` + ``steps`` steps on one synthetic host batch, then free it.

    On CUDA also: ``static_mib`` (allocated after the warm-up: weights, optimizer state, EMA) and
    ``peak_mib`` (``max_memory_allocated`` over the timed steps); (peak − static) / batch is the activation
    memory per image.
    """
    _free(device)
    trainer = build_trainer(variant, model, image_size, batch_size, device)
    x, y = _host_inputs(trainer, *synthetic_batch(batch_size, image_size), device)
    first = time_steps(trainer, x, y, 1, device)[0][0]
    time_steps(trainer, x, y, max(0, warmup - 1), device)
    static = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu = time_steps(trainer, x, y, steps, device)
    step_s = statistics.median(times)
    row = {
        "variant": variant,
        "precision": trainer.precision,
        "channels_last": trainer.channels_last,
        "step_s": step_s,
        "step_s_all": times,
        "cpu_s": statistics.median(cpu),
        "images_per_s": batch_size / step_s,
        "first_step_s": first,
        **_memory_fields(device, static),
    }
    if variant.endswith("+compile"):
        row["compile_s"] = first - step_s
    del trainer, x, y
    _free(device)
    return row


def measure_interleaved(
    variants: list[str],
    model: dict,
    image_size: int,
    batch_size: int,
    device: torch.device,
    rounds: int,
    steps_per_round: int,
    warmup: int,
) -> dict:
    """Time every variant in alternating rounds (order reversed every other round) on a shared machine.

    Returns per-variant rows (median step over all timed steps) and, against ``variants[0]``, the median of
    the per-round speed ratios: background load changes between rounds cancel out of a ratio taken within one.
    """
    trainers = {v: build_trainer(v, model, image_size, batch_size, device) for v in variants}
    images, targets = synthetic_batch(batch_size, image_size)
    inputs = {v: _host_inputs(t, images, targets, device) for v, t in trainers.items()}
    for v, t in trainers.items():
        time_steps(t, *inputs[v], warmup, device)  # allocator, oneDNN primitive caches, optimizer state
    per_round: dict[str, list[float]] = {v: [] for v in variants}
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants if r % 2 == 0 else reversed(variants):
            w, c = time_steps(trainers[v], *inputs[v], steps_per_round, device)
            wall[v] += w
            cpu[v] += c
            per_round[v].append(statistics.median(w))
    base = variants[0]
    rows = []
    for v in variants:
        ratios = [b / s for b, s in zip(per_round[base], per_round[v], strict=True)]
        step_s = statistics.median(wall[v])
        rows.append(
            {
                "variant": v,
                "precision": trainers[v].precision,
                "channels_last": trainers[v].channels_last,
                "step_s": step_s,
                "step_s_all": wall[v],
                "cpu_s": statistics.median(cpu[v]),
                "images_per_s": batch_size / step_s,
                f"speedup_vs_{base}": statistics.median(ratios),
                f"speedup_vs_{base}_per_round": ratios,
                f"cpu_speedup_vs_{base}": statistics.median(cpu[base]) / statistics.median(cpu[v]),
            }
        )
    return {"baseline": base, "rounds": rounds, "steps_per_round": steps_per_round, "results": rows}


def make_synthetic_jpegs(
    out: str | Path, count: int, height: int = 480, width: int = 640, seed: int = 0
) -> tuple[list[str], torch.Tensor]:
    """Write ``count`` photo-like JPEGs (COCO's typical 640×480, quality 90); returns paths and targets.

    Smooth random colour fields plus fine noise: they compress and decode at rates close to photos', unlike
    pure noise (far larger files) or flat colour (far smaller). Targets are random, ~5 % positives.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> str:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        coarse = torch.rand(1, 3, height // 32, width // 32, generator=g) * 255
        smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic")[0]
        noise = torch.randn(3, height, width, generator=g) * 6
        img = (smooth + noise).clamp(0, 255).to(torch.uint8)
        path = out / f"{i:06d}.jpg"
        write_file(str(path), encode_jpeg(img, quality=90))
        return str(path)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        paths = list(pool.map(write, range(count)))
    targets = (torch.rand(count, NUM_CLASSES, generator=torch.Generator().manual_seed(seed)) < 0.05).float()
    return paths, targets


@dataclass
class LoaderRun:
    """What one loader-included measurement needs."""

    paths: list[str]
    targets: torch.Tensor
    workers: int
    steps: int
    warmup: int


def shm_worker_cap(variant: str, image_size: int, batch_size: int) -> int | None:
    """Loader workers whose queued batches fit in /dev/shm (None where it does not exist).

    Each worker keeps ``prefetch_factor`` batches in shared memory: 2 (DataLoader's default, the seed) of
    float32, or 4 (q2l's ``build_loader``) of uint8. Containers often mount a small /dev/shm, where more
    workers would die with a bus error; 25 % slack.
    """
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    prefetch, bytes_per_value = (2, 4) if variant == "seed" else (4, 1)
    per_worker = 1.25 * prefetch * batch_size * 3 * image_size**2 * bytes_per_value
    return int(st.f_bavail * st.f_frsize // per_worker)


def _loader_for(
    variant: str, run: LoaderRun, workers: int, image_size: int, batch_size: int, device: torch.device
):
    pin = device.type == "cuda"
    if variant == "seed":
        return DataLoader(
            SeedDataset(run.paths, run.targets, image_size),
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            pin_memory=pin,
            drop_last=True,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(0),
        )
    decode = "device" if variant == "device-decode" else "loader"
    cfg = DataConfig(image_size=image_size, num_workers=workers, decode=decode)
    dataset = _q2l_dataset(run, image_size)
    return build_loader(dataset, cfg, batch_size, train=True, seed=0, device=device)


def _q2l_dataset(run: LoaderRun, image_size: int) -> MultiLabelDataset:
    """q2l's training dataset over the run's JPEGs, with the default augmentation (RandAugment, Cutout)."""
    names = [f"label{k}" for k in range(NUM_CLASSES)]
    return MultiLabelDataset(run.paths, run.targets.numpy(), names, image_size, augment=Augment())


def loader_cpu_ms_per_image(run: LoaderRun, image_size: int, images: int = 48, rounds: int = 3) -> dict:
    """CPU milliseconds per training sample of each side's pipeline (decode, resize, augment, to tensor).

    In this process with one torch thread, as in a DataLoader worker; ``time.process_time`` over alternating
    rounds, median: the per-core loader rate that sizes the cores a GPU needs, stable under background load.
    """
    datasets = {"q2l": _q2l_dataset(run, image_size), "seed": SeedDataset(run.paths, run.targets, image_size)}
    fetch = {
        "q2l": lambda i, r: datasets["q2l"][(i, seed_for(0, r, i))],
        "seed": lambda i, r: datasets["seed"][i],
    }
    n = min(images, len(run.paths))
    times: dict[str, list[float]] = {k: [] for k in fetch}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in range(rounds):
            for name, fn in fetch.items():
                start = time.process_time()
                for i in range(n):
                    fn(i, r)
                times[name].append((time.process_time() - start) / n * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {k: statistics.median(v) for k, v in times.items()}


def _cycle(loader: DataLoader, batches: int):
    seen = 0
    while True:
        for batch in loader:
            yield batch
            seen += 1
            if seen == batches:
                return


def measure_with_loader(
    variant: str, model: dict, image_size: int, batch_size: int, device: torch.device, run: LoaderRun
) -> dict:
    """Images/s of ``variant`` fed by its own DataLoader over ``run.paths`` (decode + transforms included).

    The wall clock over ``run.steps`` steps after ``run.warmup`` (workers started, queues primed): waiting for
    data counts, as in training. Fewer than ``run.workers`` workers are used where /dev/shm cannot hold
    their batches (``shm_worker_cap``); the row says how many ran.
    """
    cap = shm_worker_cap(variant, image_size, batch_size)
    workers = run.workers if cap is None else min(run.workers, cap)
    if run.workers > 0 and workers == 0:
        raise RuntimeError(
            f"/dev/shm is too small for even one {variant} loader worker at batch {batch_size}"
        )
    if variant not in LOADER_VARIANTS:
        raise ValueError(f"loader variant {variant!r}: expected one of {', '.join(LOADER_VARIANTS)}")
    _free(device)
    trainer = build_trainer(LOADER_VARIANTS[variant], model, image_size, batch_size, device)
    loader = _loader_for(variant, run, workers, image_size, batch_size, device)
    start = None
    for i, batch in enumerate(_cycle(loader, run.warmup + run.steps)):
        if i == run.warmup:
            sync(device)
            start = time.perf_counter()
        trainer.step(batch[0], batch[1])
    sync(device)
    seconds = time.perf_counter() - start
    del trainer, loader
    _free(device)
    return {
        "variant": variant,
        "workers": workers,
        "images": run.steps * batch_size,
        "seconds": seconds,
        "images_per_s": run.steps * batch_size / seconds,
        "images_per_s_per_worker": run.steps * batch_size / seconds / max(1, workers),
    }


def matmul_peaks(device: torch.device, precisions: set[str]) -> dict[str, float]:
    """FLOP/s of a large square matmul for each of ``precisions`` the device runs natively, measured now."""
    native = native_precisions(device)
    return {name: matmul_peak(device, DTYPES[name]) for name in sorted(precisions) if name in native}


def add_utilisation(rows: list[dict], flops_image: float, batch_size: int, peaks: dict[str, float]) -> None:
    """Add achieved TFLOP/s (3 × forward FLOPs per step) and the share of the matching matmul peak (MFU;
    None where no peak applies)."""
    for row in rows:
        if "step_s" not in row:
            continue
        achieved = 3 * flops_image * batch_size / row["step_s"]
        row["achieved_tflops"] = achieved / 1e12
        row["utilisation"] = utilisation(achieved, row["precision"], peaks)


def device_name(device: torch.device) -> str:
    """A human name for ``device`` (GPU model, or the CPU's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "cpu")
    return f"{model}, {torch.get_num_threads()} torch threads"


def seed_precision(device: torch.device) -> str:
    """What the seed trained in on ``device``: fp16 autocast on CUDA, fp32 elsewhere."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def variant_precision(variant: str, device: torch.device) -> str:
    """The precision name ``variant`` trains in on ``device`` (for choosing matmul peaks up front)."""
    if variant == "seed":
        return seed_precision(device)
    return resolve_precision(ENGINE_VARIANTS[variant].get("precision", "auto"), device).name


def run_comparison(
    backbone: str,
    image_size: int,
    batch_size: int,
    *,
    device: torch.device,
    variants: list[str],
    steps: int = 10,
    warmup: int = 3,
    interleave_rounds: int = 0,
    loader: LoaderRun | None = None,
    loader_variants: tuple[str, ...] = ("default", "seed"),
    deadline: float | None = None,
    model_overrides: dict | None = None,
    log: Callable[[str], None] = print,
    on_update: Callable[[dict], None] | None = None,
) -> dict:
    """Time ``variants`` of one model; returns (and passes to ``on_update`` after every measurement) a dict.

    Step-only rows: one variant at a time, or all interleaved when ``interleave_rounds`` > 0; with FLOPs
    per image and utilisation against matmul peaks measured first. Then, with ``loader``, both pipelines'
    CPU time per image and loader-included rows for ``loader_variants`` (either list may be empty).
    ``+compile`` variants run last (their compilation is the slowest part).
    A measurement that would start after ``deadline`` (``time.monotonic()``) is skipped and listed.
    """
    model = model_section(backbone, **(model_overrides or {}))
    result: dict = {
        "backbone": backbone,
        "model": model,
        "image_size": image_size,
        "batch_size": batch_size,
        "device": device_name(device),
        "torch": torch.__version__,
        "cudnn_benchmark": torch.backends.cudnn.benchmark if device.type == "cuda" else None,
        "results": [],
        "skipped": [],
    }

    def update() -> None:
        _summarise(result)
        if on_update is not None:
            on_update(result)

    def in_time(what: str) -> bool:
        if deadline is not None and time.monotonic() > deadline:
            result["skipped"].append(what)
            log(f"  skipped {what}: time budget spent")
            return False
        return True

    rows = result["results"]
    if variants:
        flops = flops_per_image(model, image_size, device)
        result["gflop_per_image_fwd"] = flops / 1e9
        peaks = matmul_peaks(device, {variant_precision(v, device) for v in variants})
        result["matmul_peak_tflops"] = {k: v / 1e12 for k, v in peaks.items()}
    if interleave_rounds:
        steps_per_round = max(1, steps // interleave_rounds)
        log(f"  {', '.join(variants)}: {interleave_rounds} interleaved rounds × {steps_per_round} steps")
        inter = measure_interleaved(
            variants, model, image_size, batch_size, device, interleave_rounds, steps_per_round, warmup
        )
        rows += inter.pop("results")
        result["interleaved"] = inter
        add_utilisation(rows, flops, batch_size, peaks)
        update()
        eager = []
    else:
        eager = [v for v in variants if not v.endswith("+compile")]
    for v in eager:
        if in_time(f"step {v}"):
            log(f"  step {v} ...")
            rows.append(measure_sequential(v, model, image_size, batch_size, device, steps, warmup))
            add_utilisation(rows, flops, batch_size, peaks)
            update()
    if loader is not None:
        result["loader_cpu_ms_per_image"] = loader_cpu_ms_per_image(loader, image_size)
        update()
        result["loader_included"] = []
        for v in loader_variants:
            if in_time(f"loader {v}"):
                log(f"  loader-included {v} (up to {loader.workers} workers) ...")
                try:
                    row = measure_with_loader(v, model, image_size, batch_size, device, loader)
                except RuntimeError as e:  # a worker killed (shared memory, OOM): keep the other numbers
                    result.setdefault("errors", []).append(f"loader {v}: {e}")
                    log(f"  loader-included {v} failed: {e}")
                    continue
                result["loader_included"].append(row)
                update()
    for v in variants if not interleave_rounds else []:
        if v.endswith("+compile") and in_time(f"step {v}"):
            log(f"  step {v} (compiling) ...")
            rows.append(measure_sequential(v, model, image_size, batch_size, device, steps, warmup))
            add_utilisation(rows, flops, batch_size, peaks)
            update()
    update()
    return result


def _summarise(result: dict) -> None:
    """Speed-ups against the seed (step-only and loader-included) from the rows measured so far."""
    by_name = {r["variant"]: r for r in result["results"]}
    if "seed" in by_name and not result.get("interleaved"):
        result["speedup_vs_seed"] = {
            v: by_name["seed"]["step_s"] / r["step_s"] for v, r in by_name.items() if v != "seed"
        }
    loaded = {r["variant"]: r for r in result.get("loader_included", [])}
    if "seed" in loaded and "default" in loaded:
        result["loader_included_speedup_vs_seed"] = (
            loaded["default"]["images_per_s"] / loaded["seed"]["images_per_s"]
        )
    if "seed" in loaded and "device-decode" in loaded:
        result["device_decode_speedup_vs_seed"] = (
            loaded["device-decode"]["images_per_s"] / loaded["seed"]["images_per_s"]
        )


def loader_run(
    jpeg_dir: str | Path, count: int, workers: int, steps: int, warmup: int, seed: int = 0
) -> LoaderRun:
    """Generate ``count`` synthetic JPEGs under ``jpeg_dir`` and describe a loader-included run over them."""
    paths, targets = make_synthetic_jpegs(jpeg_dir, count, seed=seed)
    return LoaderRun(paths, targets, workers, steps, warmup)


def images_needed(batch_size: int, steps: int, warmup: int) -> int:
    """JPEGs for one pass without an epoch boundary in the timed window (which would drain the prefetch)."""
    return batch_size * (steps + warmup + 1)


def describe(result: dict) -> str:
    """The table ``suite`` prints for a comparison: one line per step-only and loader-included row."""
    flops = result.get("gflop_per_image_fwd")
    lines = [
        f"{result['backbone']} @ {result['image_size']} px, batch {result['batch_size']}, "
        f"{result['device']}, torch {result['torch']}"
        + (f"; {flops:.2f} GFLOP/image forward" if flops is not None else "")
    ]
    if result.get("results"):
        peaks = ", ".join(f"{k} {v:.3g}" for k, v in result["matmul_peak_tflops"].items())
        lines += [
            f"matmul peak TFLOP/s: {peaks}",
            f"{'variant':<16}{'prec':>5}{'CL':>4}{'step s':>9}{'CPU s':>8}{'img/s':>9}{'TFLOP/s':>9}"
            f"{'MFU':>7}{'peak MiB':>10}{'first s':>9}{'ratio':>7}",
        ]
    base = result.get("interleaved", {}).get("baseline")
    for r in result.get("results", []):
        ratio = r.get(f"speedup_vs_{base}") if base else result.get("speedup_vs_seed", {}).get(r["variant"])
        peak = f"{r['peak_mib']:10.0f}" if "peak_mib" in r else f"{'-':>10}"
        first = f"{r['first_step_s']:9.2f}" if "first_step_s" in r else f"{'-':>9}"
        mfu = f"{r['utilisation']:7.1%}" if r.get("utilisation") is not None else f"{'-':>7}"
        lines.append(
            f"{r['variant']:<16}{r['precision']:>5}{'y' if r['channels_last'] else 'n':>4}{r['step_s']:9.4f}"
            f"{r['cpu_s']:8.3f}{r['images_per_s']:9.1f}{r['achieved_tflops']:9.3f}{mfu}"
            f"{peak}{first}" + (f"{ratio:7.2f}" if ratio is not None else f"{'-':>7}")
        )
    for r in result.get("loader_included", []):
        lines.append(
            f"loader-included {r['variant']:<8} {r['images_per_s']:8.1f} img/s with {r['workers']} workers "
            f"({r['images_per_s_per_worker']:.1f} per worker)"
        )
    if "loader_included_speedup_vs_seed" in result:
        lines.append(f"loader-included speedup vs seed: {result['loader_included_speedup_vs_seed']:.2f}")
    if "device_decode_speedup_vs_seed" in result:
        lines.append(
            f"loader-included, data.decode = device, vs seed: {result['device_decode_speedup_vs_seed']:.2f}"
        )
    if "loader_cpu_ms_per_image" in result:
        ms = result["loader_cpu_ms_per_image"]
        lines.append(f"loader CPU ms per image (one core): q2l {ms['q2l']:.2f}, seed {ms['seed']:.2f}")
    if result.get("skipped"):
        lines.append(f"skipped (time budget): {', '.join(result['skipped'])}")
    return "\n".join(lines)
