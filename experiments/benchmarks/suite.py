"""``q2l bench``: the benchmark suite. Each part runs alone, prints its table and writes JSON under ``--out``.

  a     training step through the Engine (``train_step_bench``): images/s, forward FLOPs per image,
        MFU against a matmul peak measured in the same run (where the device runs that dtype natively),
        peak memory, per precision/layout;
        then the fast-path check: the Engine's default precision policy against fp32 NCHW, interleaved
        rounds, median ratio (target on a CPU with native bf16: ≥ 2×)
  b     data loader (``loader_bench``): q2l's pipeline vs the seed's, images/s per worker, CPU ms per image
  c     metrics (``metrics_bench``): q2l's AP vs torchmetrics' and a scikit-learn loop, 5,000 and 40,504 × 80
  d     Ray overhead (``ray_overhead_bench``): the Engine loop alone vs ``q2l train`` with 1 (and 2) workers
  e     peak training memory per image (``memory_bench``)
  seed  the fast path vs the seed's way of training (``seed_baseline``; on a CPU the seed's fp32 NCHW path):
        step-only and loader-included, with MFU and peak memory; ``gpu.sh`` runs this part on a GPU
  searchers    random vs TPE vs GP, with and without ASHA-style stopping, on a cheap training proxy
        (``searcher_bench``): best held-out mAP against trials and epochs spent, PNG + markdown + MLflow
  sweep_scale  100 scripted trials through the sweep's Tune path (driver overhead per trial) and
        ``record_sweep`` time at 25/50/100 trials (``sweep_scale_bench``)

    python -m experiments.benchmarks.suite a --threads 1         # from the repository root
    q2l bench a c e --backbone resnet18 --image-size 224 --batch-size 16

On a machine shared with other jobs, use ``--threads 1``: with every core busy, multi-threaded kernels
wait on preempted threads at each barrier and the timings say more about the load than about the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .common import resolve_device, write_json

PARTS = ("a", "b", "c", "d", "e", "seed", "searchers", "sweep_scale")
DEFAULT_PARTS = ("a", "b", "c", "d", "e")
CPU_TARGET = 2.0  # issue 8: default training step ≥ 2× fp32 NCHW on a CPU with native bf16
SEED_TARGET = 1.5  # issue 8: fast path ≥ 1.5× the seed's way on a GPU
REPO = Path(__file__).resolve().parents[2]


def part_a(args: argparse.Namespace, out: Path) -> dict:
    """Training step table (train_step_bench) and the interleaved default-vs-fp32 check."""
    from q2l.data.loaders import local_cores, plan_cpus
    from q2l.engine import cpu_bf16_supported

    from . import seed_baseline, train_step_bench

    device = resolve_device(args.device)
    precisions = args.precisions or (
        ("fp16", "fp16+cl", "bf16+cl") if device.type == "cuda" else ("fp32", "bf16", "bf16+cl")
    )
    table = train_step_bench.run(
        args.backbone,
        args.image_size,
        args.batch_size,
        tuple(precisions),
        None,
        args.steps,
        args.warmup,
        str(device),
    )
    print("\nfast-path check: the Engine's default policy vs fp32 NCHW (interleaved rounds)")
    check = seed_baseline.run_comparison(
        args.backbone,
        args.image_size,
        args.batch_size,
        device=device,
        variants=["fp32", "default"],
        steps=args.rounds * args.steps_per_round,
        warmup=args.warmup,
        interleave_rounds=args.rounds,
    )
    print(seed_baseline.describe(check))
    default = next(r for r in check["results"] if r["variant"] == "default")
    speedup = default["speedup_vs_fp32"]
    target = CPU_TARGET if device.type == "cpu" and cpu_bf16_supported() else None
    verdict = "no target here" if target is None else ("met" if speedup >= target else "MISSED")
    print(
        f"default ({default['precision']}, channels_last={default['channels_last']}) vs fp32 NCHW: "
        f"{speedup:.2f}× wall (median of {args.rounds} rounds), {default['cpu_speedup_vs_fp32']:.2f}× CPU "
        f"time; target {target or '-'}: {verdict}"
    )
    cores = local_cores()
    return {
        "train_step": table,
        "fast_path_check": check,
        "speedup_default_vs_fp32": speedup,
        "target": target,
        "target_met": None if target is None else speedup >= target,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "cpu_plan": dataclasses.asdict(plan_cpus(cores)),
    }


def _demo_root(args: argparse.Namespace) -> Path:
    """``--data-root``, generated as the standard demo set (``q2l data demo``) when missing."""
    root = Path(args.data_root)
    if not (root / "annotations").exists():
        from q2l.data.demo import make_demo_dataset

        print(f"{root} has no data set: generating the demo set there (q2l data demo) ...")
        print(make_demo_dataset(root))
    return root


def part_b(args: argparse.Namespace, out: Path) -> dict:
    """The loader benchmark on the demo set, per worker count."""
    from q2l.data.loaders import local_cores, plan_cpus

    from . import loader_bench

    root = _demo_root(args)
    workers = args.workers or [max(1, plan_cpus(local_cores()).loader_workers)]
    rows = []
    for w in workers:
        r = loader_bench.run(root, args.image_size, w, None, batch_size=args.batch_size, images=args.images)
        base, ours = r["baseline"], r["q2l"]
        print(
            f"loader @ {args.image_size} px, {w} worker(s): q2l {ours['images_per_s_per_worker']:.1f} img/s "
            f"per worker, seed {base['images_per_s_per_worker']:.1f} ({r['ratio']:.2f}×); CPU ms/image q2l "
            f"{r['cpu_ms_per_image']['q2l']:.2f}, seed {r['cpu_ms_per_image']['baseline']:.2f} "
            f"({r['cpu_ratio']:.2f}×)"
        )
        rows.append(r)
    return {"rows": rows}


def part_c(args: argparse.Namespace, out: Path) -> dict:
    """Metrics: q2l's vectorised AP vs torchmetrics' and a per-class scikit-learn loop."""
    from . import metrics_bench

    return metrics_bench.run(None, repeats=args.repeats, threads=args.threads)


def part_d(args: argparse.Namespace, out: Path) -> dict:
    """Ray overhead: Engine alone vs ``q2l train`` (1 and 2 workers), on a demo subset (``--set`` wins)."""
    from . import ray_overhead_bench

    _demo_root(args)
    # 1,350 training and 400 held-out / test images: a run takes about a minute on one core, so the
    # 2 × repeats + 1 runs fit in a few minutes; the rate per image does not depend on the subset
    subset = ("data.max_train_images=1350", "data.max_eval_images=400")
    return ray_overhead_bench.run(
        args.config,
        args.epochs,
        tuple(args.ray_workers),
        args.repeats,
        (f"data.root={args.data_root}", *subset, *args.set),
        out / "ray_overhead",
        None,
    )


def part_e(args: argparse.Namespace, out: Path) -> dict:
    """Peak training memory per image over ``--batch-sizes``."""
    from . import memory_bench

    return memory_bench.run(
        args.backbone,
        args.image_size,
        tuple(args.batch_sizes),
        steps=max(1, args.warmup),
        device=args.device,
        activation_checkpointing=args.activation_checkpointing,
        threads=args.threads if args.threads is not None else torch.get_num_threads(),
    )


def part_seed(args: argparse.Namespace, out: Path) -> dict:
    """The fast path vs the seed's way: step-only, then loader-included over generated JPEGs."""
    from q2l.data.loaders import local_cores, plan_cpus

    from . import seed_baseline

    device = resolve_device(args.device)
    if device.type == "cuda":
        # both sides get cuDNN's autotuner (fixed shapes: drop_last batches), as the official Q2L code sets
        torch.backends.cudnn.benchmark = True
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    name = json_name("seed", args)

    def save(result: dict) -> None:
        write_json(out / name, result)
        (out / name).with_suffix(".md").write_text(markdown(result))

    with tempfile.TemporaryDirectory(prefix="q2l-bench-jpegs-") as tmp:
        loader = None
        if args.loader_steps > 0:
            plan = plan_cpus(local_cores(), device.type, args.loader_workers)
            workers = max(1, plan.loader_workers)
            count = seed_baseline.images_needed(args.batch_size, args.loader_steps, args.loader_warmup)
            print(f"writing {count} synthetic 640×480 JPEGs for the loader-included runs ...")
            loader = seed_baseline.loader_run(tmp, count, workers, args.loader_steps, args.loader_warmup)
        result = seed_baseline.run_comparison(
            args.backbone,
            args.image_size,
            args.batch_size,
            device=device,
            variants=args.variants,
            steps=args.steps,
            warmup=args.warmup,
            loader=loader,
            loader_variants=tuple(args.loader_variants),
            deadline=deadline,
            on_update=save,
        )
    result["target"] = SEED_TARGET if device.type == "cuda" else None
    save(result)
    print(seed_baseline.describe(result))
    return result


def markdown(result: dict) -> str:
    """A markdown table of a ``seed`` part result (what gpu.sh collects into its report)."""
    lines = [
        f"### Query2Label {result['backbone']} @ {result['image_size']} px, batch {result['batch_size']}",
        "",
        f"{result['device']}, torch {result['torch']}; model {json.dumps(result['model'])}; "
        f"{result.get('gflop_per_image_fwd', math.nan):.2f} GFLOP/image forward (train step = 3×); "
        "matmul peak TFLOP/s measured in the run: "
        + ", ".join(f"{k} {v:.1f}" for k, v in result.get("matmul_peak_tflops", {}).items()),
    ]
    if result["results"]:
        lines += [
            "",
            "| variant | precision | channels_last | step s | images/s | MFU | peak MiB | static MiB | "
            "first step s | vs seed |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    speedups = result.get("speedup_vs_seed", {})
    for r in result["results"]:
        cells = [
            r["variant"],
            r["precision"],
            "yes" if r["channels_last"] else "no",
            f"{r['step_s']:.4f}",
            f"{r['images_per_s']:.1f}",
            f"{r['utilisation']:.1%}" if r.get("utilisation") is not None else "-",
            f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-",
            f"{r['static_mib']:.0f}" if "static_mib" in r else "-",
            f"{r['first_step_s']:.1f}" if "first_step_s" in r else "-",
            f"{speedups[r['variant']]:.2f}×" if r["variant"] in speedups else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("loader_included"):
        lines += ["", "| loader-included | workers | images/s | per worker |", "|---|---|---|---|"]
        for r in result["loader_included"]:
            lines.append(
                f"| {r['variant']} | {r['workers']} | {r['images_per_s']:.1f} | "
                f"{r['images_per_s_per_worker']:.1f} |"
            )
        if "loader_included_speedup_vs_seed" in result:
            lines.append(
                f"\nloader-included speed-up vs seed: {result['loader_included_speedup_vs_seed']:.2f}×"
            )
        if "device_decode_speedup_vs_seed" in result:
            lines.append(
                f"\nwith data.decode = device: {result['device_decode_speedup_vs_seed']:.2f}× the seed"
            )
    if "loader_cpu_ms_per_image" in result:
        ms = result["loader_cpu_ms_per_image"]
        lines.append(
            f"\nloader CPU ms per image on one core (640×480 JPEG → {result['image_size']} px, augmented): "
            f"q2l {ms['q2l']:.2f}, seed {ms['seed']:.2f}"
        )
    if result.get("skipped"):
        lines.append(f"\nskipped (time budget): {', '.join(result['skipped'])}")
    for error in result.get("errors", []):
        lines.append(f"\nfailed: {error}")
    return "\n".join(lines) + "\n"


RUNNERS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {
    "a": part_a,
    "b": part_b,
    "c": part_c,
    "d": part_d,
    "e": part_e,
    "seed": part_seed,
    "searchers": lambda args, out: _searcher_bench().part(args, out),
    "sweep_scale": lambda args, out: _sweep_scale_bench().part(args, out),
}


def _searcher_bench():
    from . import searcher_bench

    return searcher_bench


def _sweep_scale_bench():
    from . import sweep_scale_bench

    return sweep_scale_bench


def json_name(part: str, args: argparse.Namespace) -> str:
    """The file a part's JSON goes to (model and size in the name where the part depends on them)."""
    model = f"{args.backbone}_{args.image_size}"
    ckpt = "_ckpt" if args.activation_checkpointing else ""
    return {
        "a": f"train_step_{model}",
        "b": f"loader_{args.image_size}",
        "c": "metrics",
        "d": "ray_overhead",
        "e": f"memory_{model}{ckpt}",
        "seed": f"seed_{model}",
        "searchers": "searchers",
        "sweep_scale": "sweep_scale",
    }[part] + ".json"


def parser() -> argparse.ArgumentParser:
    """The suite's command line (``q2l bench`` passes its arguments through)."""
    p = argparse.ArgumentParser(
        prog="q2l bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("parts", nargs="*", metavar="PART", help=f"any of {' '.join(PARTS)} (default: a–e)")
    p.add_argument("--out", default="results/bench", help="folder for the JSON files (default results/bench)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    g = p.add_argument_group("model and step (a, e, seed)")
    g.add_argument("--backbone", default="tf_efficientnet_lite0")
    g.add_argument("--image-size", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    g = p.add_argument_group("a: fast-path check")
    g.add_argument("--precisions", nargs="+", default=None, help="train_step_bench variants")
    g.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    g.add_argument("--steps-per-round", type=int, default=2)
    g = p.add_argument_group("b, d: data")
    g.add_argument("--data-root", default="data/demo", help="demo set (generated there when missing)")
    g.add_argument("--workers", type=int, nargs="+", default=None, help="b: loader workers (default auto)")
    g.add_argument("--images", type=int, default=1024, help="b: images timed per loader")
    g = p.add_argument_group("c: metrics")
    g.add_argument("--repeats", type=int, default=3, help="c: timing repeats; d: engine/ray-1 pairs")
    g = p.add_argument_group("d: Ray overhead")
    g.add_argument("--config", default=str(REPO / "experiments" / "demo.yaml"))
    g.add_argument("--epochs", type=int, default=3, help="d: epochs per mode (≥ 2)")
    g.add_argument("--ray-workers", type=int, nargs="+", default=[1, 2])
    g.add_argument("--set", action="append", default=[], help="config override section.key=value")
    g = p.add_argument_group("e: memory")
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    g.add_argument("--activation-checkpointing", action="store_true")
    g = p.add_argument_group("seed: fast path vs the seed's way")
    g.add_argument("--variants", nargs="*", default=["seed", "default", "default+compile"])
    g.add_argument(
        "--loader-variants", nargs="*", default=["default", "seed"], help="also: device-decode (data.decode)"
    )
    g.add_argument("--loader-steps", type=int, default=10, help="loader-included steps (0: skip)")
    g.add_argument("--loader-warmup", type=int, default=3)
    g.add_argument("--loader-workers", type=int, default=None, help="default: cores − 1")
    g.add_argument("--budget-s", type=float, default=None, help="skip measurements after this many seconds")
    g = p.add_argument_group("searchers, sweep_scale")
    g.add_argument("--searcher-trials", type=int, default=12, help="searchers: trials per search")
    g.add_argument("--searcher-seeds", type=int, default=3, help="searchers: seeds per searcher and mode")
    g.add_argument("--searcher-epochs", type=int, default=4, help="searchers: epochs of a completed trial")
    g.add_argument("--scale-trials", type=int, default=100, help="sweep_scale: scripted trials through Tune")
    g.add_argument("--scale-concurrent", type=int, default=2, help="sweep_scale: trials at once")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the requested parts in order; returns a process exit status."""
    args = parser().parse_args(argv)
    parts = args.parts or list(DEFAULT_PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser().error(f"unknown part(s) {' '.join(unknown)}: choose from {' '.join(PARTS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        print(f"\n=== part {part} ===")
        start = time.perf_counter()
        result = RUNNERS[part](args, out)
        result["part_seconds"] = time.perf_counter() - start
        write_json(out / json_name(part, args), result)
        print(f"wrote {out / json_name(part, args)} ({result['part_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
