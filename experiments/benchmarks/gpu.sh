#!/usr/bin/env bash
# GPU measurements of issue 8 on one H100/H200, in under 8 minutes, installing nothing.
#
# Needs python3 with torch, torchvision and timm (and their own dependencies: numpy, pillow, pyyaml); q2l is
# imported from this checkout (PYTHONPATH), only its core (models, losses, data loaders, engine, config):
# no Ray, MLflow, Optuna, Typer or pycocotools.
#
# For Query2Label-R101 (official: d = 2048, no projection, 4 heads, ff 8192) at 448 px, batch 64, and
# Query2Label-EfficientNet-Lite0 (d = 256) at 224 px, batch 128:
#   step-only: the seed's way (fp16 + GradScaler, NCHW, non-fused AdamW, float32 batches from the host) vs
#     q2l's Engine (bf16, channels_last, fused AdamW, uint8 batches normalised on the GPU), eager and
#     torch.compile (compile time = first step − steady step): images/s, MFU against a bf16/fp16 matmul
#     measured in the same run, peak and static memory;
#   loader-included: each side's real DataLoader over synthetic 640×480 JPEGs written here (torchvision
#     encode_jpeg), cores − 1 workers each, and q2l's with data.decode = device (nvJPEG, resize and
#     augmentation on the GPU);
#   R101 activation memory per image with and without activation checkpointing.
# Each measurement is skipped once its run's budget is spent; results are saved after every measurement, so
# a run stopped by its hard timeout keeps what it measured.
#
#   bash experiments/benchmarks/gpu.sh          # writes to $OUT if set, else results/bench
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR="${OUT:-results/bench}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
LOG="$OUT_DIR/gpu_log.txt"
START=$(date +%s)

bench() {  # bench HARD_TIMEOUT_S ARGS...: one suite run, killed after HARD_TIMEOUT_S
  local limit=$1
  shift
  echo "+ suite $* (hard limit ${limit} s, at $(($(date +%s) - START)) s)"
  timeout -k 10 "$limit" "$PY" -m experiments.benchmarks.suite "$@" --device cuda --out "$OUT_DIR"
  local rc=$?
  [ "$rc" -eq 0 ] || echo "!! exit $rc (124: hard time limit)"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nproc
  df -h /dev/shm
  "$PY" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"

  bench 240 seed --backbone resnet101 --image-size 448 --batch-size 64 --steps 15 --warmup 3 \
    --loader-steps 15 --loader-warmup 4 --loader-variants default seed device-decode --budget-s 170
  bench 130 seed --backbone tf_efficientnet_lite0 --image-size 224 --batch-size 128 --steps 20 --warmup 3 \
    --loader-steps 15 --loader-warmup 4 --loader-variants default seed device-decode --budget-s 75
  bench 35 e --backbone resnet101 --image-size 448 --batch-sizes 16 32 --warmup 2
  bench 35 e --backbone resnet101 --image-size 448 --batch-sizes 16 32 --warmup 2 --activation-checkpointing

  cat "$OUT_DIR"/seed_resnet101_448.md "$OUT_DIR"/seed_tf_efficientnet_lite0_224.md > "$OUT_DIR/gpu_results.md"
  echo >> "$OUT_DIR/gpu_results.md"
  for f in "$OUT_DIR"/memory_resnet101_448.json "$OUT_DIR"/memory_resnet101_448_ckpt.json; do
    [ -f "$f" ] && "$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); print(f\"- {r['backbone']} @ {r['image_size']} px, activation checkpointing {r['activation_checkpointing']}: {r['per_image_mib']:.1f} MiB per image, fixed {r['fixed_mib']:.0f} MiB (max_memory_allocated at batch {', '.join(str(x['batch_size']) for x in r['rows'])})\")" "$f" >> "$OUT_DIR/gpu_results.md"
  done
  echo
  cat "$OUT_DIR/gpu_results.md"
  echo "total $(($(date +%s) - START)) s"
} 2>&1 | tee "$LOG"
