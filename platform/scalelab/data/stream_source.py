"""Streaming shards straight from the DVC remote on S3, without downloading the dataset first.

DVC stores a directory output content-addressed: ``<remote>/files/md5/<xx>/<rest>.dir`` is the
JSON manifest ``[{"md5", "relpath"}, ...]`` and each file is ``<remote>/files/md5/<xx>/<rest>``.
From the version's content hash (``dvc.lock`` / ``.dvc``) we read the manifest, then
``metadata.json``, and map every shard to its object: workers and Ray Data tasks read row groups
from those objects with pyarrow's S3 filesystem; a store that stops answering is retried for
``data.read_retry_s`` (see :class:`~scalelab.data.shards.ShardSource`). The object key
is the shard's md5, and its size is checked against the index, so a wrong object cannot pass
silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scalelab.config.specs import DataSpec
from scalelab.data.dataset import DataVersion
from scalelab.data.remote import remote_settings, s3_filesystem
from scalelab.data.shards import ShardSource, StreamDataset, stream_dataset
from scalelab.errors import DataError

STREAM_READ_ATTEMPTS = 3


def _object(base: str, md5: str) -> str:
    return f"{base}/files/md5/{md5[:2]}/{md5[2:]}"


def _read_object(fs: Any, path: str, what: str, endpoint: str | None) -> bytes:
    try:
        with fs.open_input_file(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise DataError(
            f"{what} is not on the DVC remote (s3://{path}, endpoint {endpoint or 'AWS'}): was it pushed? "
            f"Run `scalelab data push <recipe>` (or `dvc push`)"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read {what} from s3://{path} (endpoint {endpoint or 'AWS'}): {exc}") from exc


def remote_shards_config(version: DataVersion, endpoint_url: str | None = None) -> dict[str, Any]:
    """What a worker needs to open ``version``'s shards on its S3 remote: object paths + metadata."""
    if not version.remote or not version.remote.startswith("s3://"):
        raise DataError(
            f"data.stream_from=remote needs the data version on an S3 DVC remote; {version.name} "
            f"({version.content_hash}) has remote {version.remote or 'none'}: `dvc add` it and"
            f" `scalelab data push`"
        )
    # few quick retries inside pyarrow: ShardSource retries longer, with backoff, and says so
    fs, endpoint = s3_filesystem(endpoint_url, version.repo, attempts=STREAM_READ_ATTEMPTS)
    base = version.remote[len("s3://") :].rstrip("/")
    manifest = json.loads(
        _read_object(fs, _object(base, version.content_hash), "the .dir manifest", endpoint)
    )
    urls = {e["relpath"]: _object(base, e["md5"]) for e in manifest}
    if "metadata.json" not in urls:
        raise DataError(f"version {version.content_hash} of {version.name} has no metadata.json: not shards")
    meta = json.loads(_read_object(fs, urls["metadata.json"], "metadata.json", endpoint))
    if meta.get("format") != "shards":
        raise DataError(f"{version.name} ({version.content_hash}) is not in the stream format (shards)")
    for shards in meta["shards"].values():
        for shard in shards:
            if shard["file"] not in urls:
                raise DataError(f"shard {shard['file']} is not in the DVC manifest of {version.content_hash}")
    # the filesystem object carries the driver's endpoint and credentials to workers and Ray Data
    # tasks (as Ray Train's storage_filesystem does): they need no AWS variables of their own
    return {"endpoint": endpoint, "filesystem": fs, "remote": version.remote, "urls": urls, "meta": meta}


def open_remote_shards(config: dict[str, Any], check_sizes: bool = True) -> StreamDataset:
    """The :class:`StreamDataset` whose shards are the remote's objects named in ``config``."""
    fs = config.get("filesystem") or s3_filesystem(config["endpoint"], attempts=STREAM_READ_ATTEMPTS)[0]
    source = ShardSource(config["remote"], fs, dict(config["urls"]), endpoint=config["endpoint"])
    if check_sizes:
        for shards in config["meta"]["shards"].values():
            paths = [config["urls"][s["file"]] for s in shards]
            for shard, info in zip(shards, fs.get_file_info(paths), strict=True):
                if info.size is None:
                    raise DataError(
                        f"shard {shard['file']} is missing on the remote (s3://{info.path}); "
                        f"run `scalelab data push <recipe>`"
                    )
                if info.size != shard["bytes"]:
                    raise DataError(
                        f"shard {shard['file']} on the remote (s3://{info.path}) has {info.size} bytes, "
                        f"the index says {shard['bytes']}: the object is corrupt; push the data again"
                    )
    return stream_dataset(config["meta"], source)


def load_remote_stream(spec: DataSpec) -> StreamDataset:
    """The DVC-recorded version of ``data_dir/name``, streamed from its S3 remote (no local copy)."""
    from scalelab.data.versioning import find_dvc_root, git_head, locked_hash

    prepared = Path(spec.data_dir) / spec.name
    root = find_dvc_root(prepared.parent if not prepared.exists() else prepared)
    if root is None:
        raise DataError(f"data.stream_from=remote: {prepared} is not inside a DVC repository")
    relpath = (root / prepared.resolve().relative_to(root)).relative_to(root).as_posix()
    recorded, _ = locked_hash(root, relpath)
    if recorded is None:
        raise DataError(f"data.stream_from=remote: DVC records no version of {relpath}; `dvc add` it first")
    head = git_head(root)
    committed, _ = locked_hash(root, relpath, rev=head) if head else (None, None)
    remote = remote_settings(root)
    version = DataVersion(
        name=spec.name,
        content_hash=recorded,
        rev=head if committed == recorded else None,
        remote=remote.url,
        path=relpath,
        repo=str(root),
        format="stream",
    )
    data = open_remote_shards(remote_shards_config(version, spec.endpoint_url or remote.endpoint_url))
    version.format_reason = data.meta.get("format_reason")
    data.version = version
    return data
