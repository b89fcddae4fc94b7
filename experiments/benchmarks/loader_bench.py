"""Loader throughput: q2l's pipeline vs the seed's PIL + torchvision-v1 pipeline, on the demo set.

Ours: ``torchvision.io.decode_image`` on the file bytes → squish resize on uint8 (antialias) → RandAugment
(v2, uint8) → Cutout; yields uint8 (normalisation happens on the device). Baseline (the seed): PIL open →
``Resize`` → ``RandAugment`` → ``ToTensor`` → ``Normalize`` (v1 transforms, float32 out). Same images, batch
size and worker count; both warmed up (workers started, caches hot) before timing.

Two numbers per pipeline: DataLoader images/s per worker (wall clock, what training sees), and CPU ms per
image in-process (``time.process_time`` over alternating rounds, median), which stays meaningful on a
machine shared with other jobs, where wall-clock rates swing with the load.

    python -m experiments.benchmarks.loader_bench --root data/demo --image-size 224 --workers 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from q2l.config import DataConfig
from q2l.data import build_datasets, build_loader

from .common import write_json
from .seed_baseline import SeedDataset


def _throughput(loader: DataLoader, images: int, warmup_batches: int) -> float:
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    seen, start = 0, time.perf_counter()
    while seen < images:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        seen += len(batch[0])
    return seen / (time.perf_counter() - start)


def _cpu_ms_per_image(ours, seed_ds, n: int, rounds: int = 5) -> dict[str, float]:
    from q2l.data.transforms import seed_for

    fns = {"q2l": lambda i, r: ours[(i, seed_for(0, r, i))], "baseline": lambda i, r: seed_ds[i]}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in fns.items():  # alternate so both see the same background load
            start = time.process_time()
            for i in range(n):
                fn(i % len(ours), r)
            times[name].append((time.process_time() - start) / n * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def run(
    root: str | Path,
    image_size: int = 224,
    workers: int = 1,
    out_json: str | Path | None = None,
    *,
    batch_size: int = 64,
    images: int = 1024,
    warmup_batches: int = 4,
    pin_memory: bool = False,
) -> dict:
    """Measure both loaders on the demo set's training split; returns (and optionally writes) the numbers."""
    torch.set_num_threads(1)
    cfg = DataConfig(root=str(root), image_size=image_size, num_workers=workers)
    ds = build_datasets(cfg).train
    ours = build_loader(ds, cfg, batch_size, train=True, seed=0, device="cuda" if pin_memory else None)
    seed_ds = SeedDataset(ds.paths, ds.targets, image_size)
    seed_loader = DataLoader(
        seed_ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )
    result = {
        "root": str(root),
        "image_size": image_size,
        "workers": workers,
        "batch_size": batch_size,
        "pin_memory": pin_memory,
        "cpu_ms_per_image": _cpu_ms_per_image(ds, seed_ds, min(200, len(ds))),
    }
    for name, loader in (("baseline", seed_loader), ("q2l", ours)):
        ips = _throughput(loader, images, warmup_batches)
        result[name] = {"images_per_s": ips, "images_per_s_per_worker": ips / max(1, workers)}
    result["ratio"] = result["q2l"]["images_per_s"] / result["baseline"]["images_per_s"]
    result["cpu_ratio"] = result["cpu_ms_per_image"]["baseline"] / result["cpu_ms_per_image"]["q2l"]
    if out_json is not None:
        write_json(out_json, result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/demo")
    ap.add_argument("--image-size", type=int, nargs="+", default=[224])
    ap.add_argument("--workers", type=int, nargs="+", default=[1])
    ap.add_argument("--pin-memory", action="store_true", help="pin batches (as on a GPU machine)")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--out-json", default="results/bench/loader_bench.json")
    args = ap.parse_args()
    rows = [
        run(args.root, s, w, None, images=args.images, pin_memory=args.pin_memory)
        for s in args.image_size
        for w in args.workers
    ]
    head = [
        "size",
        "workers",
        "base img/s/wkr",
        "q2l img/s/wkr",
        "ratio",
        "base cpu ms",
        "q2l cpu ms",
        "cpu ratio",
    ]
    print(" ".join(f"{h:>14}" for h in head))
    for r in rows:
        b, q = r["baseline"]["images_per_s_per_worker"], r["q2l"]["images_per_s_per_worker"]
        cb, cq = r["cpu_ms_per_image"]["baseline"], r["cpu_ms_per_image"]["q2l"]
        cells = [r["image_size"], r["workers"], f"{b:.1f}", f"{q:.1f}", f"{r['ratio']:.2f}"]
        cells += [f"{cb:.3f}", f"{cq:.3f}", f"{r['cpu_ratio']:.2f}"]
        print(" ".join(f"{c:>14}" for c in cells))
    print(f"wrote {write_json(args.out_json, rows)}")


if __name__ == "__main__":
    main()
