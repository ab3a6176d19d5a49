"""Data versions from DVC: which exact bytes a run trains on, and how a worker gets them.

A :class:`DataVersion` is ``(dataset name, DVC content hash, git revision, remote)``. The driver
resolves it once (:func:`resolve_data_version`); workers read exactly that version with
:func:`load_data_version` -- from the local copy when its hash matches, else from the DVC cache
or remote through ``DVCFileSystem(repo, rev=...)``. Never ``dvc pull`` per worker: DVC's repo lock
makes parallel pulls fail (treeverse/dvc#10752).

The content hash is computed the way DVC does for a directory output: md5 of the sorted JSON list
of ``{"md5", "relpath"}`` entries, suffixed ``.dir`` -- so it equals what ``dvc.lock`` records
and needs no DVC process to check.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from scalelab.config.specs import DataSpec
from scalelab.data.dataset import Dataset, DataVersion, file_digest, read_prepared
from scalelab.data.shards import is_sharded, open_sharded
from scalelab.errors import DataError

CACHE_DIR = Path(".scalelab/data-cache")  # fetched versions, one folder per content hash


# ----------------------------------------------------------------------------- hashing


def read_any(path: str | Path, verify: bool = True) -> Dataset:
    """A prepared dataset in either form: arrays (``*.npz``) or shards (``format: shards``)."""
    return open_sharded(path, verify=verify) if is_sharded(path) else read_prepared(path, verify=verify)


def md5_file(path: Path) -> str:
    return file_digest(path, "md5")


def dir_entries(path: str | Path) -> list[dict[str, str]]:
    """Per-file md5 entries of a folder, sorted by relative path (DVC's ``.dir`` manifest)."""
    root = Path(path)
    entries = [
        {"md5": md5_file(p), "relpath": p.relative_to(root).as_posix()}
        for p in root.rglob("*")
        if p.is_file()
    ]
    return sorted(entries, key=lambda e: e["relpath"])


def dvc_dir_hash(path: str | Path) -> str:
    """The md5 DVC records for a directory output (``<md5>.dir``)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; nothing to hash")
    manifest = json.dumps(dir_entries(root), sort_keys=True).encode("utf-8")
    return hashlib.md5(manifest).hexdigest() + ".dir"


# ----------------------------------------------------------------------------- repository facts


def find_dvc_root(start: str | Path) -> Path | None:
    """The nearest folder at or above ``start`` holding ``.dvc/`` (a DVC repository root)."""
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def _git(root: Path, *args: str) -> str | None:
    """Read-only git query; None when git or the repository is unavailable."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_head(root: Path) -> str | None:
    out = _git(root, "rev-parse", "HEAD")
    return out.strip() if out else None


def _hash_in_lock(lock: dict[str, Any], relpath: str) -> str | None:
    for stage in (lock or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path", "").rstrip("/") == relpath:
                return out.get("md5")
    return None


def _hash_in_dvcfile(dvcfile: dict[str, Any], name: str) -> str | None:
    for out in (dvcfile or {}).get("outs", []):
        if out.get("path", "").rstrip("/") == name:
            return out.get("md5")
    return None


def locked_hash(root: Path, relpath: str, rev: str | None = None) -> tuple[str | None, str | None]:
    """(hash recorded for ``relpath``, the file recording it) in dvc.lock or ``<relpath>.dvc``.

    ``rev=None`` reads the workspace; otherwise the files as committed at that git revision.
    """
    rel = Path(relpath)
    candidates = [("dvc.lock", None), (f"{relpath}.dvc", rel.name)]
    for fname, out_name in candidates:
        if rev is None:
            path = root / fname
            text = path.read_text() if path.is_file() else None
        else:
            text = _git(root, "show", f"{rev}:./{fname}")  # ./: relative to the DVC root
        if text is None:
            continue
        doc = yaml.safe_load(text)
        found = _hash_in_lock(doc, relpath) if out_name is None else _hash_in_dvcfile(doc, out_name)
        if found:
            return found, fname
    return None, None


def default_remote(root: Path) -> tuple[str, str] | None:
    """(name, url) of the repository's default DVC remote, including ``.dvc/config.local``."""
    try:
        from dvc.config import Config

        conf = Config(dvc_dir=str(root / ".dvc"), validate=False)
    except Exception:  # noqa: BLE001 - a broken config is reported by DVC itself when used
        return None
    name = conf.get("core", {}).get("remote")
    if not name:
        return None
    url = conf.get("remote", {}).get(name, {}).get("url")
    return (name, str(url)) if url else None


def _relative_to_root(root: Path, path: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError as exc:
        raise DataError(f"{path} lies outside the DVC repository {root}") from exc


# ----------------------------------------------------------------------------- resolve + verify


def restore_command(relpath: str) -> str:
    """The command that puts the recorded version of ``relpath`` back, run from the DVC root.

    ``--force``: the changed files are not in the cache, so a plain ``dvc checkout`` refuses to
    remove them ("Can't remove the following unsaved files without confirmation"); overwriting
    them is exactly what restoring means. ``--relink`` also replaces files DVC considers current.
    """
    return f"dvc checkout --force --relink {relpath}"


def resolve_data_version(
    spec: DataSpec, rev: str | None = None, repo: str | Path | None = None
) -> DataVersion:
    """The data version of the prepared dataset ``data_dir/name``; resolved once, on the driver.

    Without ``rev``: hashes the local prepared folder and refuses when DVC records a different
    hash (stale or tampered data). With ``rev``: the hash recorded at that git revision.
    """
    prepared = Path(spec.data_dir) / spec.name
    root = (
        Path(repo).resolve()
        if repo
        else find_dvc_root(prepared.parent if not prepared.exists() else prepared)
    )
    if root is None:  # not a DVC repository: the content hash still pins the bytes
        if rev is not None:
            raise DataError(f"cannot read revision {rev!r} of {prepared}: no DVC repository around it")
        return DataVersion(name=spec.name, content_hash=dvc_dir_hash(prepared), path=str(prepared))

    relpath = _relative_to_root(root, prepared) if not repo else Path(spec.data_dir, spec.name).as_posix()
    remote = default_remote(root)
    remote_url = remote[1] if remote else None
    if rev is not None:
        return _version_at_rev(spec, root, relpath, rev, remote_url)

    current = dvc_dir_hash(prepared)
    recorded, source = locked_hash(root, relpath)
    if recorded is not None and recorded != current:
        raise DataError(
            f"prepared data {relpath} (md5 {current}) no longer matches {source} (md5 {recorded}): "
            f"it changed after DVC recorded it. Refusing to train on it. Run `{restore_command(relpath)}` "
            f"to restore the recorded version, or `scalelab data prepare <recipe>` then `dvc commit` "
            f"(or `dvc repro`) to record a new one"
        )
    head = git_head(root)
    committed, _ = locked_hash(root, relpath, rev=head) if head and recorded else (None, None)
    return DataVersion(
        name=spec.name,
        content_hash=current,
        rev=head if committed == current else None,
        remote=remote_url if recorded else None,  # never added to DVC: it is on no remote
        path=relpath,
        repo=str(root),
    )


def _version_at_rev(
    spec: DataSpec, root: Path, relpath: str, rev: str, remote_url: str | None
) -> DataVersion:
    full = _git(root, "rev-parse", "--verify", f"{rev}^{{commit}}")
    if full is None:
        raise DataError(f"git revision {rev!r} not found in {root}")
    recorded, _ = locked_hash(root, relpath, rev=full.strip())
    if recorded is None:
        raise DataError(f"{relpath} is not tracked by DVC at revision {rev} (no dvc.lock or .dvc entry)")
    return DataVersion(
        name=spec.name,
        content_hash=recorded,
        rev=full.strip(),
        remote=remote_url,
        path=relpath,
        repo=str(root),
    )


def verify_prepared(spec: DataSpec) -> dict[str, Any]:
    """Integrity report of ``data_dir/name``: per-file checksums (metadata.json) and the DVC hash.

    Returns {path, content_hash, recorded, recorded_in, ok, problems: [...]}, naming each changed
    file when DVC's ``.dir`` manifest is in the cache.
    """
    prepared = Path(spec.data_dir) / spec.name
    problems: list[str] = []
    if not prepared.is_dir():
        raise DataError(f"no prepared dataset at {prepared}; run `scalelab data prepare` or `dvc pull`")
    try:
        read_any(prepared, verify=True)
    except DataError as exc:
        problems.append(str(exc))
    current = dvc_dir_hash(prepared)
    root = find_dvc_root(prepared)
    recorded = source = None
    if root is not None:
        relpath = _relative_to_root(root, prepared)
        recorded, source = locked_hash(root, relpath)
        if recorded and recorded != current:
            changed = _changed_files(root, prepared, recorded)
            detail = f"; changed: {', '.join(changed)}" if changed else ""
            problems.append(
                f"{relpath} has md5 {current} but {source} records {recorded}{detail}. "
                f"Run `{restore_command(relpath)}` or `scalelab data prepare` + `dvc commit`"
            )
    return {
        "path": str(prepared),
        "content_hash": current,
        "recorded": recorded,
        "recorded_in": source,
        "ok": not problems,
        "problems": problems,
    }


def _changed_files(root: Path, prepared: Path, recorded: str) -> list[str]:
    manifest = root / ".dvc" / "cache" / "files" / "md5" / recorded[:2] / recorded[2:]
    if not manifest.is_file():
        return []
    want = {e["relpath"]: e["md5"] for e in json.loads(manifest.read_text())}
    have = {e["relpath"]: e["md5"] for e in dir_entries(prepared)}
    return sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))


# ----------------------------------------------------------------------------- worker-side reads


def load_data_version(version: DataVersion, local: str | Path | None = None) -> Dataset:
    """The dataset exactly as ``version`` pins it, read without ``dvc pull``.

    Order: the local prepared folder if its hash matches; a fetched copy under
    ``.scalelab/data-cache/<hash>``; else ``DVCFileSystem(version.repo, rev=version.rev)``
    (DVC cache or remote) into that cache, written atomically so parallel workers never collide.
    """
    candidates = [Path(p) for p in (local, version.path) if p]
    if version.repo and version.path:
        candidates.append(Path(version.repo) / version.path)
    for path in candidates:
        if (path / "metadata.json").is_file() and dvc_dir_hash(path) == version.content_hash:
            return _with_version(read_any(path), version)
    cached = CACHE_DIR / version.content_hash
    if not (cached / "metadata.json").is_file():
        fetch_version(version, cached)
    if dvc_dir_hash(cached) != version.content_hash:
        raise DataError(f"cached copy {cached} does not hash to {version.content_hash}; delete it and retry")
    return _with_version(read_any(cached), version)


def _with_version(ds: Dataset, version: DataVersion) -> Dataset:
    ds.version = version
    return ds


def fetch_version(version: DataVersion, dest: str | Path) -> Path:
    """Copy ``version.path`` at ``version.rev`` out of DVC (cache or remote) into ``dest``, atomically."""
    if not version.repo or not version.path:
        raise DataError(
            f"data version {version.content_hash} of {version.name} has no DVC repository/path to read from; "
            f"prepare the data locally (`scalelab data prepare`) or resolve the version inside a DVC repo"
        )
    from dvc.api import DVCFileSystem

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        fs = DVCFileSystem(version.repo, rev=version.rev)
        fs.get(version.path, str(tmp / "d"), recursive=True)
        got = dvc_dir_hash(tmp / "d")
        if got != version.content_hash:
            raise DataError(
                f"{version.path} at revision {version.rev} hashes to {got}, not {version.content_hash}"
            )
        try:
            os.rename(tmp / "d", dest)
        except OSError:  # another worker got there first: its copy is the same bytes
            if not (dest / "metadata.json").is_file():
                raise
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - DVC/S3 errors, reported with what was asked for
        raise DataError(
            f"cannot read {version.path} at revision {version.rev or 'workspace'} from {version.repo} "
            f"(remote {version.remote or 'none'}): {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def list_versions(spec: DataSpec, limit: int = 50) -> list[dict[str, Any]]:
    """Git revisions at which DVC recorded a new hash for ``data_dir/name``, newest first.

    Each entry: {rev, date, subject, content_hash}; a first entry with ``rev="workspace"`` when the
    local prepared folder differs from the newest recorded version.
    """
    prepared = Path(spec.data_dir) / spec.name
    root = find_dvc_root(prepared if prepared.exists() else prepared.parent)
    if root is None:
        raise DataError(f"{prepared} is not inside a DVC repository (no .dvc/ above it); run `dvc init`")
    relpath = _relative_to_root(root, prepared)
    log = _git(root, "log", f"-n{limit}", "--format=%H%x09%cI%x09%s", "--", "dvc.lock", f"{relpath}.dvc")
    versions: list[dict[str, Any]] = []
    for line in (log or "").splitlines():
        rev, date, subject = line.split("\t", 2)
        recorded, _ = locked_hash(root, relpath, rev=rev)
        if recorded is None:
            continue
        if versions and versions[-1]["content_hash"] == recorded:
            versions[-1].update(rev=rev, date=date, subject=subject)  # keep the commit that introduced it
            continue
        versions.append({"rev": rev, "date": date, "subject": subject, "content_hash": recorded})
    if prepared.is_dir():
        current = dvc_dir_hash(prepared)
        if not versions or versions[0]["content_hash"] != current:
            versions.insert(
                0, {"rev": "workspace", "date": "", "subject": "local prepared data", "content_hash": current}
            )
    return versions
