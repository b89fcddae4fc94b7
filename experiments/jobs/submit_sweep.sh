#!/usr/bin/env bash
# Submit a sweep to a running Ray cluster as a Ray job, follow its logs, and exit 0 if it SUCCEEDED.
#
#   experiments/jobs/submit_sweep.sh [CONFIG] [--set section.key=value ...]
#
# CONFIG defaults to experiments/sweeps/demo.yaml. The cluster is $RAY_API_SERVER_ADDRESS (the head's
# dashboard, e.g. http://127.0.0.1:8265). The job runs `q2l tune` in a copy of this checkout that holds code
# only (.git, .venv, data and results are excluded from the upload); the config's relative data and results
# paths are made absolute here, so the job reads the data and writes its results in this checkout's folders
# rather than in its temporary copy. Paths given with --set must be absolute.
#
# Ctrl-C stops following the logs, not the job; `ray job stop ID` stops the job (the sweep saves its state:
# submit again with `--set tune.name=<sweep> --resume` to continue it). The job id is $Q2L_JOB_ID if set.
set -euo pipefail

cd "$(dirname "$0")/../.."
config=experiments/sweeps/demo.yaml
if [[ $# -gt 0 && $1 != -* ]]; then
  config=$1
  shift
fi
job_id=${Q2L_JOB_ID:-q2l-sweep-$(date +%Y%m%d-%H%M%S)}

# --set pairs that make the config's relative local paths absolute (against this checkout)
mapfile -t abs_sets < <(python - "$config" <<'PY'
import os
import sys

from q2l.config import load_config

flat = load_config(sys.argv[1]).flat()
for key in ("data.root", "model.pretrained_path", "ray.storage_path", "mlflow.results_dir"):
    value = flat[key]
    if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
        print("--set")
        print(f"{key}={os.path.abspath(value)}")
PY
)

ray job submit --no-wait --submission-id "$job_id" --working-dir . \
  --runtime-env-json '{"excludes": [".git", ".venv", "data", "results", "mlruns", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"]}' \
  -- q2l tune --config "$config" "${abs_sets[@]}" "$@"
ray job logs --follow "$job_id"
status=$(ray job status "$job_id" 2>&1 | tail -n 5)
echo "$status"
grep -qi "succeeded" <<<"$status"
