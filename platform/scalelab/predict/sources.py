"""What ``scalelab predict`` reads, resolved and listed on the driver before any replica starts.

SOURCE is one of:

- an image folder: ImageFolder layout (``root/<class>/*.png``: the folder names are the labels)
  or a flat folder (no labels); ``.png .jpg .jpeg .bmp .webp`` files, any depth;
- ``s3://bucket/prefix``: the same layouts under an S3 prefix, on the project's S3 endpoint
  (``--endpoint-url``, ``$AWS_ENDPOINT_URL[_S3]``, the project's DVC remote on that bucket, or the
  ``scalelab up`` stack's S3) with the AWS credentials of the environment or profile, as
  ``data/remote.py`` reads them;
- a prepared dataset version: a recipe (``pipelines/NAME.yaml``, or just ``NAME``) whose data it
  is, or a prepared folder (``data/NAME`` with ``metadata.json``); its DVC version is resolved and
  checked as training does (``--data-rev REV``: the version recorded at a git revision).

Every failure here (no such folder, no images, unreachable endpoint, missing bucket) is a
:class:`DataError` that says what to do; nothing has been started yet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.cluster.session import read_stack
from scalelab.config import load_recipe
from scalelab.config.specs import DataSpec
from scalelab.data.catalog import load_dataset, prepared_path
from scalelab.data.remote import remote_settings
from scalelab.data.versioning import find_dvc_root, load_data_version, resolve_data_version
from scalelab.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # what artifacts.preprocess decodes


@dataclass(frozen=True)
class S3Location:
    """An S3 prefix and how to reach it. Credentials stay in the environment / profile."""

    bucket: str
    prefix: str
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    # the driver's credentials, frozen, so replicas on any node read with them (as Ray Train's
    # storage filesystem carries them); None: each process's own environment / profile
    credentials: tuple[str, str, str | None] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def where(self) -> str:
        return f"{self.url} (endpoint {self.endpoint_url or 'AWS default'})"

    def with_driver_credentials(self) -> S3Location:
        import boto3

        session = boto3.Session(profile_name=self.profile) if self.profile else boto3.Session()
        found = session.get_credentials()
        if found is None:
            return self
        frozen = found.get_frozen_credentials()
        return replace(self, credentials=(frozen.access_key, frozen.secret_key, frozen.token))

    def client(self, timeout: float = 10.0, attempts: int = 2):
        import boto3
        from botocore.config import Config as BotoConfig

        session = boto3.Session(profile_name=self.profile) if self.profile else boto3.Session()
        names = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
        keys = dict(zip(names, self.credentials, strict=True)) if self.credentials else {}
        return session.client(
            "s3",
            **keys,
            endpoint_url=self.endpoint_url,
            region_name=self.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=BotoConfig(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": attempts},
                max_pool_connections=32,
            ),
        )


@dataclass
class Source:
    """A resolved SOURCE: files to read (folder, S3) or the images of one split (dataset)."""

    kind: str  # "folder" | "s3" | "dataset"
    where: str  # as the user named it, for messages and the output's metadata
    files: list[str] = field(default_factory=list)  # names relative to the root (output's `file`)
    locations: list[str] = field(default_factory=list)  # absolute paths, or S3 keys
    labels: list[str | None] = field(default_factory=list)  # class names (None: unlabelled)
    images: np.ndarray | None = None  # dataset: uint8 (N, H, W, C)
    s3: S3Location | None = None
    data_version: dict[str, Any] | None = None  # dataset: DataVersion.to_dict()
    split: str | None = None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.files)

    @property
    def labelled(self) -> bool:
        return any(label is not None for label in self.labels)


# ----------------------------------------------------------------------------- what SOURCE names


def resolve_source(
    source: str,
    split: str = "test",
    data_rev: str | None = None,
    endpoint_url: str | None = None,
) -> Source:
    """SOURCE (see the module doc) listed and ready to read; run inside the project's folder."""
    if source.startswith("s3://"):
        return list_s3(parse_s3_url(source, endpoint_url))
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        return dataset_source(recipe_data_spec(path), split, data_rev, source, prepare_if_missing=True)
    if path.is_dir():
        if (path / "metadata.json").is_file():
            return dataset_source(prepared_data_spec(path), split, data_rev, source, prepare_if_missing=False)
        return list_folder(path)
    if "/" not in source and Path("pipelines", f"{source}.yaml").is_file():
        spec = recipe_data_spec(Path("pipelines", f"{source}.yaml"))
        return dataset_source(spec, split, data_rev, source, prepare_if_missing=True)
    if path.exists():
        raise DataError(
            f"SOURCE {source} is a file; give a folder of images, s3://bucket/prefix or a dataset"
        )
    raise DataError(
        f"SOURCE {source!r} is neither a folder, an s3://bucket/prefix, a recipe (.yaml) nor a "
        f"dataset name with pipelines/{source}.yaml in {Path.cwd()}; check the path"
    )


def label_layout(names: list[str]) -> list[str | None]:
    """ImageFolder labels: when every file sits in a first-level subfolder (``<class>/x.png``, at
    least two classes), the subfolder names; otherwise (a flat folder, mixed depths) none."""
    parts = [n.split("/") for n in names]
    if parts and all(len(p) == 2 for p in parts) and len({p[0] for p in parts}) >= 2:
        return [p[0] for p in parts]
    return [None] * len(names)


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith(IMAGE_SUFFIXES) and not base.startswith(".")


def list_folder(root: Path) -> Source:
    root = root.resolve()
    names = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    files = [n for n in names if _is_image_name(n)]
    if not files:
        raise DataError(
            f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}); expected root/<class>/*.png "
            f"(labelled) or root/*.png"
        )
    return Source(
        kind="folder",
        where=str(root),
        files=files,
        locations=[str(root / n) for n in files],
        labels=label_layout(files),
    )


# ----------------------------------------------------------------------------- S3


def parse_s3_url(url: str, endpoint_url: str | None = None) -> S3Location:
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise DataError(f"{url}: expected s3://bucket/prefix")
    prefix = prefix.strip("/")
    return S3Location(
        bucket=bucket,
        prefix=f"{prefix}/" if prefix else "",
        endpoint_url=s3_endpoint(bucket, endpoint_url),
        region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
        profile=os.environ.get("AWS_PROFILE"),
    )


def s3_endpoint(bucket: str, explicit: str | None = None) -> str | None:
    """The endpoint for ``bucket``: ``explicit``; ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``; the
    ``endpointurl`` of this project's DVC remote on that bucket; the running stack's S3; else AWS."""
    found = explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return found or _dvc_remote_endpoint(bucket) or read_stack().get("s3_url")


def _dvc_remote_endpoint(bucket: str) -> str | None:
    root = find_dvc_root(Path.cwd())
    if root is None:
        return None
    from dvc.config import Config

    for name in Config(dvc_dir=str(root / ".dvc"), validate=False).get("remote", {}):
        settings = remote_settings(root, name)
        if settings.is_s3 and settings.bucket == bucket and settings.endpoint_url:
            return settings.endpoint_url
    return None


def list_s3(loc: S3Location) -> Source:
    """Every image key under the prefix; unreachable endpoint, missing bucket or refused
    credentials fail here, fast (one try, short timeouts), naming the endpoint."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    keys: list[str] = []
    try:
        pages = loc.client(timeout=5.0, attempts=1).get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=loc.bucket, Prefix=loc.prefix):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
    except EndpointConnectionError as exc:
        raise DataError(
            f"{loc.where}: endpoint unreachable ({exc}). Is the S3 server running? Pass --endpoint-url "
            f"or set AWS_ENDPOINT_URL for an S3-compatible server"
        ) from None
    except NoCredentialsError:
        raise DataError(
            f"{loc.where}: no AWS credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        ) from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise DataError(f"{loc.where}: bucket {loc.bucket!r} does not exist") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise DataError(
                f"{loc.where}: access denied ({code}); check the AWS credentials/profile"
            ) from None
        raise DataError(f"{loc.where}: {exc}") from None
    except BotoCoreError as exc:
        raise DataError(f"{loc.where}: {type(exc).__name__}: {exc}") from None
    names = sorted(k[len(loc.prefix) :] for k in keys if _is_image_name(k) and not k.endswith("/"))
    if not names:
        raise DataError(
            f"{loc.where} holds no images ({', '.join(IMAGE_SUFFIXES)}) among {len(keys)} objects; "
            f"expected prefix/<class>/*.png (labelled) or prefix/*.png"
        )
    return Source(
        kind="s3",
        where=loc.url,
        files=names,
        locations=[loc.prefix + n for n in names],
        labels=label_layout(names),
        s3=loc.with_driver_credentials(),
    )


# ----------------------------------------------------------------------------- dataset versions


def recipe_data_spec(path: Path) -> DataSpec:
    return load_recipe(path).data


def prepared_data_spec(folder: Path) -> DataSpec:
    folder = Path(os.path.abspath(folder))
    return DataSpec(name=folder.name, data_dir=str(folder.parent))


def dataset_source(
    spec: DataSpec, split: str, data_rev: str | None, where: str, prepare_if_missing: bool
) -> Source:
    """One split of a prepared dataset, at the version DVC records (as training checks it), or at
    git revision ``data_rev`` (read through DVC's cache or remote)."""
    if data_rev:
        data = load_data_version(resolve_data_version(spec, rev=data_rev), local=prepared_path(spec))
    else:
        data = load_dataset(spec, prepare_if_missing=prepare_if_missing)
    if data.task != "classification":
        raise DataError(f"{spec.name} is a {data.task} dataset; batch prediction scores classifiers")
    if split not in data.splits:
        raise DataError(f"{spec.name} has no split {split!r}; choose one of {', '.join(data.splits)}")
    part = data.splits[split]
    if len(part) == 0:
        raise DataError(f"split {split!r} of {spec.name} is empty")
    return Source(
        kind="dataset",
        where=f"{where} ({spec.name}, split {split})",
        labels=[data.classes[int(i)] for i in part.y],
        images=part.x,
        data_version=data.version.to_dict() if data.version else None,
        split=split,
    )
