"""Datasets on the training device: uint8 splits, batched on-device augmentation and normalisation.

Each batch is one ``index_select`` of augmented rows, drawn from an explicit generator: no DataLoader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from budgetnet.config import DataConfig
from budgetnet.datasets.info import DatasetInfo, DatasetNotFound
from budgetnet.datasets.read import read_split, read_split_and_info


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
    images, labels, classes, info = read_split_and_info(cfg.dataset, data_dir, train=True, download=download,
                                                        image_size=cfg.image_size)
    n_val = info.default_val if cfg.val_size is None else cfg.val_size
    if not 0 <= n_val < len(labels):
        raise DatasetNotFound(f"val_size={n_val} must be smaller than the {len(labels)} training images")
    perm = np.random.default_rng(cfg.split_seed).permutation(len(labels))
    device = torch.device(device)
    if merge_val or n_val == 0:
        return DeviceData(info, classes, _to_device(images, labels, device), None)
    # val keeps the permutation's order, so any prefix of it is a random sample (config.EVAL_SUBSET).
    val_idx, train_idx = perm[:n_val], np.sort(perm[n_val:])
    return DeviceData(info, classes, _to_device(images[train_idx], labels[train_idx], device),
                      _to_device(images[val_idx], labels[val_idx], device))


def merged(data: DeviceData) -> DeviceData:
    """``data``'s train and validation splits as one training split, on their device: what ``load_data``
    gives with ``merge_val``, in another order, without reading the disk again."""
    if data.val is None:
        return data
    images = torch.cat([data.train.images, data.val.images]).contiguous(memory_format=torch.channels_last)
    return DeviceData(data.info, data.classes, ImageSet(images, torch.cat([data.train.labels, data.val.labels])), None)


def load_test(name: str, data_dir=None, device: torch.device | str = "cpu", download: bool = False,
              image_size: int | None = None, *, train: bool = False):
    """The official test split on ``device`` and the class names; ``train``: the whole training split
    instead, for a reader of images that trains nothing (export's checks and int8 calibration)."""
    images, labels, classes = read_split(name, data_dir, train=train, download=download, image_size=image_size)
    return _to_device(images, labels, torch.device(device)), classes


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601: RGB to luminance
CONFORM_CHUNK = 4096  # images converted at once (bounds the float copy)


def conform_images(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """uint8 N x C x H x W images as a net of ``channels`` input channels and ``size`` px sides takes them
    (the one rule of fine-tuning on other data): grayscale repeated into RGB, RGB to luminance (BT.601),
    sides resized bilinearly with antialiasing; uint8, channels_last. Images that already fit come back
    as they are. Raises ValueError for channel counts other than 1 and 3."""
    n, c, h, w = images.shape
    if c == channels and h == w == size:
        return images
    if c != channels and {c, channels} != {1, 3}:
        raise ValueError(f"cannot turn {c}-channel images into {channels}-channel ones (only grayscale <-> RGB)")
    out = torch.empty((n, channels, size, size), dtype=torch.uint8, device=images.device)
    luma = torch.tensor(LUMA, device=images.device).view(1, 3, 1, 1)
    for i in range(0, n, CONFORM_CHUNK):
        x = images[i:i + CONFORM_CHUNK].float()
        if c == 3 and channels == 1:
            x = (x * luma).sum(1, keepdim=True)
        if (h, w) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + CONFORM_CHUNK] = x.round_().clamp_(0, 255).to(torch.uint8).expand(-1, channels, -1, -1)
    return out.contiguous(memory_format=torch.channels_last)


# -- on-device batch operations -----------------------------------------------------------------------

class Augmenter:
    """Random translate (zero padding) and horizontal flip, then cutout, for rows of one uint8 image set.

    It keeps the images in NHWC order, zero-padded by ``padding``, with a flipped copy beside them when
    ``flip`` is on. Each output row (W x C values) is one contiguous run of that store at a random
    offset, so a batch is a single ``index_select`` of rows, not a per-pixel gather. Flipping the padded
    image before cropping at ``dx`` is cropping at ``2p - dx`` and flipping: the same distribution.

    One store serves every ``DataConfig`` with ``crop_padding <= padding`` and, if it holds the flipped
    copy, either ``flip``: a search's trials share it. Offsets, flips and cutout squares are drawn per
    sample from ``gen`` on the images' device, in the same order whatever the store. The output is uint8
    N x C x H x W, channels_last in memory.
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

    It works on the batch's NHWC rows (contiguous for channels_last batches), with the per-channel scale
    and shift tiled along a row: one float copy, then an in-place multiply and add. Per-channel
    broadcasting in channels_last memory would run an inner loop of only C elements.
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
