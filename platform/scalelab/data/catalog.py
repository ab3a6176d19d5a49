"""Dataset catalog: each kind reads raw data into a :class:`Dataset` with seeded splits.

The readers live in :mod:`scalelab.data.sources` (classification) and :mod:`scalelab.data.scenes`
(detection); :data:`READERS` names them all, explicitly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from scalelab.config.specs import DataSpec
from scalelab.data import scenes, sources
from scalelab.data.dataset import Dataset, DataVersion, read_prepared, write_prepared
from scalelab.errors import DataError

log = logging.getLogger("scalelab.data")

# Every dataset kind and its reader, in one table: a new kind is a reader function and one line here.
READERS: dict[str, Callable[[DataSpec], Dataset]] = {
    **sources.CLASSIFICATION_READERS,
    "scenes": scenes.read_scenes,
    "coco": scenes.read_coco,
}


def read_raw(spec: DataSpec) -> Dataset:
    """Read a dataset from its raw source with the catalog reader of its kind."""
    if spec.kind not in READERS:
        raise DataError(f"unknown dataset kind {spec.kind!r}; known: {', '.join(sorted(READERS))}")
    return READERS[spec.kind](spec)


def prepared_path(spec: DataSpec) -> Path:
    return Path(spec.data_dir) / spec.name


def prepare(spec: DataSpec) -> Path:
    """Materialise the dataset into ``data_dir/name`` in the canonical form."""
    return write_prepared(read_raw(spec), prepared_path(spec))


def load_dataset(
    spec: DataSpec, prepare_if_missing: bool = True, version: DataVersion | None = None
) -> Dataset:
    """The prepared dataset with its :class:`DataVersion` set.

    With ``version`` (handed from the driver to workers): exactly that version, read locally or
    through DVC, never re-prepared. Without: ``data_dir/name``, prepared when absent (preparing is
    deterministic, so the result matches dvc.lock when the recipe does); refused when it no longer
    matches what DVC recorded.
    """
    from scalelab.data.versioning import load_data_version, resolve_data_version

    if version is not None:
        return load_data_version(version, local=prepared_path(spec))
    path = prepared_path(spec)
    if not (path / "metadata.json").exists():
        if not prepare_if_missing:
            raise DataError(
                f"no prepared dataset at {path}; run `scalelab data prepare <recipe>` "
                f"(or `dvc pull {path}` where it is tracked by DVC)"
            )
        log.warning(
            "dataset %r is not prepared at %s: preparing it now from %s (kind %s). It is not "
            "versioned until `dvc add %s` and a `git commit` record it",
            spec.name,
            path,
            spec.source or "the built-in source",
            spec.kind,
            path,
        )
        prepare(spec)
    version = resolve_data_version(spec)
    data = read_prepared(path)
    data.version = version
    return data
