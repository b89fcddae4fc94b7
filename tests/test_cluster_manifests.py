"""Static checks of the cluster deployment files (fast, offline).

Kubernetes core objects are validated against the schemas bundled with ``kubernetes-validate`` (strict: no
unknown fields); the KubeRay objects' required fields are checked here, and their pod templates are validated
as core ``PodTemplate`` objects. The Ray cluster launcher YAML is validated the way ``ray up`` does it:
defaults filled in, then Ray's own ``ray-schema.json``. Secrets must be referenced, never written down.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from support import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
K8S = CLUSTER / "k8s"
K8S_VERSION = "1.30"  # the oldest Kubernetes we document; every object must validate against it
IMAGE = "registry.example.com/q2l:0.1.0"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)


def _manifest_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def _docs() -> list[tuple[Path, dict]]:
    out = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def _by_kind(kind: str) -> list[dict]:
    return [d for _, d in _docs() if d["kind"] == kind]


def _walk(node, key: str):
    """Every value stored under ``key`` anywhere in a nested structure."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _pod_specs(doc: dict) -> list[dict]:
    """The pod specs inside a workload, RayCluster or RayJob."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [spec["template"]["spec"]]
    if kind == "RayCluster":
        return [spec["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in spec["workerGroupSpecs"]
        ]
    if kind == "RayJob":
        specs = [spec["submitterPodTemplate"]["spec"]] if "submitterPodTemplate" in spec else []
        if "rayClusterSpec" in spec:
            specs += _pod_specs({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})
        return specs
    return []


def test_manifests_exist_and_name_their_namespace():
    names = {p.relative_to(K8S).as_posix() for p in _manifest_files()}
    assert {"base/30-mlflow.yaml", "base/50-raycluster.yaml", "jobs/demo-sweep.yaml"} <= names
    for path, doc in _docs():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "q2l", (
                f"{path}: {doc['kind']} {doc['metadata']['name']}"
            )


def test_core_objects_validate_against_kubernetes_schemas():
    import kubernetes_validate

    checked = set()
    for path, doc in _docs():
        if doc["apiVersion"].startswith("ray.io/"):
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")
        checked.add(doc["kind"])
    assert {
        "Namespace",
        "ConfigMap",
        "Service",
        "StatefulSet",
        "Deployment",
        "Job",
        "NetworkPolicy",
    } <= checked


def test_kubernetes_validation_rejects_a_broken_object():
    # the validator in use really checks: a Deployment without a selector and with an unknown field fails
    import kubernetes_validate

    (mlflow,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "q2l-mlflow"]
    broken = yaml.safe_load(yaml.safe_dump(mlflow))
    del broken["spec"]["selector"]
    broken["spec"]["template"]["spec"]["containers"][0]["imagePolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def _check_group(group: dict, where: str) -> None:
    assert isinstance(group["rayStartParams"], dict), f"{where}: rayStartParams must be a mapping"
    for k, v in group["rayStartParams"].items():
        assert isinstance(v, str), f"{where}: rayStartParams.{k} must be a string (KubeRay), got {v!r}"
    containers = group["template"]["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion must match the tested Ray"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling must be on"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: Ray token auth must be on"
    _check_group(spec["headGroupSpec"], f"{where}.headGroupSpec")
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    for g in groups:
        w = f"{where}.workerGroupSpecs[{g.get('groupName')}]"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", g["groupName"]), w
        _check_group(g, w)
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], w
    gpu = [
        g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu, f"{where}: no GPU worker group"
    assert all(g["maxReplicas"] > g["minReplicas"] for g in gpu), f"{where}: the GPU group cannot scale"


def test_raycluster_has_required_fields_and_autoscaling_gpu_workers():
    (rc,) = _by_kind("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(rc["spec"], "RayCluster q2l")
    # The head must not run training: it has no GPU, so GPU-using training workers cannot land there.
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})


def test_rayjob_runs_the_demo_sweep_on_the_cluster():
    (job,) = _by_kind("RayJob")
    (rc,) = _by_kind("RayCluster")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["q2l", "tune"]
    config = Path(entry[entry.index("--config") + 1])
    # the config path is inside the image, where the Dockerfile copies experiments/ to /home/ray/q2l
    assert config.is_relative_to("/home/ray/q2l")
    assert (REPO / config.relative_to("/home/ray/q2l")).is_file(), f"{config} is not in the repository"
    # KubeRay pastes the entrypoint into a shell command line: nothing the submitter's shell would interpret
    assert not re.search(r"[;&|$`<>]", spec["entrypoint"]), spec["entrypoint"]
    sets = dict(entry[i + 1].split("=", 1) for i, tok in enumerate(entry) if tok == "--set")
    (config_map,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "q2l-config"]
    assert sets["mlflow.tracking_uri"] == config_map["data"]["MLFLOW_TRACKING_URI"]
    assert sets["ray.storage_path"] == config_map["data"]["Q2L_RAY_STORAGE"]
    assert sets["ray.use_gpu"] == "true"
    env = {e["name"]: e for e in spec["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == rc["spec"]["authOptions"]["secretName"] and ref["key"] == "auth_token"


def test_ray_pod_templates_validate_as_core_pod_templates():
    import kubernetes_validate

    for path, doc in _docs():
        if not doc["apiVersion"].startswith("ray.io/"):
            continue
        for i, pod in enumerate(_pod_specs(doc)):
            template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"t{i}"},
                "template": {"spec": pod},
            }
            try:
                kubernetes_validate.validate(template, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{path}: {doc['kind']} pod template {i}: {e.message} at {list(e.path)}")


def test_no_secret_is_written_in_any_manifest():
    for path, doc in _docs():
        assert doc["kind"] != "Secret", f"{path}: Secrets are created by hand (README), never committed"
        for env_list in _walk(doc, "env"):
            for e in env_list:
                if SECRET_NAME.search(e["name"]):
                    assert "value" not in e, f"{path}: {e['name']} is written inline; use secretKeyRef"
                    assert "secretKeyRef" in e["valueFrom"], f"{path}: {e['name']} must come from a Secret"
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            assert not re.search(
                r"(?i)(password|secret_key|auth_token)\s*[:=]\s*['\"]?[A-Za-z0-9+/_-]{12,}", path.read_text()
            ), path


def test_every_referenced_secret_key_is_created_by_the_readme():
    # shell commands of the README with their continuation lines joined
    commands = (CLUSTER / "README.md").read_text().replace("\\\n", " ").splitlines()
    created = set()
    for cmd in commands:
        m = re.search(r"kubectl -n q2l create secret generic ([\w-]+)", cmd)
        if m:
            created |= {(m.group(1), k) for k in re.findall(r"--from-literal=([\w-]+)=", cmd)}
    refs = {(r["name"], r["key"]) for _, doc in _docs() for r in _walk(doc, "secretKeyRef")}
    (rc,) = _by_kind("RayCluster")
    refs.add((rc["spec"]["authOptions"]["secretName"], "auth_token"))
    assert refs, "no secret references found"
    assert refs <= created, f"referenced but not created in cluster/README.md: {sorted(refs - created)}"


def test_references_between_objects_resolve():
    config_maps = {d["metadata"]["name"]: d for d in _by_kind("ConfigMap")}
    claims = {d["metadata"]["name"] for d in _by_kind("PersistentVolumeClaim")}
    for path, doc in _docs():
        for ref in _walk(doc, "configMapKeyRef"):
            assert ref["key"] in config_maps[ref["name"]]["data"], f"{path}: {ref}"
        for pod in _pod_specs(doc):
            for vol in pod.get("volumes", []):
                if "configMap" in vol:
                    assert vol["configMap"]["name"] in config_maps, f"{path}: {vol}"
                if "persistentVolumeClaim" in vol:
                    assert vol["persistentVolumeClaim"]["claimName"] in claims, f"{path}: {vol}"
    # every Service selects the pods of some workload, and its target port is a named container port
    workloads = [d for d in _docs() if d[1]["kind"] in ("Deployment", "StatefulSet")]
    for svc in _by_kind("Service"):
        sel = svc["spec"]["selector"]
        matches = [
            d for _, d in workloads if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matches, f"Service {svc['metadata']['name']} selects no pods"
        ports = {p["name"] for c in matches[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert all(p["targetPort"] in ports for p in svc["spec"]["ports"]), svc["metadata"]["name"]


def test_images_match_the_dockerfile_and_the_tested_ray():
    import ray

    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-", dockerfile, re.MULTILINE)
    for path, doc in _docs():
        for image in _walk(doc, "image"):
            assert image == IMAGE or image.startswith("postgres:"), f"{path}: unexpected image {image}"


def test_mlflow_server_is_authenticated_and_uses_postgres_and_s3():
    (dep,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "q2l-mlflow"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert "--app-name=basic-auth" in args
    assert any(a.startswith("--backend-store-uri=postgresql+psycopg2://") for a in args)
    env = {e["name"] for e in c["env"]}
    assert {
        "MLFLOW_AUTH_CONFIG_PATH",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "PGPASSWORD",
    } <= env
    (cm,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "q2l-config"]
    assert cm["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    (svc,) = [d for d in _by_kind("Service") if d["metadata"]["name"] == "q2l-mlflow"]
    assert svc["spec"]["type"] == "ClusterIP"


# ------------------------------------------------------------------------------------- least privilege
def _bucket_of(uri: str) -> str:
    assert uri.startswith("s3://"), uri
    return uri[len("s3://") :].split("/", 1)[0]


def _policy_buckets(name: str) -> set[str]:
    """The buckets an IAM policy of cluster/aws/iam grants anything on."""
    import json

    doc = json.loads((CLUSTER / "aws" / "iam" / name).read_text())
    out = set()
    for st in doc["Statement"]:
        assert st["Effect"] == "Allow" and "*" not in str(st["Action"]), f"{name}: {st}"
        for arn in [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]:
            m = re.fullmatch(r"arn:aws:s3:::([a-z0-9.-]+)(/\*)?", arn)
            assert m, f"{name}: {arn} is not a bucket or its objects"
            out.add(m.group(1))
    return out


def _s3_secrets(pod: dict) -> set[str]:
    """Secrets a pod's containers take AWS keys from."""
    return {
        e["valueFrom"]["secretKeyRef"]["name"]
        for c in pod["containers"]
        for e in c.get("env", [])
        if e["name"].startswith("AWS_") and "secretKeyRef" in e.get("valueFrom", {})
    }


def _ray_pods() -> list[tuple[str, dict]]:
    return [
        (f"{d['kind']} {d['metadata']['name']} pod {i}", pod)
        for d in _by_kind("RayCluster") + _by_kind("RayJob")
        for i, pod in enumerate(_pod_specs(d))
    ]


def test_mlflow_artifacts_and_ray_storage_are_separate_buckets_with_separate_keys():
    (cm,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "q2l-config"]
    mlflow_bucket = _bucket_of(cm["data"]["MLFLOW_ARTIFACTS_DESTINATION"])
    ray_bucket = _bucket_of(cm["data"]["Q2L_RAY_STORAGE"])
    assert mlflow_bucket != ray_bucket, "MLflow's artifacts and Ray's storage must not share a bucket"
    # the AWS policies grant each role its own bucket only, and name the same buckets as the ConfigMap
    assert _policy_buckets("q2l-mlflow-server.json") == {mlflow_bucket}
    assert _policy_buckets("q2l-ray-node.json") == {ray_bucket}
    (job,) = _by_kind("RayJob")
    entry = job["spec"]["entrypoint"].split()
    storage = [
        entry[i + 1] for i, t in enumerate(entry) if t == "--set" and entry[i + 1].startswith("ray.storage")
    ]
    assert [_bucket_of(v.split("=", 1)[1]) for v in storage] == [ray_bucket]
    # the MLflow server alone holds the artifact bucket's key; Ray pods hold another one (or none)
    (mlflow,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "q2l-mlflow"]
    mlflow_secrets = _s3_secrets(mlflow["spec"]["template"]["spec"])
    assert len(mlflow_secrets) == 1, mlflow_secrets
    ray_secrets = set()
    for where, pod in _ray_pods():
        assert not _s3_secrets(pod) & mlflow_secrets, f"{where} holds the MLflow artifact bucket's key"
        ray_secrets |= _s3_secrets(pod)
    assert ray_secrets, "the Ray pods need the Ray bucket's key"
    for path, doc in _docs():
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "q2l-mlflow":
            continue
        for pod in _pod_specs(doc):
            assert not _s3_secrets(pod) & mlflow_secrets, (
                f"{path}: {doc['metadata']['name']} holds MLflow's key"
            )
    # the MLflow server gets no storage of Ray's, and serves artifacts itself (clients never need its key)
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
    assert "--no-serve-artifacts" not in args


def test_ray_pods_run_as_non_root_without_privileges():
    pods = _ray_pods()
    assert len(pods) >= 3, "head, GPU workers and the RayJob's submitter"
    for where, pod in pods:
        ctx = pod.get("securityContext", {})
        assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) != 0, f"{where}: {ctx}"
        for c in pod["containers"]:
            cc = c.get("securityContext", {})
            assert cc.get("allowPrivilegeEscalation") is False, f"{where} {c['name']}: {cc}"
            assert cc.get("capabilities", {}).get("drop") == ["ALL"], f"{where} {c['name']}: {cc}"
            assert not cc.get("privileged") and cc.get("runAsUser", 1) != 0, f"{where} {c['name']}: {cc}"
    # the MLflow pod is held to the same rule it set the example for
    (mlflow,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "q2l-mlflow"]
    assert mlflow["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        present = e["key"] in labels
        ok = {
            "Exists": present,
            "DoesNotExist": not present,
            "In": present and labels[e["key"]] in e.get("values", []),
            "NotIn": not present or labels[e["key"]] not in e.get("values", []),
        }[e["operator"]]
        if not ok:
            return False
    return True


def test_network_policies_let_only_mlflow_and_the_ray_pods_reach_postgres():
    (pg,) = _by_kind("StatefulSet")
    pg_labels = pg["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in _by_kind("NetworkPolicy") if _selects(p["spec"]["podSelector"], pg_labels)]
    assert policies, "no NetworkPolicy selects the PostgreSQL pods"
    # every pod template of the namespace (KubeRay adds ray.io/node-type to Ray pods)
    pods = {}
    for _, doc in _docs():
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            pods[doc["metadata"]["name"]] = doc["spec"]["template"]["metadata"]["labels"]
    (rc,) = _by_kind("RayCluster")
    head_labels = rc["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    pods["ray-head"] = {**head_labels, "ray.io/node-type": "head"}
    for g in rc["spec"]["workerGroupSpecs"]:
        pods[f"ray-{g['groupName']}"] = {**g["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}
    allowed = set()
    for p in policies:
        assert "Ingress" in p["spec"]["policyTypes"], p["metadata"]["name"]
        for rule in p["spec"].get("ingress", []):
            peers = rule.get("from")
            assert peers, f"{p['metadata']['name']}: an ingress rule without 'from' admits everyone"
            for peer in peers:
                assert set(peer) == {"podSelector"}, (
                    f"{p['metadata']['name']}: only pods of this namespace: {peer}"
                )
                allowed |= {name for name, labels in pods.items() if _selects(peer["podSelector"], labels)}
            assert {port["port"] for port in rule.get("ports", [])} == {5432}, p["metadata"]["name"]
    ray_pods = {name for name in pods if name.startswith("ray-")}
    assert ray_pods and allowed == {"q2l-mlflow", *ray_pods}, (
        f"pods allowed to reach PostgreSQL: {sorted(allowed)}"
    )


def _env(spec: dict) -> dict[str, dict]:
    return {e["name"]: e for c in spec["containers"] for e in c.get("env", [])}


def test_ray_pods_hold_the_study_roles_password_and_not_mlflows():
    (rc,) = _by_kind("RayCluster")
    (config,) = [c for c in _by_kind("ConfigMap") if c["metadata"]["name"] == "q2l-config"]
    storage = config["data"]["Q2L_OPTUNA_STORAGE"]
    assert storage.startswith("postgresql+psycopg2://q2l_optuna@") and storage.endswith("/q2l_optuna")
    for spec in _pod_specs(rc):
        env = _env(spec)
        assert env["Q2L_OPTUNA_STORAGE"]["valueFrom"]["configMapKeyRef"]["key"] == "Q2L_OPTUNA_STORAGE"
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "q2l-optuna"
        secrets = {r["name"] for r in _walk(spec, "secretKeyRef")}
        assert "q2l-postgres" not in secrets and "q2l-s3-mlflow" not in secrets, secrets
    (pg,) = _by_kind("StatefulSet")
    assert _env(pg["spec"]["template"]["spec"])["OPTUNA_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "q2l-optuna",
        "key": "password",
    }


@pytest.mark.slow
def test_postgres_init_scripts_give_the_study_role_its_database_and_nothing_else(tmp_path):
    """The init ConfigMap run as the postgres image runs it, on a real PostgreSQL: ``POSTGRES_USER`` as
    superuser and ``POSTGRES_DB``, then each ``.sql`` through psql and each ``.sh`` sourced by bash."""
    import shutil
    import tempfile

    import psycopg2
    from support import free_port

    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins or (os.getuid() == 0 and shutil.which("runuser") is None):
        pytest.skip("PostgreSQL server binaries not installed (make setup-dev installs them)")
    pg_bin = bins[-1]
    (init,) = [c for c in _by_kind("ConfigMap") if c["metadata"]["name"] == "q2l-postgres-init"]
    root = Path(tempfile.mkdtemp(prefix="q2l-pg-"))  # the postgres user must reach it (not pytest's tmp)
    root.chmod(0o777)
    as_pg = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    port, password = free_port(), "study-role-secret"
    env = {
        **os.environ,
        "PGHOST": str(root),
        "PGPORT": str(port),
        "POSTGRES_USER": "mlflow",
        "PGUSER": "mlflow",
    }

    def run(cmd, **kw):
        return subprocess.run(
            [*as_pg, *cmd], check=True, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env, **kw
        )

    try:
        run(
            [
                f"{pg_bin}/initdb",
                "-D",
                f"{root}/data",
                "-U",
                "mlflow",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ]
        )
        run(
            [
                f"{pg_bin}/pg_ctl",
                "-D",
                f"{root}/data",
                "-l",  # the server's output to a file, not to this test's pipe (which would never close)
                f"{root}/postgres.log",
                "-w",
                "-o",
                f"-c listen_addresses=127.0.0.1 -p {port} -k {root}",
                "start",
            ]
        )
        run([f"{pg_bin}/createdb", "mlflow"])
        for name, text in sorted(init["data"].items()):
            script = root / name
            script.write_text(text)
            if name.endswith(".sql"):
                run([f"{pg_bin}/psql", "-v", "ON_ERROR_STOP=1", "--dbname", "mlflow", "-f", str(script)])
            else:
                run(
                    [
                        "bash",
                        "-c",
                        f"export PATH={pg_bin}:$PATH OPTUNA_PASSWORD={password}; set -e; source {script}",
                    ]
                )

        def connect(dbname, user="q2l_optuna", pw=password):
            return psycopg2.connect(
                host="127.0.0.1", port=port, dbname=dbname, user=user, password=pw, connect_timeout=10
            )

        with connect("q2l_optuna") as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE studies (id int)")  # the role owns its database: Optuna creates tables
        for other in ("mlflow", "mlflow_auth"):
            with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
                connect(other)
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            connect("q2l_optuna", pw="wrong")
    finally:
        subprocess.run(
            [*as_pg, f"{pg_bin}/pg_ctl", "-D", f"{root}/data", "-m", "immediate", "stop"],
            capture_output=True,
            timeout=HANG_GUARD_S,
        )
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------- cluster launcher
def _launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())


def test_launcher_yaml_validates_against_rays_schema():
    import json

    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _launcher()
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    validate_config(prepare_config(raw))  # what `ray up` runs: defaults filled in, then the schema
    broken = {**raw, "max_workers": "four"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_launcher_has_cpu_head_gpu_workers_token_auth_and_installs_the_project():
    import ray

    cfg = _launcher()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [
        t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1
    ]
    assert gpu and all(t["max_workers"] > t.get("min_workers", 0) for t in gpu)
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert any("pip install" in c and "~/q2l" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["~/q2l"] == "."
    assert {".git", ".venv", "data", "results"} <= set(cfg["rsync_exclude"])
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    # the nodes' instance profile is the Ray role; its policy reaches the Ray bucket only
    assert {t["node_config"]["IamInstanceProfile"]["Name"] for t in types.values()} == {"q2l-ray-node"}
    assert (CLUSTER / "aws" / "iam" / "q2l-ray-node.json").is_file()
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    for cmd in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in cmd and "--disable-usage-stats" in cmd
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])
    ssh = cfg["provider"]["security_group"]["IpPermissions"][0]["IpRanges"]
    assert all(r["CidrIp"] != "0.0.0.0/0" for r in ssh), "SSH must not be open to the world"


# ------------------------------------------------------------------------------------------ local scripts
@pytest.mark.parametrize("script", ["up.sh", "down.sh", "common.sh"])
def test_local_scripts_parse(script):
    path = CLUSTER / "local" / script
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr


def test_local_scripts_never_run_ray_stop():
    # `ray stop` stops every Ray process on the machine, including other people's
    for script in (CLUSTER / "local").glob("*.sh"):
        code = "\n".join(
            line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")
        )
        assert not re.search(r"\bray\b[\"']?\s+stop\b", code), script


def test_up_says_what_is_missing_and_starts_nothing(tmp_path):
    env = {**os.environ, "Q2L_STACK_DIR": str(tmp_path / "stack"), "Q2L_PG_BIN": str(tmp_path / "no-pg")}
    out = subprocess.run(
        [str(CLUSTER / "local" / "up.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1
    assert "PostgreSQL server binaries not found" in out.stderr and "apt-get install postgresql" in out.stderr
    assert not (tmp_path / "stack" / "pids").exists()


def test_local_s3_server_names_a_bad_role_or_policy(tmp_path):
    import sys

    server = CLUSTER / "local" / "s3_server.py"
    not_s3 = tmp_path / "not-s3.json"
    not_s3.write_text('{"Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]}')
    for role, needle in (
        (f"ray={tmp_path / 'missing.json'}", "missing.json"),
        (f"ray={not_s3}", "Resource '*'"),
        ("Ray=x.json", "ROLE=POLICY.json"),
    ):
        out = subprocess.run(
            [sys.executable, str(server), "--port", "1", "--secrets", str(tmp_path), role],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode != 0 and needle in out.stderr, (role, out.stderr[-500:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-s3.json"], "nothing may be written"
