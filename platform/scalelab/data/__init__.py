"""Datasets: catalog, canonical prepared form, versions, loaders."""

from scalelab.data.catalog import load_dataset, prepare, prepared_path, read_raw
from scalelab.data.dataset import Dataset, DataVersion, Split, read_prepared, write_prepared
from scalelab.data.loader import TensorLoader
from scalelab.data.versioning import load_data_version, resolve_data_version

__all__ = [
    "DataVersion",
    "Dataset",
    "Split",
    "TensorLoader",
    "load_data_version",
    "load_dataset",
    "prepare",
    "prepared_path",
    "read_prepared",
    "read_raw",
    "resolve_data_version",
    "write_prepared",
]
