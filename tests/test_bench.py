"""Smoke tests of the benchmark suite (experiments/benchmarks) on tiny settings, on CPU.

They check that every part runs and writes what it promises (JSON fields, ratios, tables); speed itself is
measured by the benchmarks, never asserted here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from q2l.data.images import decode_rgb
from q2l.engine import cpu_bf16_supported

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # experiments/ is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO))

from experiments.benchmarks import (  # noqa: E402
    common,
    memory_bench,
    metrics_bench,
    seed_baseline,
    suite,
    sweep_scale_bench,
)

TINY = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "2", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_unknown_part_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        suite.main(["z", "--out", str(tmp_path)])


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="'nope'.*seed, default"):
        seed_baseline.build_trainer("nope", {"backbone": "resnet18"}, 32, 2, torch.device("cpu"))


def test_fit_line_recovers_slope_and_intercept():
    slope, intercept = memory_bench.fit_line([8, 16, 32], [100 + 3 * 8, 100 + 3 * 16, 100 + 3 * 32])
    assert slope == pytest.approx(3.0) and intercept == pytest.approx(100.0)
    with pytest.raises(ValueError, match="two different batch sizes"):
        memory_bench.fit_line([8, 8], [1.0, 2.0])


def test_synthetic_jpegs_are_real_decodable_images(tmp_path):
    paths, targets = seed_baseline.make_synthetic_jpegs(tmp_path, 3, height=48, width=64, seed=1)
    assert len(paths) == 3 and targets.shape == (3, seed_baseline.NUM_CLASSES)
    img = decode_rgb(paths[0])
    assert img.shape == (3, 48, 64) and img.dtype == torch.uint8
    assert img.float().std() > 5  # not a flat colour: photo-like content for a fair decode cost
    again, _ = seed_baseline.make_synthetic_jpegs(tmp_path / "again", 1, height=48, width=64, seed=1)
    assert Path(again[0]).read_bytes() == Path(paths[0]).read_bytes()  # seeded


def test_seed_and_engine_steps_train_the_same_model():
    model = {"backbone": "resnet18", "hidden_dim": 32, "num_heads": 2, "dim_feedforward": 64}
    images, targets = seed_baseline.synthetic_batch(2, 32)
    cpu = torch.device("cpu")
    seed = seed_baseline.build_trainer("seed", model, 32, 2, cpu)
    fp32 = seed_baseline.build_trainer("fp32", model, 32, 2, cpu)
    assert sum(p.numel() for p in seed.model.parameters()) == sum(p.numel() for p in fp32.model.parameters())
    x = seed.host_batch(images)
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 0.5  # normalised on the host, as the seed did
    assert fp32.host_batch(images).dtype == torch.uint8  # the Engine normalises on the device
    before = [p.detach().clone() for p in fp32.model.parameters()]
    assert math.isfinite(seed.step(x, targets)) and math.isfinite(fp32.step(images, targets))
    assert any(not torch.equal(a, b) for a, b in zip(before, fp32.model.parameters(), strict=True))
    # on a CPU the seed trained in plain fp32 (its fp16 autocast and GradScaler were CUDA-only)
    assert (seed.precision, seed.channels_last) == ("fp32", False) and not seed.scaler.is_enabled()
    assert seed_baseline.variant_precision("seed", torch.device("cuda")) == "fp16"
    assert (fp32.precision, fp32.channels_last) == ("fp32", False)


def test_write_json_and_device_choice(tmp_path):
    path = common.write_json(tmp_path / "deep" / "r.json", {"a": 1.5, "p": Path("x"), "n": None})
    assert json.loads(path.read_text()) == {"a": 1.5, "p": "x", "n": None}
    assert common.resolve_device("cpu") == torch.device("cpu")
    assert common.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_mfu_only_against_a_peak_that_applies():
    cpu = torch.device("cpu")
    assert "fp16" not in common.native_precisions(cpu)  # emulated on every CPU: no peak, no MFU
    assert ("bf16" in common.native_precisions(cpu)) == cpu_bf16_supported()
    assert common.native_precisions(torch.device("cuda")) == ("fp32", "bf16", "fp16")
    rows = [
        {"variant": "a", "precision": "fp32", "channels_last": False, "step_s": 1.0},
        {"variant": "b", "precision": "fp16", "channels_last": False, "step_s": 1.0},
    ]
    seed_baseline.add_utilisation(rows, 1e9, 2, {"fp32": 12e9})
    assert rows[0]["utilisation"] == pytest.approx(0.5) and rows[1]["utilisation"] is None
    assert rows[1]["achieved_tflops"] == pytest.approx(6e-3)
    for r in rows:
        r.update(cpu_s=1.0, images_per_s=2.0)
    table = seed_baseline.describe(
        {
            "backbone": "m",
            "image_size": 32,
            "batch_size": 2,
            "device": "cpu",
            "torch": "x",
            "matmul_peak_tflops": {"fp32": 0.012},
            "results": rows,
        }
    )
    assert "50.0%" in table and table.splitlines()[-1].split()[7] == "-"


def test_markdown_table_of_a_seed_result():
    result = {
        "backbone": "resnet101",
        "image_size": 448,
        "batch_size": 64,
        "device": "NVIDIA H100",
        "torch": "2.11",
        "model": {"backbone": "resnet101"},
        "gflop_per_image_fwd": 31.0,
        "matmul_peak_tflops": {"bf16": 700.0, "fp16": 710.0},
        "results": [
            {"variant": "seed", "precision": "fp16", "channels_last": False, "step_s": 0.4},
            {"variant": "default", "precision": "bf16", "channels_last": True, "step_s": 0.2},
        ],
        "speedup_vs_seed": {"default": 2.0},
        "loader_included": [{"variant": "seed", "workers": 15, "images_per_s": 150.0}],
        "skipped": ["step default+compile"],
    }
    for row, ips, util, peak, static, first in zip(
        result["results"], (160, 320), (0.1, 0.2), (40000, 30000), (3000, 3500), (3.0, 2.0), strict=True
    ):
        row.update(images_per_s=ips, utilisation=util, peak_mib=peak, static_mib=static, first_step_s=first)
    result["loader_included"][0]["images_per_s_per_worker"] = 10.0
    md = suite.markdown(result)
    assert "| default | bf16 | yes | 0.2000 | 320.0 | 20.0% | 30000 | 3500 | 2.0 | 2.00× |" in md
    result["results"][0]["utilisation"] = None  # no peak for that precision on that device
    assert "| seed | fp16 | no | 0.4000 | 160.0 | - | 40000 |" in suite.markdown(result)
    assert "| seed | 15 | 150.0 | 10.0 |" in md and "skipped (time budget): step default+compile" in md


def test_part_c_small_n_matches_sklearn_and_torchmetrics(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_bench, "SIZES", (600, 1200))
    assert suite.main(["c", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["num_images"] for r in result["rows"]] == [600, 1200]
    for r in result["rows"]:
        assert r["max_abs_diff_vs_sklearn"] < 1e-9 and r["max_abs_diff_vs_torchmetrics"] < 1e-6
        assert r["ratio_torchmetrics"] > 0 and r["ratio_sklearn"] > 0 and r["summarize_s"] > 0
    assert result["part_seconds"] > 0


@pytest.mark.slow
def test_part_a_tiny_model_writes_table_and_fast_path_check(tmp_path):
    args = [*TINY, "--steps", "1", "--warmup", "1", "--rounds", "2", "--steps-per-round", "1"]
    assert suite.main(["a", *args, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "train_step_resnet18_32.json").read_text())
    assert [r["variant"] for r in result["train_step"]["results"]] == ["fp32", "bf16", "bf16+cl"]
    check = result["fast_path_check"]
    default = next(r for r in check["results"] if r["variant"] == "default")
    assert default["precision"] == ("bf16" if cpu_bf16_supported() else "fp32")
    assert len(default["speedup_vs_fp32_per_round"]) == 2 and default["speedup_vs_fp32"] > 0
    assert check["gflop_per_image_fwd"] > 0 and 0 < default["utilisation"] < 1
    assert result["target"] == (2.0 if cpu_bf16_supported() else None)
    assert result["cpu_plan"]["loader_workers"] >= 0 and result["torch_threads"] == 1


@pytest.mark.slow
def test_part_e_cpu_peak_rss_grows_with_batch(tmp_path):
    args = ["--backbone", "resnet18", "--image-size", "96", "--batch-sizes", "2", "16", "--warmup", "1"]
    assert suite.main(["e", *args, "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "memory_resnet18_96.json").read_text())
    assert [r["batch_size"] for r in result["rows"]] == [2, 16]
    assert all(r["peak_mib"] >= r["after_build_mib"] > 50 for r in result["rows"])
    assert result["per_image_mib"] > 0  # 14 more images of activations show in a fresh process's peak


@pytest.mark.slow
def test_seed_part_runs_with_only_the_gpu_image_packages(tmp_path):
    """The GPU image has torch, torchvision and timm only: gpu.sh's path must not need pycocotools, Ray,
    MLflow, Optuna, Typer, pydantic or torchmetrics. They are made unimportable in a fresh interpreter."""
    code = """
import sys
for name in ("pycocotools", "ray", "mlflow", "optuna", "typer", "pydantic", "sklearn", "torchmetrics"):
    sys.modules[name] = None
from experiments.benchmarks import suite
sys.exit(suite.main(sys.argv[1:]))
"""
    args = [*TINY, "--variants", "seed", "default", "--steps", "1", "--warmup", "1"]
    args += ["--loader-steps", "2", "--loader-warmup", "1", "--loader-workers", "0", "--out", str(tmp_path)]
    args += ["--loader-variants", "default", "seed", "device-decode"]  # as gpu.sh
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code, "seed", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard only
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "seed_resnet18_32.json").read_text())
    assert [r["variant"] for r in result["results"]] == ["seed", "default"]
    assert [r["variant"] for r in result["loader_included"]] == ["default", "seed", "device-decode"]
    assert all(r["images"] == 4 and r["images_per_s"] > 0 for r in result["loader_included"])
    assert result["speedup_vs_seed"]["default"] > 0 and "loader_included_speedup_vs_seed" in result
    assert result["device_decode_speedup_vs_seed"] > 0
    assert set(result["loader_cpu_ms_per_image"]) == {"q2l", "seed"}
    assert "| seed | fp32 | no |" in (tmp_path / "seed_resnet18_32.md").read_text()  # the seed's CPU path


@pytest.mark.slow
def test_part_d_ray_overhead_on_the_tiny_demo(ray_local, mlflow_tmp_config, tiny_demo_root, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(mlflow_tmp_config.to_yaml())
    args = ["--config", str(config), "--epochs", "2", "--ray-workers", "1", "--repeats", "1"]
    assert suite.main(["d", *args, "--data-root", str(tiny_demo_root), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "ray_overhead.json").read_text())
    assert [r["mode"] for r in result["rows"]] == ["engine", "ray-1"]
    assert result["wall_ratio"] > 0 and result["cpu_ratio"] > 0


@pytest.mark.slow
def test_sweep_scale_runs_scripted_trials_through_the_sweeps_search_and_records_them(ray_local):
    result = sweep_scale_bench.run(trials=4, concurrent=2, sizes=(3, 6))
    driver = result["driver"]
    assert driver["errors"] == 0 and driver["trials"] == 4
    # every trial reached the persisted study, each ended as ASHA and the searcher left it
    assert sum(driver["study_states"].values()) == 4 and set(driver["study_states"]) <= {"COMPLETE", "PRUNED"}
    assert [r["rows"] for r in result["record"]] == [3, 6] and all(
        r["record_s"] > 0 for r in result["record"]
    )
    table = sweep_scale_bench.markdown(result)
    assert "4 scripted trials through Tune (2 at once" in table and "| 6 |" in table
