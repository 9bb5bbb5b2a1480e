"""Datasets as device-resident uint8 tensors, with batched on-device augmentation.

The whole split lives on the training device as one uint8 tensor (CIFAR-100's 45k training images are
138 MB). Each batch is gathered by index, augmented with a few batched tensor ops whose randomness is
drawn per sample from an explicit generator, and normalised on the device. No DataLoader workers and no
per-sample Python run in the hot loop.

On-disk formats are the standard ones: torchvision's ``cifar-100-python``/``cifar-10-batches-py`` folders
and the raw Fashion-MNIST idx files (``.gz`` or not), including Debian's ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from budgetnet.config import DataConfig, Shape

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DATA_DIR = Path("data")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, known without reading it (what the budget guard needs)."""

    name: str
    channels: int
    num_classes: int
    image_size: int
    train_size: int  # images in the official training split
    default_val: int  # default validation hold-out
    mean: tuple[float, ...]  # per-channel mean of the training split, in [0, 1]
    std: tuple[float, ...]

    @property
    def shape(self) -> Shape:
        return Shape(self.channels, self.num_classes, self.image_size)


DATASET_INFO: dict[str, DatasetInfo] = {
    "cifar100": DatasetInfo("cifar100", 3, 100, 32, 50_000, 5_000,
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cifar10": DatasetInfo("cifar10", 3, 10, 32, 50_000, 5_000,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "fashion_mnist": DatasetInfo("fashion_mnist", 1, 10, 28, 60_000, 5_000, (0.2860,), (0.3530,)),
    "synthetic": DatasetInfo("synthetic", 3, 10, 32, 2_400, 400, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class DatasetNotFound(Exception):
    """The dataset's files are not where they should be (a user mistake: one clear line)."""


@dataclass
class ImageSet:
    """Images (uint8, N x C x H x W) and labels (int64, N) on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DeviceData:
    """A dataset loaded for training: the train split, the validation split (None after merging), facts."""

    info: DatasetInfo
    classes: list[str]
    train: ImageSet
    val: ImageSet | None


# -- reading files ---------------------------------------------------------------------------------

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


def _fashion_files(prefix: str, data_dir: Path) -> tuple[Path, Path] | None:
    """Images and labels of one split, from the first folder that holds both (never mixed folders)."""
    for folder in (data_dir / "FashionMNIST" / "raw", data_dir / "fashion-mnist", data_dir, DEBIAN_FASHION_MNIST):
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


def read_split(name: str, data_dir: str | os.PathLike | None, train: bool, download: bool = False):
    """Read one official split as numpy arrays: (uint8 N x C x H x W, int64 N, class names)."""
    if name not in DATASET_INFO:
        raise DatasetNotFound(f"unknown dataset {name!r} (choose from {', '.join(DATASET_INFO)})")
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if name in _CIFAR_LAYOUT:
        return _load_cifar(name, data_dir, train, download)
    if name == "fashion_mnist":
        return _load_fashion_mnist(data_dir, train, download)
    return _make_synthetic(train)


def _to_device(images: np.ndarray, labels: np.ndarray, device: torch.device) -> ImageSet:
    # np.array copies: idx files are read into read-only buffers, which torch will not wrap.
    return ImageSet(torch.from_numpy(np.array(images, copy=True, order="C")).to(device),
                    torch.from_numpy(np.array(labels, copy=True)).to(device))


def load_data(cfg: DataConfig, data_dir=None, device: torch.device | str = "cpu", *,
              merge_val: bool = False, download: bool = False) -> DeviceData:
    """Load the training split onto ``device`` and hold out a seeded validation split.

    With ``merge_val`` the validation images are trained on too (the final phase) and ``val`` is None.
    The test split is never read here: only ``load_test`` (used by ``evaluate``) reads it.
    """
    info = DATASET_INFO[cfg.dataset]
    images, labels, classes = read_split(cfg.dataset, data_dir, train=True, download=download)
    n_val = info.default_val if cfg.val_size is None else cfg.val_size
    if not 0 <= n_val < len(labels):
        raise DatasetNotFound(f"val_size={n_val} must be smaller than the {len(labels)} training images")
    perm = np.random.default_rng(cfg.split_seed).permutation(len(labels))
    device = torch.device(device)
    if merge_val or n_val == 0:
        return DeviceData(info, classes, _to_device(images, labels, device), None)
    # val keeps the permutation's order, so any prefix of it is a random sample (train.EVAL_SUBSET).
    val_idx, train_idx = perm[:n_val], np.sort(perm[n_val:])
    return DeviceData(info, classes, _to_device(images[train_idx], labels[train_idx], device),
                      _to_device(images[val_idx], labels[val_idx], device))


def load_test(name: str, data_dir=None, device: torch.device | str = "cpu", download: bool = False):
    """The official test split on ``device`` and the class names."""
    images, labels, classes = read_split(name, data_dir, train=False, download=download)
    return _to_device(images, labels, torch.device(device)), classes


# -- on-device batch operations -----------------------------------------------------------------------

def augment(x: torch.Tensor, cfg: DataConfig, gen: torch.Generator) -> torch.Tensor:
    """Random translate (zero padding), horizontal flip and cutout on a uint8 batch, per-sample random.

    Every op is a batched tensor op on ``x``'s device; ``gen`` must live on that device.
    """
    b, ch, h, w = x.shape
    dev = x.device
    p = cfg.crop_padding
    if p or cfg.flip:
        # Translate and flip are one gather: each output pixel's flat index into the zero-padded image,
        # per sample, with the flip folded into the column index. (Four-tensor advanced indexing computes
        # the same thing ~5x slower on a CPU.)
        dy = torch.randint(0, 2 * p + 1, (b, 1), device=dev, generator=gen) if p else 0
        dx = torch.randint(0, 2 * p + 1, (b, 1), device=dev, generator=gen) if p else 0
        cols = torch.arange(w, device=dev).expand(b, w)
        if cfg.flip:
            flip = torch.rand(b, device=dev, generator=gen) < 0.5
            cols = torch.where(flip[:, None], cols.flip(1), cols)
        rows = torch.arange(h, device=dev) + dy  # B x H (or H without translation)
        index = (rows * (w + 2 * p))[..., :, None] + (cols + dx)[:, None, :]  # B x H x W
        padded = F.pad(x, (p, p, p, p)) if p else x
        x = padded.reshape(b, ch, -1).gather(2, index.reshape(b, 1, h * w).expand(b, ch, h * w)).view(b, ch, h, w)
    if cfg.cutout:
        c = cfg.cutout  # a c x c square whose top-left corner may lie outside the image (clipped)
        y0 = torch.randint(-(c // 2), h - c // 2, (b, 1), device=dev, generator=gen)
        x0 = torch.randint(-(c // 2), w - c // 2, (b, 1), device=dev, generator=gen)
        ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
        in_y = ((ys >= y0) & (ys < y0 + c))[:, :, None]  # B x H x 1
        in_x = ((xs >= x0) & (xs < x0 + c))[:, None, :]  # B x 1 x W
        x = x.masked_fill((in_y & in_x)[:, None], 0)
    return x


def train_batch(split: ImageSet, idx: torch.Tensor, cfg: DataConfig, gen: torch.Generator,
                normalize) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch from a device-resident split: rows ``idx``, augmented, normalised.

    The hot path of every training step (``budgetnet.train`` and ``scripts/bench_pipeline.py`` use it).
    ``index_select`` rather than ``images[idx]``: the same rows, ~8x faster on a CPU.
    """
    x = normalize(augment(split.images.index_select(0, idx), cfg, gen))
    return x, split.labels.index_select(0, idx)


def normalizer(info: DatasetInfo, device: torch.device | str,
               memory_format: torch.memory_format = torch.contiguous_format):
    """Return ``fn(uint8 batch) -> float32 normalised batch`` in ``memory_format``.

    One float copy, then an in-place multiply and add on it (no further temporaries), then the layout
    change, if any, on the float result. On a CPU this is ~1.5x faster than ``addcmul`` followed by a
    channels_last copy; the input is never modified.
    """
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    scale = 1.0 / (255.0 * std)
    shift = -torch.tensor(info.mean, device=device).view(1, -1, 1, 1) / std

    def normalize(x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32, copy=True).mul_(scale).add_(shift)
        return y.contiguous(memory_format=memory_format)

    return normalize
