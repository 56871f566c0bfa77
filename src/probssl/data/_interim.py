"""INTERIM (removed when h/data is merged): the data layer's API over the built-in datasets only."""

from __future__ import annotations

from probssl.data.datasets import DatasetInfo, ImageDataset, get_dataset_info
from probssl.data.datasets import load_dataset as _load_builtin
from probssl.data.sources import ArraySource


def open_source(
    dataset, split, *, data_dir=None, image_size=None, download=True, verify=True, skip_corrupt=False
):
    d = _load_builtin(dataset, split, data_dir, download)
    return ArraySource(d.images, d.labels, d.classes, d.name, d.split)


def resolve_dataset_info(dataset, *, data_dir=None, image_size=None, verify=True) -> DatasetInfo:
    return get_dataset_info(dataset)


def load_dataset(
    name,
    split,
    data_dir=None,
    download=True,
    *,
    image_size=None,
    verify=True,
    skip_corrupt=False,
    cache_dir=None,
) -> ImageDataset:
    return _load_builtin(name, split, data_dir, download)
