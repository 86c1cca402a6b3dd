"""Data: sources (synthetic, REFUGE, folder), the prepared zarr store and the torch dataset.

The torch-dependent names (``SegClsDataset``, ``worker_init_fn``, ``build_augmentation``) are
imported on first use so that ``prepare`` and the store reader do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uml.data.importers import FolderSource, RefugeSource, folder_source, refuge_source
from uml.data.prepare import open_source, prepare
from uml.data.records import FUNDUS_CLASS_NAMES, FUNDUS_MASK_CLASSES, FUNDUS_POSITIVE_CLASS, Record, RecordSource
from uml.data.store import (
    SPLIT_NAMES,
    PreparedData,
    SplitReader,
    compute_content_hash,
    load_split,
    open_prepared,
    split_indices,
    write_dataset,
)
from uml.data.synthetic import SyntheticSample, SyntheticSource, generate_sample

if TYPE_CHECKING:
    from uml.data.dataset import SegClsDataset, build_augmentation, worker_init_fn

_LAZY = {"SegClsDataset", "worker_init_fn", "build_augmentation"}

__all__ = [
    "FUNDUS_CLASS_NAMES",
    "FUNDUS_POSITIVE_CLASS",
    "FUNDUS_MASK_CLASSES",
    "SPLIT_NAMES",
    "FolderSource",
    "PreparedData",
    "Record",
    "RecordSource",
    "RefugeSource",
    "SegClsDataset",
    "SplitReader",
    "SyntheticSample",
    "SyntheticSource",
    "build_augmentation",
    "compute_content_hash",
    "folder_source",
    "generate_sample",
    "load_split",
    "open_prepared",
    "open_source",
    "prepare",
    "refuge_source",
    "split_indices",
    "worker_init_fn",
    "write_dataset",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from uml.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'uml.data' has no attribute {name!r}")
