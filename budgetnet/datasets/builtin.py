"""The built-in datasets in their standard on-disk formats: CIFAR pickles, Fashion-MNIST idx, synthetic.

CIFAR is torchvision's ``cifar-100-python``/``cifar-10-batches-py`` folders; Fashion-MNIST the raw idx
files (``.gz`` or not), also Debian's ``dataset-fashion-mnist``; synthetic is generated.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path

import numpy as np

from budgetnet.datasets.info import DATASET_INFO, FASHION_MNIST_CLASSES, DatasetNotFound

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DATA_DIR = Path("data")


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python format is a pickle; allow only what it contains (numpy arrays), nothing callable."""

    _ALLOWED = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                          ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
                          ("numpy._core.numeric", "_frombuffer")})

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden object in CIFAR file: {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _CifarUnpickler(f, encoding="latin1").load()


_CIFAR_LAYOUT = {  # folder, train files, test files, meta file, label key, class-name key
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names"),
}


def _missing(name: str, where: str, data_dir: Path) -> DatasetNotFound:
    return DatasetNotFound(
        f"{name} not found: expected {where} under --data-dir {data_dir} "
        f"(pass --data-dir DIR pointing at the folder that holds it, let --download fetch it where a network exists, "
        f"or --dataset synthetic for a smoke run)"
    )


def _load_cifar(name: str, data_dir: Path, train: bool, download: bool):
    folder, train_files, test_files, meta, label_key, names_key = _CIFAR_LAYOUT[name]
    root = data_dir / folder
    files = [root / f for f in (train_files if train else test_files)] + [root / meta]
    if not all(f.exists() for f in files) and download:
        _download_cifar(name, data_dir)
    if not all(f.exists() for f in files):
        raise _missing(name, f"{folder}/ (torchvision's CIFAR layout)", data_dir)
    try:
        parts = [_read_cifar_pickle(f) for f in files[:-1]]
        classes = list(_read_cifar_pickle(files[-1])[names_key])
        images = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(p[label_key], dtype=np.int64) for p in parts])
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
            raise ValueError(f"labels run from {labels.min()} to {labels.max()}, for {len(classes)} classes")
    except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise DatasetNotFound(f"{name} files under {root} are unreadable or corrupt: {e}") from None
    return images, labels, classes


def _download_cifar(name: str, data_dir: Path) -> None:
    """Fetch through torchvision (which verifies checksums). Offline, this fails fast and we report it."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR100 if name == "cifar100" else CIFAR10
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(data_dir), train=train, download=True)
    except Exception as e:  # noqa: BLE001 - no network, proxy, disk: all end in the one "not found" message
        folder = _CIFAR_LAYOUT[name][0]
        raise DatasetNotFound(f"{name} not found and not downloadable ({type(e).__name__}: {e}): expected "
                              f"{folder}/ (torchvision's CIFAR layout) under --data-dir {data_dir}; pass --data-dir "
                              f"DIR pointing at the folder that holds it, or --dataset synthetic for a smoke "
                              f"run") from None


def _read_idx(path: Path) -> np.ndarray:
    """The MNIST idx format: big-endian magic (type, ndim), ndim big-endian sizes, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetNotFound(f"{path} is unreadable or truncated ({type(e).__name__}: {e})") from None
    if len(data) < 4 or data[0] or data[1] or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise DatasetNotFound(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetNotFound(f"{path} is truncated inside its header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected, found = int(np.prod(shape)), len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise DatasetNotFound(f"{path} is {what}: expected {expected} values, found {found}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def builtin_locations(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """The folders a built-in dataset is looked for in, in order (none for synthetic: it is generated)."""
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if name in _CIFAR_LAYOUT:
        return [data_dir / _CIFAR_LAYOUT[name][0]]
    if name == "fashion_mnist":
        return [data_dir / "FashionMNIST" / "raw", data_dir / "fashion-mnist", data_dir, DEBIAN_FASHION_MNIST]
    return []


def builtin_found(name: str, data_dir: str | os.PathLike | None) -> Path | None:
    """The folder of ``builtin_locations`` that holds a built-in dataset's training files, or None."""
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if name in _CIFAR_LAYOUT:
        folder, train_files, _, meta, *_ = _CIFAR_LAYOUT[name]
        found = all((data_dir / folder / f).is_file() for f in [*train_files, meta])
        return data_dir / folder if found else None
    if name == "fashion_mnist":
        try:
            files = _fashion_files("train", data_dir)
        except DatasetNotFound:  # half a split: not usable
            return None
        return files[0].parent if files else None
    return None


def _fashion_files(prefix: str, data_dir: Path) -> tuple[Path, Path] | None:
    """Images and labels of one split, from the first folder that holds both (never mixed folders)."""
    for folder in builtin_locations("fashion_mnist", data_dir):
        pair = []
        for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
            found = [folder / n for n in (stem, stem + ".gz") if (folder / n).exists()]
            pair.append(found[0] if found else None)
        if None not in pair:
            return pair[0], pair[1]
        if pair != [None, None]:  # half a split: say so rather than borrow the other half elsewhere
            have = pair[0] or pair[1]
            raise DatasetNotFound(f"{folder} holds {have.name} but not its "
                                  f"{'labels' if pair[0] else 'images'} file")
    return None


def _load_fashion_mnist(data_dir: Path, train: bool, download: bool):
    prefix = "train" if train else "t10k"
    paths = _fashion_files(prefix, data_dir)
    if paths is None and download:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(data_dir), train=train, download=True)
        except Exception as e:  # noqa: BLE001 - offline, proxy, disk: one "could not download" message
            raise DatasetNotFound(f"fashion_mnist could not be downloaded into {data_dir} ({e})") from None
        paths = _fashion_files(prefix, data_dir)
    if paths is None:
        raise _missing("fashion_mnist", f"FashionMNIST/raw/{prefix}-*-ubyte[.gz] (or {DEBIAN_FASHION_MNIST}, "
                       f"from Debian's dataset-fashion-mnist)", data_dir)
    images, labels = _read_idx(paths[0]), _read_idx(paths[1]).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetNotFound(f"{paths[0]} and {paths[1]} do not match: {images.shape} images, "
                              f"{labels.shape} labels")
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(FASHION_MNIST_CLASSES):
        raise DatasetNotFound(f"{paths[1]} is corrupt: labels run from {labels.min()} to {labels.max()}, for "
                              f"{len(FASHION_MNIST_CLASSES)} classes")
    return images[:, None], labels, list(FASHION_MNIST_CLASSES)


def _make_synthetic(train: bool):
    """A learnable 10-class task: a smooth random template per class, randomly shifted, plus noise.

    Fixed seed, so every process sees the same images; the test split uses different noise and shifts.
    """
    info = DATASET_INFO["synthetic"]
    templates = np.random.default_rng(1234).normal(0, 1, (info.num_classes, 3, 4, 4))
    templates = np.kron(templates, np.ones((1, 1, 8, 8)))  # 4x4 blocks -> 32x32, low frequency
    rng = np.random.default_rng(1 if train else 2)
    n = info.train_size if train else 600
    labels = rng.integers(0, info.num_classes, n)
    shifts = rng.integers(-3, 4, (n, 2))
    images = np.empty((n, 3, 32, 32), dtype=np.float32)
    for i in range(n):  # data generation, not the hot loop
        images[i] = np.roll(templates[labels[i]], tuple(shifts[i]), axis=(1, 2))
    images = images * 0.6 + rng.normal(0, 1.0, images.shape)
    images = np.clip(128 + 40 * images, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64), [f"class{i}" for i in range(info.num_classes)]


def read_builtin_split(name: str, data_dir: str | os.PathLike | None, train: bool, download: bool = False):
    """One official split of a built-in dataset: (uint8 N x C x H x W, int64 N, class names)."""
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if name in _CIFAR_LAYOUT:
        return _load_cifar(name, data_dir, train, download)
    if name == "fashion_mnist":
        return _load_fashion_mnist(data_dir, train, download)
    return _make_synthetic(train)
