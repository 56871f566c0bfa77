"""Datasets in their official formats, own images (folders, tars) as lazy or cached sources, and
augmentations as batched tensor ops on the device.

Rooms, from the bottom up: ``catalog`` (every registered dataset and every fact about it, the shared
types); the readers (``official_files`` for the official formats, ``registered_folders`` for the
registered tars, ``file_source`` / ``image_folder`` / ``tar_reader`` / ``image_scan`` /
``decode_cache`` for own images); ``resolve`` (what a ``--dataset`` string names: ``open_source``,
``load_dataset``); and on top ``shift_sets`` (OOD / transfer sets), ``pipeline`` and ``views``.
"""

from probssl.data.catalog import (
    CATALOG,
    DATASETS,
    CatalogEntry,
    DatasetError,
    DatasetInfo,
    ImageDataset,
    dataset_names,
    default_data_dir,
    get_dataset_info,
)
from probssl.data.resolve import (
    decoded_nbytes,
    load_dataset,
    load_source,
    open_source,
    resolve_dataset_info,
    skipped_items,
)
from probssl.data.sources import ArraySource, ImageSource
from probssl.data.views import PRESETS, MultiViewAugment, ViewConfig, preset_for_dataset, to_float

__all__ = [
    "ArraySource",
    "CATALOG",
    "CatalogEntry",
    "DATASETS",
    "PRESETS",
    "DatasetError",
    "DatasetInfo",
    "ImageDataset",
    "MultiViewAugment",
    "ViewConfig",
    "dataset_names",
    "default_data_dir",
    "decoded_nbytes",
    "get_dataset_info",
    "ImageSource",
    "load_dataset",
    "load_source",
    "open_source",
    "preset_for_dataset",
    "resolve_dataset_info",
    "skipped_items",
    "to_float",
]
