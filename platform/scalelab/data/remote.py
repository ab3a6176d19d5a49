"""DVC remotes: configure one (S3 or a local folder), check an S3 one answers, push and pull.

S3 goes through boto3 (``dvc[s3]``), any S3-compatible server through ``endpointurl``.
Credentials come only from the usual AWS environment variables or profile: nothing here writes
a key into ``.dvc/config``. Before DVC touches anything, :func:`check_remote` asks the endpoint
for the bucket, so an unreachable server or a missing bucket fails fast, naming both, with
nothing half-written in the workspace.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from scalelab.errors import DataError


@dataclass
class RemoteSettings:
    name: str
    url: str
    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    @property
    def bucket(self) -> str:
        return self.url[len("s3://") :].split("/", 1)[0]


def dvc_executable() -> str:
    """The ``dvc`` next to this Python (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    if beside.is_file():
        return str(beside)
    found = shutil.which("dvc")
    if not found:
        raise DataError(
            "the `dvc` command is not installed; install scalelab with its dependencies (dvc[s3])"
        )
    return found


def run_dvc(args: list[str], cwd: str | Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a real DVC command; a failure becomes a :class:`DataError` carrying DVC's own message."""
    proc = subprocess.run(
        [dvc_executable(), *args], cwd=str(cwd), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise DataError(f"`dvc {' '.join(args)}` failed in {cwd}: " + " | ".join(msg[-6:]))
    return proc


def remote_settings(root: str | Path, name: str | None = None) -> RemoteSettings:
    """A remote's settings from ``.dvc/config`` (+ ``config.local``); the default one without ``name``."""
    from dvc.config import Config

    conf = Config(dvc_dir=str(Path(root) / ".dvc"), validate=False)
    name = name or conf.get("core", {}).get("remote")
    if not name:
        raise DataError(
            f"no DVC remote given and no default remote in {root}/.dvc/config; add one with "
            f"`scalelab data remote NAME s3://bucket/prefix --endpoint-url URL` or `dvc remote add -d`"
        )
    section = conf.get("remote", {}).get(name)
    if not section or not section.get("url"):
        known = ", ".join(conf.get("remote", {})) or "none"
        raise DataError(f"DVC remote {name!r} is not configured in {root} (known: {known})")
    return RemoteSettings(
        name=name,
        url=str(section["url"]),
        endpoint_url=section.get("endpointurl"),
        profile=section.get("profile"),
        region=section.get("region"),
    )


def check_remote(settings: RemoteSettings, timeout: float = 5.0) -> None:
    """Fail with a clear message when an S3 remote's endpoint is unreachable or its bucket missing."""
    if not settings.is_s3:
        return
    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = settings.endpoint_url or "AWS S3 (default endpoint)"
    where = f"S3 endpoint {endpoint}, bucket {settings.bucket!r} (DVC remote {settings.name!r})"
    session = boto3.Session(profile_name=settings.profile) if settings.profile else boto3.Session()
    client = session.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        config=BotoConfig(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1}),
    )
    try:
        client.head_bucket(Bucket=settings.bucket)
    except EndpointConnectionError as exc:
        raise DataError(f"{where}: endpoint unreachable ({exc}). Is the server running?") from exc
    except NoCredentialsError as exc:
        raise DataError(
            f"{where}: no AWS credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
            f"(never in .dvc/config)"
        ) from exc
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise DataError(
                f"{where}: the bucket does not exist; create it (e.g. `aws s3 mb s3://{settings.bucket}"
                f"{' --endpoint-url ' + settings.endpoint_url if settings.endpoint_url else ''}`)"
            ) from exc
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise DataError(f"{where}: access denied ({code}); check the AWS credentials/profile") from exc
        raise DataError(f"{where}: {exc}") from exc
    except BotoCoreError as exc:
        raise DataError(f"{where}: {type(exc).__name__}: {exc}") from exc


def configure_remote(
    root: str | Path,
    name: str,
    url: str,
    endpoint_url: str | None = None,
    profile: str | None = None,
    default: bool = True,
    local: bool = False,
) -> RemoteSettings:
    """``dvc remote add`` (+ ``modify endpointurl/profile``). ``local`` keeps it in the git-ignored
    ``.dvc/config.local`` (for machine-specific endpoints such as a loopback test server)."""
    scope = ["--local"] if local else []
    run_dvc(["remote", "add", *scope, *(["-d"] if default else []), "-f", name, url], cwd=root)
    if endpoint_url:
        run_dvc(["remote", "modify", *scope, name, "endpointurl", endpoint_url], cwd=root)
    if profile:
        run_dvc(["remote", "modify", *scope, name, "profile", profile], cwd=root)
    return remote_settings(root, name)


def transfer(root: str | Path, direction: str, targets: list[str], remote: str | None = None) -> str:
    """``dvc push`` / ``dvc pull`` of ``targets`` after checking the remote answers; DVC's summary."""
    settings = remote_settings(root, remote)
    check_remote(settings)
    args = [direction, *(["-r", settings.name] if remote else []), *targets]
    proc = run_dvc(args, cwd=root)
    lines = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return lines[-1] if lines else ""


def s3_endpoint(explicit: str | None = None, root: str | Path | None = None) -> str | None:
    """The S3 endpoint to use: ``explicit``, else ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``,
    else the default DVC remote's ``endpointurl`` (of the repository around ``root`` or the cwd)."""
    import os

    found = explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if found:
        return found
    from scalelab.data.versioning import find_dvc_root

    repo = find_dvc_root(root or Path.cwd())
    if repo is None:
        return None
    try:
        return remote_settings(repo).endpoint_url
    except DataError:
        return None


def s3_connection(endpoint: str | None) -> dict:
    """``pyarrow.fs.S3FileSystem`` keyword arguments for ``endpoint`` (``http://host:port``, a bare
    host meaning https, or None for AWS) with the AWS environment's region and credentials."""
    import os

    kwargs: dict = {
        "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:
            scheme, host = "https", endpoint
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(
            access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"]
        )
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return kwargs


def s3_filesystem(endpoint_url: str | None = None, root: str | Path | None = None, attempts: int = 6):
    """``(pyarrow.fs.S3FileSystem, endpoint)`` with the AWS environment's credentials, the endpoint
    of :func:`s3_endpoint`, and retries with exponential backoff (AWS standard strategy). The object
    pickles: Ray tasks and workers get the endpoint and credentials with it."""
    import pyarrow.fs

    endpoint = s3_endpoint(endpoint_url, root)
    kwargs = {
        **s3_connection(endpoint),
        "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=attempts),
        "connect_timeout": 5,
        "request_timeout": 30,
    }
    return pyarrow.fs.S3FileSystem(**kwargs), endpoint
