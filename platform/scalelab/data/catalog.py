"""Dataset catalog: each kind reads raw data into a :class:`Dataset` with seeded splits."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from scalelab.config.specs import DataSpec
from scalelab.data.dataset import (
    Dataset,
    DataVersion,
    Split,
    read_prepared,
    stratified_split,
    write_prepared,
)
from scalelab.errors import DataError

log = logging.getLogger("scalelab.data")

_READERS: dict[str, Callable[[DataSpec], Dataset]] = {}


def register_reader(kind: str):
    def deco(fn: Callable[[DataSpec], Dataset]) -> Callable[[DataSpec], Dataset]:
        _READERS[kind] = fn
        return fn

    return deco


def split_arrays(
    spec: DataSpec, x: np.ndarray, y: np.ndarray, test: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, Split]:
    """Seeded stratified train/val/test split; a dataset's own test split is kept when given."""
    if len(x) != len(y):
        raise DataError(f"{len(x)} images but {len(y)} labels: x and y lengths must match")
    if len(np.unique(y)) < 2:
        raise DataError(f"dataset {spec.name!r} has a single class; classification needs at least two")
    if test is None:
        fractions = (spec.test_fraction, spec.val_fraction)
        test_idx, val_idx, train_idx = stratified_split(y, fractions, spec.split_seed)
        test = (x[test_idx], y[test_idx])
    else:
        val_idx, train_idx = stratified_split(y, (spec.val_fraction,), spec.split_seed)
    return {
        "train": Split(x[train_idx], y[train_idx]),
        "val": Split(x[val_idx], y[val_idx]),
        "test": Split(*test),
    }


@register_reader("digits")
def read_digits(spec: DataSpec) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 16 grey levels scaled to 0-255)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    y = bunch.target.astype(np.int64)
    return Dataset(
        name=spec.name, splits=split_arrays(spec, x, y), classes=[str(c) for c in range(10)], hflip_ok=False
    )


def read_raw(spec: DataSpec) -> Dataset:
    """Read a dataset from its raw source with the catalog reader of its kind."""
    from scalelab.data import sources  # noqa: F401  (registers the other readers)

    if spec.kind not in _READERS:
        raise DataError(f"unknown dataset kind {spec.kind!r}; known: {', '.join(sorted(_READERS))}")
    return _READERS[spec.kind](spec)


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
