"""Datasets in their official formats, own images (folders, tars) as lazy or cached sources, and
augmentations as batched tensor ops on the device."""

from probssl.data.datasets import (
    DATASETS,
    DatasetError,
    DatasetInfo,
    ImageDataset,
    dataset_names,
    default_data_dir,
    get_dataset_info,
    load_dataset,
    load_image_folder,
)
from probssl.data.resolve import (
    decoded_nbytes,
    load_source,
    open_source,
    resolve_dataset_info,
    skipped_items,
)
from probssl.data.sources import ArraySource, ImageSource
from probssl.data.views import PRESETS, MultiViewAugment, ViewConfig, preset_for_dataset, to_float

__all__ = [
    "ArraySource",
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
    "load_image_folder",
    "load_source",
    "open_source",
    "preset_for_dataset",
    "resolve_dataset_info",
    "skipped_items",
    "to_float",
]
