"""S3 for the local stack: moto's server with signatures and IAM policies enforced, as on AWS.

    python s3_server.py --host 127.0.0.1 --port PORT --secrets DIR ROLE=POLICY.json [ROLE=POLICY.json ...]

Before it listens it creates every bucket the policies name, one IAM user per role with that role's policy
(the same documents as ``cluster/aws/iam/``), and one access key per user, written to
``DIR/s3_<ROLE>_access_key_id`` and ``DIR/s3_<ROLE>_secret_access_key`` (mode 600). From the first request
on, every request must be signed with one of those keys and may do only what that key's policy allows.
moto's control API (``/moto-api/``: wipe all data, switch authentication off) is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
from pathlib import Path

REGION = "us-east-1"
UNSIGNED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Anonymous access is not allowed on this server</Message></Error>"
)
BUCKET_ARN = re.compile(r"^arn:aws:s3:::([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?$")


def _policy_for_moto(doc: dict) -> dict:
    """``doc`` with moto's name for the HeadBucket permission added where AWS checks ``s3:ListBucket``."""
    out = json.loads(json.dumps(doc))
    for st in out["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        if "s3:ListBucket" in actions:
            st["Action"] = [*actions, "s3:HeadBucket"]
    return out


def _buckets(doc: dict, where: str) -> set[str]:
    names = set()
    for st in doc["Statement"]:
        for arn in [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]:
            m = BUCKET_ARN.match(arn)
            if not m:
                raise SystemExit(f"{where}: Resource {arn!r} is not an S3 bucket or object ARN")
            names.add(m.group(1))
    return names


def _parse_roles(specs: list[str]) -> dict[str, dict]:
    roles = {}
    for spec in specs:
        role, sep, path = spec.partition("=")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", role):
            raise SystemExit(f"role {spec!r}: expected ROLE=POLICY.json with ROLE in [a-z0-9_]")
        try:
            roles[role] = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"role {role}: cannot read the policy {path}: {e}") from e
        _buckets(roles[role], path)
    return roles


def bootstrap(roles: dict[str, dict], secrets_dir: Path) -> None:
    """Buckets, users, policies and keys, made in-process before the server accepts any request."""
    import boto3
    from moto import mock_aws
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends

    mock = mock_aws()
    mock.start()
    try:
        s3 = boto3.client("s3", region_name=REGION)
        iam = boto3.client("iam", region_name=REGION)
        for bucket in sorted(set().union(*(_buckets(d, role) for role, d in roles.items()))):
            s3.create_bucket(Bucket=bucket)
        for role, doc in roles.items():
            user = f"q2l-{role}"
            iam.create_user(UserName=user)
            policy = json.dumps(_policy_for_moto(doc))
            iam.put_user_policy(UserName=user, PolicyName=user, PolicyDocument=policy)
            key_id = iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]
            # moto draws secrets from a seedable PRNG: replace it with one from the OS's CSPRNG.
            secret = secrets.token_hex(20)
            iam_backends[DEFAULT_ACCOUNT_ID]["aws"].access_keys[key_id].secret_access_key = secret
            for name, value in (("access_key_id", key_id), ("secret_access_key", secret)):
                name = f"s3_{role}_{name}"
                fd = os.open(secrets_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(value + "\n")
    finally:
        mock.stop(remove_data=False)


def app():
    """moto's WSGI app with authentication on and its control API refused."""
    from moto import settings
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # every request is authenticated and authorized
    inner = DomainDispatcherApplication(create_backend_app)

    def guarded(environ, start_response):
        # moto routes "//moto-api/..." like "/moto-api/...": compare with the slashes collapsed
        if re.sub("/+", "/", environ.get("PATH_INFO", "")).startswith("/moto-api"):
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"the control API is disabled on this server\n"]
        if "HTTP_AUTHORIZATION" not in environ and "X-Amz-Signature=" not in environ.get("QUERY_STRING", ""):
            # moto answers an unsigned request with a 500; AWS with 403 AccessDenied
            start_response("403 Forbidden", [("Content-Type", "application/xml")])
            return [UNSIGNED]
        return inner(environ, start_response)

    return guarded


def main(argv: list[str] | None = None) -> None:
    """Bootstrap, then serve until terminated."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secrets", type=Path, required=True, help="folder for the generated keys")
    parser.add_argument("roles", nargs="+", metavar="ROLE=POLICY.json")
    args = parser.parse_args(argv)
    if not args.secrets.is_dir():
        raise SystemExit(f"--secrets {args.secrets}: not a folder")
    roles = _parse_roles(args.roles)
    # A fake region/credentials for the in-process bootstrap only; the server itself checks real keys.
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
    bootstrap(roles, args.secrets)

    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import run_simple

    os.environ["MOTO_PORT"] = str(args.port)
    print(f"S3 on http://{args.host}:{args.port}, keys for {', '.join(roles)} in {args.secrets}", flush=True)
    run_simple(args.host, args.port, app(), threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    sys.exit(main())
