"""Datasets as device-resident uint8 tensors, with batched on-device augmentation.

The whole split lives on the training device as one uint8 tensor (CIFAR-100's 45k training images are
138 MB), channels_last in memory. Each batch is one ``index_select`` of translated, maybe flipped image
rows from a padded copy of the split (``Augmenter``), with the randomness drawn per sample from an
explicit generator, then cutout and normalisation, all on the device. No DataLoader workers and no
per-sample Python run in the hot loop.

On-disk formats are the standard ones: torchvision's ``cifar-100-python``/``cifar-10-batches-py`` folders
and the raw Fashion-MNIST idx files (``.gz`` or not), including Debian's ``dataset-fashion-mnist``; and
image folders in torchvision's ``ImageFolder`` layout (``folder:PATH``, decoded and cached by
``budgetnet.folder``). ``dataset_info`` gives any of them's shape and normalisation.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from budgetnet.config import DataConfig, Shape, is_folder

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


def dataset_info(name: str, image_size: int | None = None) -> DatasetInfo:
    """Shape and normalisation of a dataset: static for the built-in ones; for ``folder:PATH``, read from
    its cache (scanned and decoded first when the cache is missing or stale), at ``image_size`` px."""
    if is_folder(name):
        from budgetnet.folder import folder_info

        return folder_info(name, image_size)
    if name not in DATASET_INFO:
        raise DatasetNotFound(f"unknown dataset {name!r} (choose from {', '.join(DATASET_INFO)} or folder:PATH)")
    return DATASET_INFO[name]


@dataclass
class ImageSet:
    """Images (uint8, N x C x H x W; channels_last in memory when loaded) and labels (int64, N) on one
    device."""

    images: torch.Tensor
    labels: torch.Tensor
    _augmenter: Augmenter | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def augmenter(self, cfg: DataConfig) -> Augmenter:
        """An ``Augmenter`` of this set that serves ``cfg``. It is kept: the next run whose padding and
        flip it covers reuses it; otherwise it is replaced by one that covers both the old and the new
        (the largest padding, flip if either flips), so a search builds at most a few."""
        a = self._augmenter
        if a is None or not a.serves(cfg):
            padding = max(cfg.crop_padding, a.padding if a else 0)
            flip = cfg.flip or (a.flip if a else False)
            self._augmenter = a = None  # free the old store before the new one is allocated
            a = self._augmenter = Augmenter(self.images, padding, flip)
        return a


@dataclass
class DeviceData:
    """A dataset loaded for training: the train split, the validation split (None after merging), facts."""

    info: DatasetInfo
    classes: list[str]
    train: ImageSet
    val: ImageSet | None

    def to(self, device: torch.device | str) -> DeviceData:
        """The same splits on ``device``, without their augmenters' stores: what the Ray backend ships to its
        trials once (on the CPU, through Ray's object store) and each trial moves to its own device."""
        def move(s: ImageSet | None) -> ImageSet | None:
            return None if s is None else ImageSet(s.images.to(device), s.labels.to(device))

        return DeviceData(self.info, self.classes, move(self.train), move(self.val))


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


def read_split(name: str, data_dir: str | os.PathLike | None, train: bool, download: bool = False,
               image_size: int | None = None):
    """Read one official split as numpy arrays: (uint8 N x C x H x W, int64 N, class names). ``image_size``
    is a folder dataset's side in pixels (built-in datasets have their own)."""
    if is_folder(name):
        from budgetnet.folder import read_folder_split

        return read_folder_split(name, train, image_size)
    if name not in DATASET_INFO:
        raise DatasetNotFound(f"unknown dataset {name!r} (choose from {', '.join(DATASET_INFO)} or folder:PATH)")
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if name in _CIFAR_LAYOUT:
        return _load_cifar(name, data_dir, train, download)
    if name == "fashion_mnist":
        return _load_fashion_mnist(data_dir, train, download)
    return _make_synthetic(train)


def _to_device(images: np.ndarray, labels: np.ndarray, device: torch.device) -> ImageSet:
    # np.array copies: idx files are read into read-only buffers, which torch will not wrap.
    # channels_last (NHWC memory): ``normalizer`` and ``Augmenter`` read rows of W x C values.
    return ImageSet(torch.from_numpy(np.array(images, copy=True, order="C")).to(device)
                    .contiguous(memory_format=torch.channels_last),
                    torch.from_numpy(np.array(labels, copy=True)).to(device))


def load_data(cfg: DataConfig, data_dir=None, device: torch.device | str = "cpu", *,
              merge_val: bool = False, download: bool = False) -> DeviceData:
    """Load the training split onto ``device`` and hold out a seeded validation split.

    With ``merge_val`` the validation images are trained on too (the final phase) and ``val`` is None.
    The test split is never read here: only ``load_test`` (used by ``evaluate``) reads it.
    """
    if is_folder(cfg.dataset):  # the info and the split from one scan of the folder's files
        from budgetnet.folder import load_folder_split

        images, labels, classes, info = load_folder_split(cfg.dataset, True, cfg.image_size)
    else:
        info = dataset_info(cfg.dataset, cfg.image_size)
        images, labels, classes = read_split(cfg.dataset, data_dir, train=True, download=download,
                                             image_size=cfg.image_size)
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


def load_test(name: str, data_dir=None, device: torch.device | str = "cpu", download: bool = False,
              image_size: int | None = None):
    """The official test split on ``device`` and the class names."""
    images, labels, classes = read_split(name, data_dir, train=False, download=download, image_size=image_size)
    return _to_device(images, labels, torch.device(device)), classes


# -- on-device batch operations -----------------------------------------------------------------------

class Augmenter:
    """Random translate (zero padding) and horizontal flip, then cutout, for rows of one uint8 image set.

    It keeps a copy of the images in NHWC order, zero-padded by ``padding`` on every side, and a
    horizontally flipped copy next to it when ``flip`` is on (for CIFAR's 45k training images, padding 4
    and flip, 432 MB). Every output row of a batch (W pixels x C channels, contiguous) is then one
    contiguous run of that store, starting at a per-sample random offset: a translated, maybe flipped row.
    So a whole batch is a single ``index_select`` of rows from a window view of the store, not a
    per-pixel gather: on a CPU core that is ~10x less work than gathering every byte, and on a GPU it is
    one coalesced copy. Flipping the padded image before cropping it at offset ``dx`` is cropping at
    ``2p - dx`` and flipping; the offsets are uniform, so the distribution is the same.

    One store serves every ``DataConfig`` with ``crop_padding <= padding`` (offsets are drawn around the
    centre) and, if it holds the flipped copy, with either ``flip``: the trials of a search share it.
    The randomness (offsets, flips, cutout squares) is drawn per sample from ``gen``, on the images'
    device, in the same order whatever the store. The output is uint8 N x C x H x W in channels_last
    memory (what ``normalizer`` reads fastest).
    """

    def __init__(self, images: torch.Tensor, padding: int, flip: bool):
        n, c, h, w = images.shape
        self.n, self.padding, self.flip = n, padding, flip
        nhwc = images.permute(0, 2, 3, 1)  # a view when ``images`` are channels_last
        p = padding
        if p or flip:
            store = images.new_zeros(2 if flip else 1, n, h + 2 * p, w + 2 * p, c)
            store[0, :, p:p + h, p:p + w] = nhwc
            if flip:
                store[1, :, p:p + h, p:p + w] = nhwc.flip(2)
        else:
            store = nhwc.contiguous()
        # window k: the w * c bytes from pixel k on; overlapping, read-only, no copy
        self.windows = store.reshape(-1).unfold(0, w * c, c)
        self.shape = (c, h, w)

    def serves(self, cfg: DataConfig) -> bool:
        return cfg.crop_padding <= self.padding and (self.flip or not cfg.flip)

    def __call__(self, idx: torch.Tensor, gen: torch.Generator, cfg: DataConfig) -> torch.Tensor:
        """Rows ``idx`` of the image set with ``cfg``'s augmentation: uint8 len(idx) x C x H x W
        (channels_last)."""
        if not self.serves(cfg):
            raise ValueError(f"this store (padding {self.padding}, flip {self.flip}) cannot serve "
                             f"crop_padding={cfg.crop_padding}, flip={cfg.flip}")
        c, h, w = self.shape
        p, big, b, dev = cfg.crop_padding, self.padding, idx.numel(), idx.device
        hp, wp = h + 2 * big, w + 2 * big
        # offsets into the store's padding: big - p .. big + p (the unshifted image sits at big, big)
        dy = torch.randint(big - p, big + p + 1, (b, 1), device=dev, generator=gen) if p else big
        dx = torch.randint(big - p, big + p + 1, (b, 1), device=dev, generator=gen) if p else big
        image = idx[:, None]
        if cfg.flip:  # flipped copies follow the n originals in the store
            image = image + self.n * (torch.rand(b, 1, device=dev, generator=gen) < 0.5)
        start = ((image * hp + torch.arange(h, device=dev) + dy) * wp + dx).view(-1)  # b*h row starts
        x = self.windows.index_select(0, start).view(b, h, w, c).permute(0, 3, 1, 2)
        if cfg.cutout:  # a c x c square whose top-left corner may lie outside the image (clipped)
            k = cfg.cutout
            y0 = torch.randint(-(k // 2), h - k // 2, (b, 1), device=dev, generator=gen)
            x0 = torch.randint(-(k // 2), w - k // 2, (b, 1), device=dev, generator=gen)
            ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
            in_y = ((ys >= y0) & (ys < y0 + k))[:, :, None]  # B x H x 1
            in_x = ((xs >= x0) & (xs < x0 + k))[:, None, :]  # B x 1 x W
            x.masked_fill_((in_y & in_x)[:, None], 0)
        return x


def augment(x: torch.Tensor, cfg: DataConfig, gen: torch.Generator) -> torch.Tensor:
    """``cfg``'s augmentation of one uint8 batch (an ``Augmenter`` over just these images)."""
    return Augmenter(x, cfg.crop_padding, cfg.flip)(torch.arange(len(x), device=x.device), gen, cfg)


def train_batches(split: ImageSet, cfg: DataConfig, normalize):
    """Return ``batch(idx, gen) -> (x, y)``: rows ``idx`` of ``split``, augmented and normalised, and
    their labels. The hot path of every training step (``budgetnet.train`` and
    ``scripts/bench_pipeline.py`` use it); the split's ``Augmenter`` is built here, once per run.
    """
    aug = split.augmenter(cfg)

    def batch(idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(aug(idx, gen, cfg)), split.labels.index_select(0, idx)

    return batch


def normalizer(info: DatasetInfo, device: torch.device | str,
               memory_format: torch.memory_format = torch.contiguous_format):
    """Return ``fn(uint8 batch) -> float32 normalised batch`` in ``memory_format``; the input is never
    modified.

    It works on the batch's NHWC rows (W x C values each, contiguous when the batch is channels_last, as
    resident sets and ``Augmenter`` batches are), with the per-channel scale and shift tiled along a row:
    one float copy and an in-place multiply and add, each over contiguous memory. Per-channel broadcasting
    in channels_last memory has an inner loop of C = 3 elements, which is ~3x slower on a CPU.
    """
    std = torch.tensor(info.std, device=device)
    scale = 1.0 / (255.0 * std)
    shift = -torch.tensor(info.mean, device=device) / std
    tiled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # by image width

    def normalize(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if w not in tiled:
            tiled[w] = scale.repeat(w), shift.repeat(w)
        s, t = tiled[w]
        rows = x.permute(0, 2, 3, 1).reshape(b * h, w * c)  # a view when x is channels_last
        y = rows.to(torch.float32, copy=True).mul_(s).add_(t)
        return y.view(b, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)

    return normalize
