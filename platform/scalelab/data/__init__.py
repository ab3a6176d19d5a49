"""Datasets: catalog, canonical prepared form, versions, loaders."""

from scalelab.data.catalog import load_dataset, prepare, prepared_path, read_raw
from scalelab.data.dataset import Dataset, DataVersion, Split, read_prepared, write_prepared
from scalelab.data.loader import TensorLoader

__all__ = [
    "DataVersion",
    "Dataset",
    "Split",
    "TensorLoader",
    "load_dataset",
    "prepare",
    "prepared_path",
    "read_prepared",
    "read_raw",
    "write_prepared",
]
