"""The production-shaped stack of ``cluster/local`` on this machine, end to end (slow).

One stack (PostgreSQL, S3 with keys and bucket policies enforced, MLflow with basic auth, a two-node Ray
with token auth) comes up once for the module on free ports in a fresh state folder; the tests use it through
its env file like a user would (q2l only through its command line, run as Ray jobs). The module fixture tears
it down and checks that nothing of it is left (a failure there is reported as an error in the teardown of the
module's last test). Timings are printed (run with ``-s``); none is asserted.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from model_fixtures import tiny_config_dict
from support import HANG_GUARD_S

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
UP = REPO / "cluster" / "local" / "up.sh"
DOWN = REPO / "cluster" / "local" / "down.sh"
RAY = str(Path(sys.executable).with_name("ray"))
PORT_VARS = (
    "Q2L_PG_PORT",
    "Q2L_S3_PORT",
    "Q2L_MLFLOW_PORT",
    "Q2L_RAY_PORT",
    "Q2L_RAY_DASHBOARD_PORT",
    "Q2L_RAY_CLIENT_PORT",
    "Q2L_RAY_AGENT_PORT",
    "Q2L_RAY_NODE2_AGENT_PORT",
    "Q2L_RAY_AUTOSCALER_METRIC_PORT",
    "Q2L_RAY_DASHBOARD_METRIC_PORT",
)
IAM = REPO / "cluster" / "aws" / "iam"
EXPERIMENT = "q2l-cluster-test"
DDP_RUN = "ddp-two-nodes"
# what `ray job submit --working-dir` must leave out of the upload (limit ~100 MiB)
UPLOAD_EXCLUDES = [".git", ".venv", "data", "results", "mlruns", "**/__pycache__", "*.egg-info"]


@dataclass
class Stack:
    """A running stack: its state folder, the environment a user gets from ``source stack.env``, its ports."""

    dir: Path
    env: dict[str, str]
    ports: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)
    down: bool = False

    def secret(self, name: str) -> str:
        return (self.dir / "secrets" / name).read_text().strip()

    def run(
        self, args: list[str], timeout: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=env or self.env, capture_output=True, text=True, timeout=timeout)


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("0.0.0.0", 0))  # Ray binds some ports on every interface: free there too
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sourced(env_file: Path, base: dict[str, str]) -> dict[str, str]:
    """``base`` plus what ``source env_file`` exports (the file reads its secrets with ``$(cat …)``)."""
    out = subprocess.run(
        ["bash", "-c", 'set -a; source "$1"; env -0', "_", str(env_file)],
        env=base,
        capture_output=True,
        check=True,
        timeout=HANG_GUARD_S,
    )
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)


def _listening(port: int) -> list[str]:
    """Local addresses listening on TCP ``port``."""
    out = subprocess.run(
        ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=HANG_GUARD_S
    )
    return [line.split()[3] for line in out.stdout.splitlines() if line.strip()]


def _stack_pids(state: Path) -> list[int]:
    """Processes carrying this stack's marker in their environment."""
    marker = f"Q2L_STACK_MEMBER={state}".encode()
    pids = []
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in env_file.read_bytes().split(b"\0"):
                pids.append(int(env_file.parent.name))
        except OSError:
            continue
    return pids


def _http(
    url: str, *, auth: tuple[str, str] | None = None, bearer: str | None = None, data=None, method=None
):
    """(status, body) of one HTTP request; errors are statuses, not exceptions."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def stack():
    """The stack, up once for the module on free ports in a fresh state folder; always torn down, and then
    checked: down.sh leaves no process of the stack and no listening port, and a second down.sh is a no-op."""
    state = Path(tempfile.mkdtemp(prefix="q2l-stack-", dir="/tmp"))
    state.chmod(0o755)  # PostgreSQL runs as the postgres user and must reach its folder inside
    ports = dict(zip(PORT_VARS, _free_ports(len(PORT_VARS)), strict=True))
    base = {**os.environ, "Q2L_STACK_DIR": str(state), **{k: str(v) for k, v in ports.items()}}
    t0 = time.perf_counter()
    out = subprocess.run([str(UP)], env=base, capture_output=True, text=True, timeout=900)
    up_s = time.perf_counter() - t0
    s = None
    try:
        assert out.returncode == 0, f"up.sh failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        assert f"source {state}/stack.env" in out.stdout
        s = Stack(dir=state, env=_sourced(state / "stack.env", base), ports=ports)
        s.timings["up_s"] = up_s
        print(f"\nup.sh: {up_s:.1f} s; steps: {(state / 'timings').read_text().split()}")
        yield s
    finally:
        t0 = time.perf_counter()
        down = subprocess.run([str(DOWN)], env=base, capture_output=True, text=True, timeout=300)
        down_s = time.perf_counter() - t0
        left = _stack_pids(state)
        listening = {var: _listening(port) for var, port in ports.items()}
        again = subprocess.run([str(DOWN)], env=base, capture_output=True, text=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
    # reached only when the stack came up and the tests ran
    print(f"\ndown.sh: {down_s:.1f} s; all timings: {s.timings}")
    assert down.returncode == 0 and "stack down" in down.stdout, down.stdout + down.stderr
    assert left == [], f"processes of the stack left after down.sh: {left}"
    assert not any(listening.values()), f"ports still listening after down.sh: {listening}"
    assert again.returncode == 0 and "not running" in again.stdout, again.stdout + again.stderr


def test_servers_listen_on_loopback_only(stack):
    for var in ("Q2L_PG_PORT", "Q2L_S3_PORT", "Q2L_MLFLOW_PORT", "Q2L_RAY_DASHBOARD_PORT"):
        addrs = _listening(stack.ports[var])
        assert addrs, f"nothing listens on {var}={stack.ports[var]}"
        assert all(a.startswith("127.0.0.1:") for a in addrs), f"{var}: {addrs}"


def test_up_again_reuses_the_running_stack(stack):
    ports_before = (stack.dir / "ports.env").read_text()
    pids_before = {p.name: p.read_text() for p in (stack.dir / "pids").iterdir()}
    # the timeout only guards against a hang: a reused stack answers as soon as it has checked its processes
    out = stack.run([str(UP)], timeout=300)
    assert out.returncode == 0, out.stderr
    assert "already up" in out.stdout
    assert (stack.dir / "ports.env").read_text() == ports_before
    assert {p.name: p.read_text() for p in (stack.dir / "pids").iterdir()} == pids_before


def test_secrets_are_private_and_never_on_a_command_line(stack):
    secrets = stack.dir / "secrets"
    assert secrets.stat().st_mode & 0o777 == 0o700
    assert (stack.dir / "stack.env").stat().st_mode & 0o777 == 0o600
    values = []
    for f in secrets.iterdir():
        assert f.stat().st_mode & 0o777 == 0o600, f
        values.append(f.read_text().strip())
    assert len(values) >= 6
    pids = _stack_pids(stack.dir)
    assert len(pids) >= 10, "the stack's processes must carry its marker"
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert not any(v in cmdline for v in values), f"a secret is on the command line of pid {pid}"


def test_mlflow_refuses_unauthenticated_requests(stack):
    url = stack.env["MLFLOW_TRACKING_URI"]
    user = (stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _http(f"{url}/health")[0] == 200
    assert _http(search)[0] == 401
    assert _http(search, auth=(user[0], "wrong-password"))[0] == 401
    assert _http(search, auth=user)[0] == 200
    assert _http(f"{url}/api/2.0/mlflow-artifacts/artifacts?path=mlflow")[0] == 401
    # the project's user is not an admin: it cannot create users
    status, _ = _http(
        f"{url}/api/2.0/mlflow/users/create",
        auth=user,
        data={"username": "x", "password": "y"},
        method="POST",
    )
    assert status == 403


def test_ray_refuses_requests_without_the_token(stack, tmp_path):
    jobs = f"{stack.env['RAY_API_SERVER_ADDRESS']}/api/jobs/"
    assert _http(jobs)[0] == 401
    assert _http(jobs, bearer="not-the-token")[0] == 403
    assert _http(jobs, bearer=stack.secret("ray_token"))[0] == 200
    # the CLI without the token (and no ~/.ray/auth_token in a fresh HOME) is refused, with it accepted
    bare = {k: v for k, v in stack.env.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    out = stack.run([RAY, "job", "list"], timeout=120, env=bare)
    assert out.returncode != 0 and "Authentication" in out.stdout + out.stderr
    out = stack.run([RAY, "job", "list"], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def _pg(stack, sql: str, *args, role: str = "mlflow") -> list[tuple]:
    """``sql`` as MLflow's role in its database, or (``role="q2l_optuna"``) in the sweeps' study database."""
    import psycopg2

    secret = {"mlflow": "pg_password", "q2l_optuna": "optuna_password"}[role]
    conn = psycopg2.connect(
        host="127.0.0.1",
        port=stack.ports["Q2L_PG_PORT"],
        user=role,
        password=stack.secret(secret),
        dbname=role,
    )
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def _bucket(role: str) -> str:
    """The bucket a role's policy (cluster/aws/iam, applied by the local S3) gives it."""
    policy = json.loads((IAM / f"q2l-{role}.json").read_text())
    return policy["Statement"][0]["Resource"].split(":::")[1]


MLFLOW_BUCKET, RAY_BUCKET = _bucket("mlflow-server"), _bucket("ray-node")


def _s3(stack, role: str | None = None, secret: str | None = None):
    """An S3 client with the key of ``role`` (``mlflow`` or ``ray``); by default the one of ``stack.env``."""
    import boto3

    key_id = stack.secret(f"s3_{role}_access_key_id") if role else stack.env["AWS_ACCESS_KEY_ID"]
    secret = secret or (
        stack.secret(f"s3_{role}_secret_access_key") if role else stack.env["AWS_SECRET_ACCESS_KEY"]
    )
    return boto3.client(
        "s3",
        endpoint_url=stack.env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        region_name=stack.env["AWS_DEFAULT_REGION"],
    )


def _s3_error(call) -> str:
    """The S3 error code ``call()`` fails with ("" when it succeeds)."""
    from botocore.exceptions import ClientError

    try:
        call()
    except ClientError as e:
        return e.response["Error"]["Code"]
    return ""


def _s3_keys(stack, bucket: str, prefix: str) -> list[str]:
    """Keys under ``prefix``, listed with the key of the role that owns ``bucket`` (as an operator would)."""
    s3 = _s3(stack, "mlflow" if bucket == MLFLOW_BUCKET else "ray")
    keys, token = [], None
    while True:
        kw = {
            "Bucket": bucket,
            "Prefix": prefix,
            **({"ContinuationToken": token} if token else {}),
        }
        page = s3.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            return keys


def test_mlflow_run_is_stored_in_postgres_and_its_artifact_in_s3(stack):
    # an ordinary MLflow client with credentials from the environment only
    script = (
        "import mlflow\n"
        "mlflow.set_experiment('q2l-cluster-smoke')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_metric('m', 0.5, step=1)\n"
        "    mlflow.log_text('hello', 'notes/hello.txt')\n"
        "print('RUN', run.info.run_id)\n"
    )
    out = stack.run([sys.executable, "-c", script], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run_id = out.stdout.split("RUN ")[1].split()[0]
    assert _pg(stack, "SELECT status FROM runs WHERE run_uuid = %s", run_id) == [("FINISHED",)]
    assert _pg(stack, "SELECT value FROM metrics WHERE run_uuid = %s AND key = 'm'", run_id) == [(0.5,)]
    keys = _s3_keys(stack, MLFLOW_BUCKET, "mlflow/")
    assert any(k.endswith(f"{run_id}/artifacts/notes/hello.txt") for k in keys), keys


# ------------------------------------------------------------------------- least privilege in S3 and MLflow
def test_s3_enforces_each_keys_bucket(stack):
    assert stack.env["Q2L_RAY_STORAGE"] == f"s3://{RAY_BUCKET}/ray" and MLFLOW_BUCKET != RAY_BUCKET
    assert stack.env["AWS_ACCESS_KEY_ID"] == stack.secret("s3_ray_access_key_id")
    ray = _s3(stack)  # the key a Ray node and the user's shell have
    key = f"ray/probe-{uuid.uuid4().hex[:8]}"
    assert _s3_error(lambda: ray.put_object(Bucket=RAY_BUCKET, Key=key, Body=b"ray")) == ""
    assert ray.get_object(Bucket=RAY_BUCKET, Key=key)["Body"].read() == b"ray"
    # Ray's key cannot touch MLflow's artifacts (registered models, the code `mlflow models serve` runs)
    evil = "mlflow/1/some-run/artifacts/model/pyfunc_model.py"
    assert _s3_error(lambda: ray.put_object(Bucket=MLFLOW_BUCKET, Key=evil, Body=b"x")) == "AccessDenied"
    assert _s3_error(lambda: ray.list_objects_v2(Bucket=MLFLOW_BUCKET)) == "AccessDenied"
    assert _s3_error(lambda: ray.delete_bucket(Bucket=MLFLOW_BUCKET)) == "AccessDenied"
    assert _s3_error(lambda: ray.create_bucket(Bucket="q2l-other")) == "AccessDenied"
    # and MLflow's key stays out of Ray's bucket
    mlflow_key = _s3(stack, "mlflow")
    assert _s3_error(lambda: mlflow_key.put_object(Bucket=RAY_BUCKET, Key=key, Body=b"x")) == "AccessDenied"
    assert _s3_error(lambda: mlflow_key.put_object(Bucket=MLFLOW_BUCKET, Key="mlflow/probe", Body=b"x")) == ""
    # a wrong secret, an unsigned request and moto's control API (which could switch checks off) are refused
    wrong = _s3(stack, "ray", secret="0" * 40)
    assert _s3_error(lambda: wrong.get_object(Bucket=RAY_BUCKET, Key=key)) == "SignatureDoesNotMatch"
    url = stack.env["AWS_ENDPOINT_URL_S3"]
    assert _http(f"{url}/{RAY_BUCKET}/{key}")[0] == 403
    assert _http(f"{url}/{RAY_BUCKET}/{key}-anon", data={}, method="PUT")[0] == 403
    for path in ("/moto-api/reset-auth", "//moto-api/reset", "/moto-api/data.json"):
        assert _http(f"{url}{path}", data=0, method="POST")[0] == 403, path
    assert _s3_error(lambda: ray.put_object(Bucket=MLFLOW_BUCKET, Key=evil, Body=b"x")) == "AccessDenied"


def _environ(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_each_s3_key_reaches_only_its_role(stack):
    mlflow_secret = stack.secret("s3_mlflow_secret_access_key")
    ray_secret = stack.secret("s3_ray_secret_access_key")
    mlflow_group = int((stack.dir / "pids" / "mlflow.pid").read_text())
    holders = {"mlflow": set(), "ray": set()}
    for pid in _stack_pids(stack.dir):
        env = _environ(pid)
        for role, secret in (("mlflow", mlflow_secret), ("ray", ray_secret)):
            if secret in env:
                holders[role].add(pid)
    assert holders["mlflow"], "the MLflow server must hold its S3 key"
    for pid in holders["mlflow"]:
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            continue
        assert group == mlflow_group, f"pid {pid} outside the MLflow server holds the MLflow bucket's key"
    assert holders["ray"], "the Ray nodes must hold the Ray bucket's key"
    assert not holders["mlflow"] & holders["ray"]
    assert mlflow_secret not in "\0".join(f"{k}={v}" for k, v in stack.env.items()), (
        "stack.env has MLflow's key"
    )


def _mlflow_as(stack, user: tuple[str, str], script: str, *args: str) -> str:
    """Run an MLflow client script (with ``args``) as ``user`` against the stack; its stdout."""
    env = {**stack.env, "MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]}
    out = stack.run([sys.executable, "-c", script, *args], timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_mlflow_read_only_user_cannot_register_write_or_move_aliases(stack):
    url = stack.env["MLFLOW_TRACKING_URI"]
    q2l = (stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])
    admin = ("admin", stack.secret("mlflow_admin_password"))
    reader = ("reader", uuid.uuid4().hex)
    model = "q2l-cluster-auth"
    # the project's user logs a run and registers it as @challenger (artifacts through the server's proxy)
    made = _mlflow_as(
        stack,
        q2l,
        "import mlflow\n"
        "c = mlflow.MlflowClient()\n"
        "mlflow.set_experiment('q2l-cluster-auth')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_text('weights', 'model/weights.txt')\n"
        f"c.create_registered_model('{model}')\n"
        f"mv = c.create_model_version('{model}', run.info.artifact_uri + '/model', run_id=run.info.run_id)\n"
        f"c.set_registered_model_alias('{model}', 'challenger', mv.version)\n"
        "print('MADE', run.info.experiment_id, run.info.run_id, run.info.artifact_uri)\n",
    )
    exp_id, run_id, artifact_uri = made.split("MADE ")[1].split()
    # the admin adds a user with READ on that experiment and that registered model, and nothing else
    _mlflow_as(
        stack,
        admin,
        "import os, sys\n"
        "from mlflow.server import get_app_client\n"
        "auth = get_app_client('basic-auth', tracking_uri=os.environ['MLFLOW_TRACKING_URI'])\n"
        "auth.create_user(sys.argv[1], sys.argv[2])\n"
        "auth.grant_user_permission(sys.argv[1], 'experiment', sys.argv[3], 'READ')\n"
        "auth.grant_user_permission(sys.argv[1], 'registered_model', sys.argv[4], 'READ')\n",
        *reader,
        exp_id,
        model,
    )
    api = f"{url}/api/2.0/mlflow"
    assert _http(f"{api}/registered-models/get?name={model}", auth=reader)[0] == 200
    source = f"{artifact_uri}/model"
    new_version = {"name": model, "source": source, "run_id": run_id}
    assert _http(f"{api}/model-versions/create", auth=reader, data=new_version, method="POST")[0] == 403
    move = {"name": model, "alias": "champion", "version": "1"}
    assert _http(f"{api}/registered-models/alias", auth=reader, data=move, method="POST")[0] == 403
    drop = {"name": model, "alias": "challenger"}
    assert _http(f"{api}/registered-models/alias", auth=reader, data=drop, method="DELETE")[0] == 403
    # nor can it rewrite the version's files through the artifact proxy; without credentials: 401
    file = f"{url}/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/model/weights.txt"
    assert _http(file, auth=reader)[0] == 200
    assert _http(file, auth=reader, data="evil", method="PUT")[0] == 403
    assert _http(file, data="evil", method="PUT")[0] == 401
    assert _http(file, auth=reader)[1] == b"weights"
    # the registry is as the project's user left it
    status, body = _http(f"{api}/registered-models/get?name={model}", auth=q2l)
    assert status == 200
    assert json.loads(body)["registered_model"].get("aliases") == [{"alias": "challenger", "version": "1"}]


# ------------------------------------------------------------------------------------------ jobs on the stack
def _submit(
    stack, entrypoint: list[str], timeout: float, working_dir: Path | None = None
) -> tuple[str, str, float]:
    """``ray job submit``, waiting for the end: (submission id, output, seconds); fails on a failed job."""
    sid = f"q2l-test-{uuid.uuid4().hex[:8]}"
    cmd = [RAY, "job", "submit", "--submission-id", sid]
    if working_dir is not None:
        cmd += [
            "--working-dir",
            str(working_dir),
            "--runtime-env-json",
            json.dumps({"excludes": UPLOAD_EXCLUDES}),
        ]
    t0 = time.perf_counter()
    out = stack.run([*cmd, "--", *entrypoint], timeout=timeout)
    seconds = time.perf_counter() - t0
    text = out.stdout + out.stderr
    assert out.returncode == 0 and f"Job '{sid}' succeeded" in text, text[-6000:]
    return sid, text, seconds


def _ray_api(stack, path: str):
    status, body = _http(f"{stack.env['RAY_API_SERVER_ADDRESS']}{path}", bearer=stack.secret("ray_token"))
    assert status == 200, body[:500]
    return json.loads(body)


def _mlflow_api(stack, path: str, data=None):
    user = (stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])
    url = f"{stack.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/{path}"
    status, body = _http(url, auth=user, data=data, method="POST" if data is not None else "GET")
    assert status == 200, body[:500]
    return json.loads(body)


def _runs(stack, experiment: str, filter_string: str = "") -> list[dict]:
    exp = _mlflow_api(stack, f"experiments/get-by-name?experiment_name={urllib.parse.quote(experiment)}")
    body = {
        "experiment_ids": [exp["experiment"]["experiment_id"]],
        "filter": filter_string,
        "max_results": 1000,
    }
    return _mlflow_api(stack, "runs/search", body).get("runs", [])


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _tiny_config(stack, data_root: Path, path: Path) -> Path:
    """A tiny two-worker training config recording to the stack (one worker per node via worker_slot)."""
    raw = tiny_config_dict(
        data_root,
        ray={
            "num_workers": 2,
            "cpus_per_worker": 1.0,
            "resources_per_worker": {"worker_slot": 1.0},
            "storage_path": stack.env["Q2L_RAY_STORAGE"],
            "run_name": DDP_RUN,
            "max_failures": 0,
        },
        mlflow={
            "tracking_uri": stack.env["MLFLOW_TRACKING_URI"],
            "experiment": EXPERIMENT,
            "log_model": False,
            "results_dir": str(path.parent / "results"),
        },
    )
    path.write_text(yaml.safe_dump(raw))
    return path


def _train_workers_and_nodes(stack, job_id: str) -> tuple[list[dict], set[str]]:
    """The Ray Train worker actors of job ``job_id`` (Ray's state API) and the ids of the alive nodes."""
    query = "detail=1&limit=1000&filter_keys=class_name&filter_predicates=%3D&filter_values=RayTrainWorker"
    actors = [
        a
        for a in _ray_api(stack, f"/api/v0/actors?{query}")["data"]["result"]["result"]
        if a["job_id"] == job_id
    ]
    nodes = _ray_api(stack, "/api/v0/nodes?limit=100")["data"]["result"]["result"]
    return actors, {n["node_id"] for n in nodes if n["state"] == "ALIVE"}


def test_two_worker_ddp_run_spans_both_nodes_with_checkpoints_in_s3(stack, tiny_demo_root, tmp_path):
    config = _tiny_config(stack, tiny_demo_root, tmp_path / "ddp.yaml")
    sid, text, seconds = _submit(stack, ["q2l", "train", "--config", str(config)], timeout=900)
    stack.timings["ddp_job_s"] = seconds
    print(f"\n2-node DDP job: {seconds:.1f} s (submit -> SUCCEEDED)")
    assert "[q2l] done:" in text

    # the two training workers ran on the two different nodes of the stack
    actors, alive = _train_workers_and_nodes(stack, _ray_api(stack, f"/api/jobs/{sid}")["job_id"])
    assert len(actors) == 2 and len(alive) == 2
    assert {a["node_id"] for a in actors} == alive, "the two workers must run on the two different nodes"

    # one MLflow run (in PostgreSQL), two epochs logged, the test mAP at the end
    runs = _runs(stack, EXPERIMENT, f"tags.`q2l.ray_run_name` = '{DDP_RUN}'")
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED" and _tags(run)["q2l.num_workers"] == "2"
    history = _mlflow_api(stack, f"metrics/get-history?run_id={run['info']['run_id']}&metric_key=holdout_map")
    assert sorted(m["step"] for m in history["metrics"]) == [1, 2]
    assert _pg(stack, "SELECT status FROM runs WHERE run_uuid = %s", run["info"]["run_id"]) == [("FINISHED",)]
    # its artifacts went through the server into the bucket, the checkpoints straight into it
    run_id = run["info"]["run_id"]
    assert any(f"/{run_id}/artifacts/" in k for k in _s3_keys(stack, MLFLOW_BUCKET, "mlflow/"))
    checkpoints = _s3_keys(stack, RAY_BUCKET, f"ray/{DDP_RUN}/checkpoint_")
    assert {k.rsplit("/", 1)[1] for k in checkpoints} >= {"engine.pt", "best.pt", "meta.json"}

    # submitting the same command again restores from the S3 checkpoint: already complete, same MLflow run
    _, text, seconds = _submit(stack, ["q2l", "train", "--config", str(config)], timeout=600)
    stack.timings["resume_job_s"] = seconds
    print(f"resubmitted (restored from S3): {seconds:.1f} s")
    assert f"is already complete (MLflow run {run_id})" in text
    assert len(_runs(stack, EXPERIMENT, f"tags.`q2l.ray_run_name` = '{DDP_RUN}'")) == 1


SWEEP = "cluster-demo-sweep"
SWEEP_EXPERIMENT = "q2l-cluster-sweep"
SWEEP_MODEL = "q2l-cluster-sweep"


@pytest.fixture(scope="module")
def sweep(stack, tiny_demo_root):
    """The demo sweep (its search space as written) as a Ray job, shrunk to two small one-worker trials on the
    tiny set and uploaded with --working-dir like experiments/jobs/submit_sweep.sh does. Each trial's worker
    takes a node's one ``worker_slot``, so both trials fit at once, one per node. Returns (job id, output)."""
    entry = ["q2l", "tune", "--config", "experiments/sweeps/demo.yaml"]
    for key, value in {
        "data.root": str(tiny_demo_root),
        "data.image_size": 32,
        "data.num_workers": 0,
        "model.backbone": "resnet18",
        "model.pretrained": False,
        "model.dec_layers": 1,
        "model.dim_feedforward": 64,
        "train.epochs": 2,
        "train.batch_size": 8,
        "ray.num_workers": 1,
        "ray.cpus_per_worker": 1,
        "ray.resources_per_worker": "{worker_slot: 1}",
        "ray.storage_path": stack.env["Q2L_RAY_STORAGE"],
        "mlflow.tracking_uri": stack.env["MLFLOW_TRACKING_URI"],
        "mlflow.experiment": SWEEP_EXPERIMENT,
        "mlflow.registered_model": SWEEP_MODEL,
        "tune.name": SWEEP,
        "tune.num_samples": 2,
        "tune.max_concurrent_trials": 2,
    }.items():
        entry += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    sid, text, seconds = _submit(stack, entry, timeout=1800, working_dir=REPO)
    stack.timings["sweep_job_s"] = seconds
    print(f"\ndemo sweep job, 2 trials at once: {seconds:.1f} s (submit with --working-dir -> SUCCEEDED)")
    return _ray_api(stack, f"/api/jobs/{sid}")["job_id"], text


def test_demo_sweep_job_runs_end_to_end(stack, sweep):
    # the sweep's parent run and its two trials, in PostgreSQL-backed MLflow
    runs = _runs(stack, SWEEP_EXPERIMENT)
    parents = [r for r in runs if "mlflow.parentRunId" not in _tags(r)]
    assert len(parents) == 1, [_tags(r) for r in runs]
    parent_id = parents[0]["info"]["run_id"]
    children = [r for r in runs if _tags(r).get("mlflow.parentRunId") == parent_id]
    assert len(children) == 2
    run_ids = tuple(r["info"]["run_id"] for r in runs)
    assert len(_pg(stack, "SELECT run_uuid FROM runs WHERE run_uuid IN %s", run_ids)) == 3
    # the best trial's model registered as @challenger (registry in PostgreSQL, its files in MLflow's bucket)
    alias = _mlflow_api(stack, f"registered-models/alias?name={SWEEP_MODEL}&alias=challenger")[
        "model_version"
    ]
    assert alias["run_id"] in {r["info"]["run_id"] for r in children}
    aliases = _pg(stack, "SELECT alias FROM registered_model_aliases WHERE name = %s", SWEEP_MODEL)
    assert aliases == [("challenger",)]
    assert any(f"/{alias['run_id']}/" in k for k in _s3_keys(stack, MLFLOW_BUCKET, "mlflow/"))
    # Tune's state, the sweep's state file and every trial's checkpoints in Ray's bucket
    keys = _s3_keys(stack, RAY_BUCKET, f"ray/{SWEEP}/")
    assert f"ray/{SWEEP}/q2l_sweep.json" in keys
    assert any(k.startswith(f"ray/{SWEEP}/experiment_state") for k in keys), keys[:20]
    trials = {k.split("/")[3] for k in keys if k.startswith(f"ray/{SWEEP}/trials/") and "/checkpoint_" in k}
    assert len(trials) == 2, keys[:40]
    # the Optuna study, named after the sweep, in its own PostgreSQL database (the nodes' Q2L_OPTUNA_STORAGE)
    studies = _pg(stack, "SELECT study_id FROM studies WHERE study_name = %s", SWEEP, role="q2l_optuna")
    assert len(studies) == 1
    states = _pg(stack, "SELECT state FROM trials WHERE study_id = %s", studies[0][0], role="q2l_optuna")
    assert len(states) == 2 and {s for (s,) in states} <= {"COMPLETE", "PRUNED"}, states
    # that role reaches its own database only
    import psycopg2

    with pytest.raises(psycopg2.OperationalError, match="permission denied"):
        psycopg2.connect(
            host="127.0.0.1",
            port=stack.ports["Q2L_PG_PORT"],
            user="q2l_optuna",
            password=stack.secret("optuna_password"),
            dbname="mlflow",
        )


def test_two_sweep_trials_run_at_once_on_the_two_nodes(stack, sweep):
    job_id, text = sweep
    assert "up to 2 at once" in text, text[-3000:]
    # each trial's training worker is a RayTrainWorker actor of the job: one on each node
    actors, alive = _train_workers_and_nodes(stack, job_id)
    assert len(actors) == 2 and len(alive) == 2, actors
    assert {a["node_id"] for a in actors} == alive, "the two trials' workers must run on the two nodes"
    # and the two trials' MLflow runs were open at the same time
    runs = [r for r in _runs(stack, SWEEP_EXPERIMENT) if "mlflow.parentRunId" in _tags(r)]
    assert len(runs) == 2
    starts = [int(r["info"]["start_time"]) for r in runs]
    ends = [int(r["info"]["end_time"]) for r in runs]
    assert max(starts) < min(ends), f"the trials ran one after the other: starts {starts}, ends {ends}"
