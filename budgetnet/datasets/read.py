"""The one place that picks a dataset's reader: built-in by name, or an image folder (``folder:PATH``)."""

from __future__ import annotations

import os

from budgetnet.config import is_folder
from budgetnet.datasets.builtin import read_builtin_split
from budgetnet.datasets.folder import folder_info, load_folder_split, read_folder_split
from budgetnet.datasets.info import DATASET_INFO, DatasetInfo, unknown_dataset


def dataset_info(name: str, image_size: int | None = None) -> DatasetInfo:
    """Shape and normalisation of a dataset: static for the built-in ones; for ``folder:PATH``, read from
    its cache (scanned and decoded first when the cache is missing or stale), at ``image_size`` px."""
    if is_folder(name):
        return folder_info(name, image_size)
    if name not in DATASET_INFO:
        raise unknown_dataset(name)
    return DATASET_INFO[name]


def read_split(name: str, data_dir: str | os.PathLike | None, train: bool, download: bool = False,
               image_size: int | None = None):
    """Read one official split as numpy arrays: (uint8 N x C x H x W, int64 N, class names). ``image_size``
    is a folder dataset's side in pixels (built-in datasets have their own)."""
    if is_folder(name):
        return read_folder_split(name, train, image_size)
    if name not in DATASET_INFO:
        raise unknown_dataset(name)
    return read_builtin_split(name, data_dir, train, download)


def read_split_and_info(name: str, data_dir: str | os.PathLike | None, train: bool, download: bool = False,
                        image_size: int | None = None):
    """``read_split`` and ``dataset_info`` together: (images, labels, class names, info). A folder is
    scanned once for both."""
    if is_folder(name):
        return load_folder_split(name, train, image_size)
    info = dataset_info(name, image_size)
    return (*read_split(name, data_dir, train, download, image_size), info)
