#!/usr/bin/env bash
# Bring up the production-shaped stack on this machine, all on 127.0.0.1:
#   PostgreSQL (own cluster in the state folder) -> MLflow tracking server (basic-auth, artifacts in S3)
#   S3 (moto, credentials and IAM policies enforced: s3_server.py): one bucket for MLflow's artifacts, written
#   only by the MLflow server with its own key, one for Ray's checkpoints and Tune state with the Ray nodes' key
#   Ray head + a second Ray node (token auth on). Each node offers one "worker_slot" (standing in for the one
#   GPU per node of a GPU cluster: ray.resources_per_worker={worker_slot: 1} puts one training worker per
#   node) and its own name as a resource ("head", "node2") to pin work to it.
#
# Usage: cluster/local/up.sh            then: source "$Q2L_STACK_DIR/stack.env" (path printed at the end)
# Idempotent: when the stack recorded in the state folder is running, it prints the env file and exits.
# The stack is ephemeral (moto keeps S3 in memory): each fresh start begins empty; stop it with down.sh.
#
# Settings (environment): Q2L_STACK_DIR (state folder, default <repo>/results/cluster), Q2L_PYTHON (the venv's
# python, default <repo>/.venv/bin/python), Q2L_PG_BIN (PostgreSQL server binaries),
# ports: Q2L_PG_PORT Q2L_S3_PORT Q2L_MLFLOW_PORT Q2L_RAY_PORT Q2L_RAY_DASHBOARD_PORT Q2L_RAY_CLIENT_PORT
# Q2L_RAY_AGENT_PORT Q2L_RAY_NODE2_AGENT_PORT Q2L_RAY_AUTOSCALER_METRIC_PORT Q2L_RAY_DASHBOARD_METRIC_PORT
# (each unset port is picked free), Q2L_RAY_HEAD_CPUS (default 2), Q2L_RAY_NODE2_CPUS (default 1).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=cluster/local/common.sh
source "$HERE/common.sh"

PY="${Q2L_PYTHON:-$REPO/.venv/bin/python}"
VENV_BIN="$(dirname "$PY")"
# The buckets and each role's rights are those of the AWS policies (cluster/aws/iam), applied to the local S3.
IAM="$REPO/cluster/aws/iam"
bucket_of() { "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["Statement"][0]["Resource"].split(":::")[1])' "$1"; }
T_START=$(now)

mkdir -p "$STATE"

# ---- already up? ----------------------------------------------------------------------------------------
if [[ -f "$STATE/stack.env" ]]; then
    if stack_alive; then
        echo "stack already up (state: $STATE)"
        echo "source $STATE/stack.env"
        exit 0
    fi
    echo "a previous stack in $STATE is partly down: stopping what is left first"
    "$HERE/down.sh"
fi

# ---- prerequisites (install nothing; say what is missing) ------------------------------------------------
[[ -x "$PY" ]] || die "python not found at $PY (create the venv: python -m venv .venv && .venv/bin/pip install -e '.[dev]', or set Q2L_PYTHON)"
for tool in ray mlflow moto_server; do
    [[ -x "$VENV_BIN/$tool" ]] || die "$VENV_BIN/$tool not found (install the dev extra: .venv/bin/pip install -e '.[dev]')"
done
"$PY" -c "import psycopg2, boto3, flask_wtf" 2>/dev/null \
    || die "psycopg2 / boto3 / Flask-WTF missing in $PY (install the dev extra: .venv/bin/pip install -e '.[dev]')"
PG_BIN="${Q2L_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"
[[ -n "$PG_BIN" && -x "$PG_BIN/initdb" && -x "$PG_BIN/pg_ctl" && -x "$PG_BIN/psql" ]] \
    || die "PostgreSQL server binaries not found (looked in ${PG_BIN:-/usr/lib/postgresql/*/bin}); install them: apt-get install postgresql (or set Q2L_PG_BIN)"
command -v setsid >/dev/null || die "setsid not found (util-linux)"
command -v curl >/dev/null || die "curl not found"

# A failed start stops whatever it had started (logs stay in the state folder).
trap 'rc=$?; if [[ $rc -ne 0 ]]; then echo "up.sh failed: stopping what it started" >&2; "$HERE/down.sh" >&2 || true; fi' EXIT

MLFLOW_BUCKET="$(bucket_of "$IAM/q2l-mlflow-server.json")"
RAY_BUCKET="$(bucket_of "$IAM/q2l-ray-node.json")"

# ---- fresh state folder ------------------------------------------------------------------------------------
# Other users (postgres) must traverse it; secrets live in a 700 sub-folder.
# Only our own entries are removed, in case the state folder was pointed somewhere shared.
rm -rf "${STATE:?}"/{pids,logs,secrets,ray-tmp,ray-tmp-node2,tmp,mlflow,pg} "$STATE"/{stack.env,ports.env,timings}
mkdir -p "$STATE"/{pids,logs,secrets,ray-tmp,ray-tmp-node2,tmp,mlflow}
chmod 755 "$STATE"
chmod 700 "$STATE/secrets" "$STATE/mlflow"
umask 077

# ---- ports: given ones must be free, missing ones are picked free ----------------------------------------
declare -A PORT
PORT_NAMES=(PG S3 MLFLOW RAY RAY_DASHBOARD RAY_CLIENT RAY_AGENT RAY_NODE2_AGENT RAY_AUTOSCALER_METRIC RAY_DASHBOARD_METRIC)
picked=($("$PY" - "${#PORT_NAMES[@]}" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("0.0.0.0", 0))  # Ray binds some ports on all interfaces: the port must be free there too
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
))
i=0
for name in "${PORT_NAMES[@]}"; do
    var="Q2L_${name}_PORT"
    PORT[$name]="${!var:-${picked[$i]}}"
    i=$((i + 1))
    port_free "${PORT[$name]}" || die "port ${PORT[$name]} ($var) is in use; pick another or leave $var unset"
done
{
    for name in "${PORT_NAMES[@]}"; do echo "Q2L_${name}_PORT=${PORT[$name]}"; done
} >"$STATE/ports.env"

# ---- secrets (generated here, mode 600, never committed) ------------------------------------------------
gen_secret() { "$PY" -c "import secrets; print(secrets.token_urlsafe(32))" >"$STATE/secrets/$1"; }
for s in pg_password optuna_password mlflow_admin_password mlflow_password flask_secret_key ray_token; do
    gen_secret "$s"
done
# The S3 keys (s3_mlflow_*, s3_ray_*) are made by the S3 server at its start, below.

# Secrets reach the servers through exported variables (in subshells), never through argv: `env VAR=secret
# cmd` would show them on a command line.
# export_aws ROLE: the S3 key of that role (mlflow: the MLflow server; ray: the Ray nodes) and nothing else.
export_aws() {
    export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1
    # boto3 and pyarrow (Ray's storage) both read this: s3:// URIs then mean the local S3, as on AWS.
    export AWS_ENDPOINT_URL_S3="$S3_URL"
    AWS_ACCESS_KEY_ID="$(cat "$STATE/secrets/s3_$1_access_key_id")"
    AWS_SECRET_ACCESS_KEY="$(cat "$STATE/secrets/s3_$1_secret_access_key")"
}
S3_URL="http://127.0.0.1:${PORT[S3]}"

# ---- PostgreSQL -----------------------------------------------------------------------------------------------
t=$(now)
PG_DIR="$STATE/pg"
mkdir -p "$PG_DIR/data" "$PG_DIR/run"
if [[ $(id -u) -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user (apt-get install postgresql creates it)"
    chown -R postgres: "$PG_DIR"
fi
chmod 700 "$PG_DIR/data"
as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" --auth-local=peer --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 \
    >"$STATE/logs/initdb.log" 2>&1 \
    || die "initdb failed: see $STATE/logs/initdb.log (run as root, the postgres user must be able to reach $STATE)"
as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p ${PORT[PG]} -k $PG_DIR/run" start >"$STATE/logs/pg_ctl.log" 2>&1 \
    || die "PostgreSQL did not start: see $PG_DIR/postgres.log"
echo "$PG_BIN" >"$STATE/pids/pg_bin"
# The role's password goes through stdin, never a command line.
as_pg "$PG_BIN/psql" -q -v ON_ERROR_STOP=1 -h "$PG_DIR/run" -p "${PORT[PG]}" -d postgres >/dev/null <<EOF
CREATE ROLE mlflow LOGIN PASSWORD '$(cat "$STATE/secrets/pg_password")';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
-- the sweeps' Optuna studies: their own database and role (Ray nodes hold this password, never MLflow's)
CREATE ROLE q2l_optuna LOGIN PASSWORD '$(cat "$STATE/secrets/optuna_password")';
CREATE DATABASE q2l_optuna OWNER q2l_optuna;
REVOKE CONNECT ON DATABASE mlflow, mlflow_auth FROM PUBLIC;
REVOKE CONNECT ON DATABASE q2l_optuna FROM PUBLIC;
GRANT CONNECT ON DATABASE q2l_optuna TO q2l_optuna;
EOF
log_time "postgres" "$t"

# ---- S3 (moto server, in memory, keys and policies enforced) -------------------------------------------------
# It creates both buckets, one IAM user per role with that role's policy and its key (secrets/s3_<role>_*)
# before it listens; from then on every request needs a valid signature and a policy that allows it.
t=$(now)
start_bg moto "$PY" "$HERE/s3_server.py" --host 127.0.0.1 --port "${PORT[S3]}" --secrets "$STATE/secrets" \
    "mlflow=$IAM/q2l-mlflow-server.json" "ray=$IAM/q2l-ray-node.json"
wait_http "$S3_URL/" moto 120
log_time "s3" "$t"

# ---- MLflow server (PostgreSQL store, S3 artifacts, basic auth) --------------------------------------------
t=$(now)
PG_URI="postgresql+psycopg2://mlflow@127.0.0.1:${PORT[PG]}"
cat >"$STATE/mlflow/auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = $PG_URI/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
MLFLOW_URL="http://127.0.0.1:${PORT[MLFLOW]}"
# libpq reads PGPASSWORD, so the database password is in no URI, file or command line.
(
    cd "$STATE/mlflow"
    export_aws mlflow
    export PGPASSWORD MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
    PGPASSWORD="$(cat "$STATE/secrets/pg_password")"
    MLFLOW_AUTH_ADMIN_PASSWORD="$(cat "$STATE/secrets/mlflow_admin_password")"
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$STATE/secrets/flask_secret_key")"
    export MLFLOW_S3_ENDPOINT_URL="$S3_URL" MLFLOW_AUTH_CONFIG_PATH="$STATE/mlflow/auth.ini"
    # The server's job runner (8 more processes, a folder in /dev/shm) serves GenAI features q2l does not use.
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
    start_bg mlflow "$VENV_BIN/mlflow" server --backend-store-uri "$PG_URI/mlflow" \
        --artifacts-destination "s3://$MLFLOW_BUCKET/mlflow" --host 127.0.0.1 --port "${PORT[MLFLOW]}" \
        --workers 1 --app-name basic-auth
)
wait_http "$MLFLOW_URL/health" mlflow 180
# The project logs as an ordinary user "q2l" (not the admin): created with the admin's credentials.
MLFLOW_URL="$MLFLOW_URL" STATE="$STATE" "$PY" - <<'EOF'
import base64, json, os, urllib.request
from pathlib import Path
sec = Path(os.environ["STATE"]) / "secrets"
admin = base64.b64encode(f"admin:{(sec / 'mlflow_admin_password').read_text().strip()}".encode()).decode()
body = json.dumps({"username": "q2l", "password": (sec / "mlflow_password").read_text().strip()}).encode()
req = urllib.request.Request(f"{os.environ['MLFLOW_URL']}/api/2.0/mlflow/users/create", data=body, method="POST",
                             headers={"Authorization": f"Basic {admin}", "Content-Type": "application/json"})
urllib.request.urlopen(req, timeout=30).read()
EOF
log_time "mlflow" "$t"

# ---- Ray head + second node ---------------------------------------------------------------------------------
t=$(now)
RAY_TMP="$STATE/ray-tmp"
TOKEN="$STATE/secrets/ray_token"
DASH_URL="http://127.0.0.1:${PORT[RAY_DASHBOARD]}"
RAY_STORAGE="s3://$RAY_BUCKET/ray"
# MLflow 3 clients move artifacts through presigned S3 URLs when the server offers them; the local S3 (moto)
# checks header-signed requests only, so here every artifact streams through the MLflow server (on AWS, leave
# these unset: a presigned URL is made by the server, after its permission check, for one object).
MLFLOW_CLIENT_ENV="MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD=false"
# Jobs inherit the nodes' environment: the venv on PATH, the Ray bucket's key and the MLflow user's
# credentials (as Kubernetes Secrets would give them; never the MLflow server's S3 key), token auth on,
# temp files inside the state folder.
export_ray_env() {
    export_aws ray
    export PATH="$VENV_BIN:$PATH" RAY_TMPDIR="$RAY_TMP" TMPDIR="$STATE/tmp"
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" RAY_USAGE_STATS_ENABLED=0
    # Fixed default ports (44217, 44227) would collide with any other Ray head on the machine.
    export AUTOSCALER_METRIC_PORT="${PORT[RAY_AUTOSCALER_METRIC]}" DASHBOARD_METRIC_PORT="${PORT[RAY_DASHBOARD_METRIC]}"
    export MLFLOW_TRACKING_URI="http://127.0.0.1:${PORT[MLFLOW]}" MLFLOW_TRACKING_USERNAME=q2l MLFLOW_TRACKING_PASSWORD
    MLFLOW_TRACKING_PASSWORD="$(cat "$STATE/secrets/mlflow_password")"
    export Q2L_RAY_STORAGE="$RAY_STORAGE" $MLFLOW_CLIENT_ENV
    # the sweeps' Optuna study database (q2l reads tune.storage from Q2L_OPTUNA_STORAGE; libpq the password)
    export Q2L_OPTUNA_STORAGE="postgresql+psycopg2://q2l_optuna@127.0.0.1:${PORT[PG]}/q2l_optuna" PGPASSWORD
    PGPASSWORD="$(cat "$STATE/secrets/optuna_password")"
    # Ray code that connects by itself (e.g. Ray Train's state queries) must find this cluster, not another
    # Ray running on the same machine.
    export RAY_ADDRESS="127.0.0.1:${PORT[RAY]}" RAY_API_SERVER_ADDRESS="$DASH_URL"
    # On SIGTERM a node drains for up to this long (default 30 s) while leftover job actors keep it busy.
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=5
    # Started from the state folder: the jobs' working directory when no --working-dir is given.
    cd "$STATE/tmp"
}
# Each node has a temp folder of its own, as on separate machines: a node's runtime-env agent deletes the
# job packages (a --working-dir upload) it no longer uses, and in a shared folder that would be the one the
# job's driver still runs in on the other node.
COMMON_RAY=(--block --node-ip-address 127.0.0.1 --disable-usage-stats
    --object-store-memory 100000000 --min-worker-port 0 --max-worker-port 0)
(export_ray_env && start_bg ray-head "$VENV_BIN/ray" start --head "${COMMON_RAY[@]}" --temp-dir "$RAY_TMP" \
    --port "${PORT[RAY]}" --dashboard-host 127.0.0.1 --dashboard-port "${PORT[RAY_DASHBOARD]}" \
    --ray-client-server-port "${PORT[RAY_CLIENT]}" --dashboard-agent-listen-port "${PORT[RAY_AGENT]}" \
    --num-cpus "${Q2L_RAY_HEAD_CPUS:-2}" --resources '{"head": 1, "worker_slot": 1}')
wait_http "$DASH_URL/api/version" ray-head 120
(export_ray_env && start_bg ray-node2 "$VENV_BIN/ray" start --address "127.0.0.1:${PORT[RAY]}" \
    "${COMMON_RAY[@]}" --dashboard-agent-listen-port "${PORT[RAY_NODE2_AGENT]}" --temp-dir "$RAY_TMP-node2" \
    --num-cpus "${Q2L_RAY_NODE2_CPUS:-1}" --resources '{"node2": 1, "worker_slot": 1}')
wait_ray_nodes "$DASH_URL" "$TOKEN" 2 120
log_time "ray" "$t"

# ---- env file for clients -------------------------------------------------------------------------------------
cat >"$STATE/stack.env" <<EOF
# Source this file to use the stack started by cluster/local/up.sh (secrets are read from $STATE/secrets).
# It gives a shell what a Ray node has: the Ray token, the MLflow user "q2l" and the Ray bucket's key (a
# "q2l train" run here is a Ray driver writing checkpoints); MLflow's artifacts go through the server.
export Q2L_STACK_DIR="$STATE"
# "ray job submit/list/logs/stop" use the dashboard's jobs API; ray.init() (e.g. "q2l train" run from this
# shell) joins the cluster through the GCS.
export RAY_API_SERVER_ADDRESS="$DASH_URL"
export RAY_ADDRESS="127.0.0.1:${PORT[RAY]}"
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$TOKEN"
export MLFLOW_TRACKING_URI="http://127.0.0.1:${PORT[MLFLOW]}"
export MLFLOW_TRACKING_USERNAME=q2l
export MLFLOW_TRACKING_PASSWORD="\$(cat "$STATE/secrets/mlflow_password")"
export $MLFLOW_CLIENT_ENV
export AWS_ACCESS_KEY_ID="\$(cat "$STATE/secrets/s3_ray_access_key_id")"
export AWS_SECRET_ACCESS_KEY="\$(cat "$STATE/secrets/s3_ray_secret_access_key")"
export AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL_S3="$S3_URL"
export Q2L_RAY_BUCKET="$RAY_BUCKET"
export Q2L_RAY_STORAGE="$RAY_STORAGE"
export Q2L_PG_PORT=${PORT[PG]}
export Q2L_OPTUNA_STORAGE="postgresql+psycopg2://q2l_optuna@127.0.0.1:${PORT[PG]}/q2l_optuna"
export PGPASSWORD="\$(cat "$STATE/secrets/optuna_password")"
EOF
chmod 600 "$STATE/stack.env"
log_time "total" "$T_START"
echo "stack up in $(elapsed "$T_START") s: MLflow $MLFLOW_URL, Ray dashboard $DASH_URL, S3 $S3_URL, PostgreSQL 127.0.0.1:${PORT[PG]}"
echo "source $STATE/stack.env"
