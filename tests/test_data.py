"""Data: on-device augmentation, normalisation, splits, and reading the standard on-disk formats."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from conftest import idx_bytes, write_cifar10, write_cifar100, write_fashion_mnist, write_idx

import budgetnet.datasets.builtin as bd
from budgetnet.config import DataConfig
from budgetnet.data import augment, load_data, load_test, normalizer, train_batches
from budgetnet.datasets.info import DATASET_INFO, FASHION_MNIST_CLASSES, DatasetNotFound
from budgetnet.datasets.read import read_split

OFF = DataConfig(crop_padding=0, flip=False, cutout=0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(n: int, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=gen(seed))


def copies(n: int, c: int = 3, size: int = 32) -> torch.Tensor:
    """n copies of one asymmetric random image (values 1..255: zero marks padding and cutout)."""
    img = torch.randint(1, 256, (1, c, size, size), dtype=torch.uint8, generator=gen(123))
    return img.expand(n, -1, -1, -1).contiguous()


# -- augment ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    DataConfig(), OFF, DataConfig(crop_padding=2, flip=False, cutout=8), DataConfig(crop_padding=0, cutout=5),
], ids=["default", "off", "crop+cutout", "flip+cutout"])
@pytest.mark.parametrize("c, size", [(3, 32), (1, 28)])
def test_augment_keeps_shape_dtype_device(cfg, c, size):
    x = random_images(8, c, size)
    out = augment(x, cfg, gen())
    assert out.shape == x.shape
    assert out.dtype == torch.uint8
    assert out.device == x.device


def test_augment_off_is_identity():
    x = random_images(8)
    assert torch.equal(augment(x, OFF, gen()), x)


def test_augment_does_not_modify_input():
    x = random_images(16)
    before = x.clone()
    augment(x, DataConfig(cutout=8), gen())
    assert torch.equal(x, before)


def test_augment_varies_per_sample():
    x = copies(64)
    out = augment(x, DataConfig(), gen())
    distinct = {bytes(o.numpy().tobytes()) for o in out}
    assert len(distinct) > 16  # 81 translations x 2 flips: identical inputs come out different
    assert not torch.equal(out[0], out[1]) or not torch.equal(out[1], out[2])


def test_augment_is_reproducible_with_the_generator():
    x = random_images(32)
    cfg = DataConfig(cutout=6)
    a, b = augment(x, cfg, gen(7)), augment(x, cfg, gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, augment(x, cfg, gen(8)))
    g = gen(7)  # a generator advances: two consecutive batches differ
    assert not torch.equal(augment(x, cfg, g), augment(x, cfg, g))


def test_flip_only_flips_or_keeps():
    x = copies(64)
    out = augment(x, DataConfig(crop_padding=0, flip=True, cutout=0), gen())
    same = [torch.equal(o, x[0]) for o in out]
    flipped = [torch.equal(o, x[0].flip(2)) for o in out]
    assert all(s or f for s, f in zip(same, flipped))
    assert 10 < sum(flipped) < 54  # p = 0.5 per sample; both outcomes occur


def _shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img translated by (dy, dx) with zero fill: out[y, x] = img[y + dy, x + dx]."""
    c, h, w = img.shape
    out = torch.zeros_like(img)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    yi, xi = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
    out[:, ys, xs] = img[:, yi, xi]
    return out


def test_crop_only_translates_within_padding():
    p = 3
    x = copies(32)
    out = augment(x, DataConfig(crop_padding=p, flip=False, cutout=0), gen())
    shifts = set()
    for o in out:
        found = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1) if torch.equal(o, _shift(x[0], dy, dx))]
        assert len(found) == 1, "not a zero-padded translate within the padding"
        shifts.add(found[0])
    assert len(shifts) > 8


def _zero_boxes(out: torch.Tensor):
    """Per sample: (rows, cols) extent of the zeroed area, asserting it is a filled rectangle on all channels."""
    boxes = []
    for o in out:
        z = o == 0
        assert torch.equal(z[0], z[1]) and torch.equal(z[0], z[2]), "cutout must zero all channels"
        rows, cols = z[0].any(1), z[0].any(0)
        nr, nc = int(rows.sum()), int(cols.sum())
        assert int(z[0].sum()) == nr * nc, "zeroed area is not a filled rectangle"
        boxes.append((nr, nc))
    return boxes


@pytest.mark.parametrize("side", [1, 3, 5, 7])
def test_cutout_zeroes_a_square_odd(side):
    x = torch.full((128, 3, 32, 32), 255, dtype=torch.uint8)
    out = augment(x, DataConfig(crop_padding=0, flip=False, cutout=side), gen())
    assert set(out.unique().tolist()) <= {0, 255}
    boxes = _zero_boxes(out)
    assert all(1 <= r <= side and 1 <= c <= side for r, c in boxes)  # clipped at the border, never bigger
    assert sum(b == (side, side) for b in boxes) > 64  # most centres are interior: full square
    positions = {tuple(torch.nonzero(o[0] == 0)[0].tolist()) for o in out}
    assert len(positions) > 32  # the square moves per sample


@pytest.mark.parametrize("side", [2, 4, 8, 16])
def test_cutout_zeroes_a_square_even(side):
    x = torch.full((128, 3, 32, 32), 255, dtype=torch.uint8)
    boxes = _zero_boxes(augment(x, DataConfig(crop_padding=0, flip=False, cutout=side), gen()))
    assert max(r for r, _ in boxes) == side and max(c for _, c in boxes) == side


# -- normalizer -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DATASET_INFO))
def test_normalizer_standardises_data_with_the_dataset_statistics(name):
    info = DATASET_INFO[name]
    # per channel, a two-point distribution with exactly (up to rounding) the dataset's mean and std:
    # 3/4 of the pixels at mean - std / sqrt(3), 1/4 at mean + std * sqrt(3) (both inside [0, 1] for
    # every dataset here, Fashion-MNIST's dark mean included)
    n, c = 64, info.channels
    mean = torch.tensor(info.mean).view(1, c, 1, 1)
    std = torch.tensor(info.std).view(1, c, 1, 1)
    high = (torch.arange(n * 16 * 16) % 4 == 0).view(n, 1, 16, 16)
    value = torch.where(high, mean + std * 3**0.5, mean - std / 3**0.5)
    assert ((value >= 0) & (value <= 1)).all()
    x = (255 * value).round().to(torch.uint8)
    y = normalizer(info, "cpu")(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(c), atol=0.02)
    assert torch.allclose(y.std(dim=(0, 2, 3)), torch.ones(c), atol=0.02)
    expected = (x.float() / 255 - mean) / std
    assert torch.allclose(y, expected, atol=1e-5)


def test_normalizer_writes_the_requested_layout_and_leaves_its_input_alone():
    info = DATASET_INFO["cifar100"]
    x = random_images(8)
    before = x.clone()
    y = normalizer(info, "cpu", torch.channels_last)(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert torch.equal(x, before)
    assert torch.allclose(y, normalizer(info, "cpu")(x), atol=1e-6)
    f = x.float()  # a float input must not be normalised in place either
    normalizer(info, "cpu")(f)
    assert torch.equal(f, before.float())


def test_train_batches_are_the_augmented_normalised_rows_and_their_labels():
    from budgetnet.data import ImageSet

    info = DATASET_INFO["cifar100"]
    split = ImageSet(random_images(50), torch.arange(50))
    idx = torch.tensor([7, 3, 41, 3, 0])
    cfg = DataConfig(crop_padding=4, flip=True, cutout=8)
    norm = normalizer(info, "cpu", torch.channels_last)
    x, y = train_batches(split, cfg, norm)(idx, gen(9))
    assert torch.equal(y, idx)
    expected = norm(augment(split.images[idx], cfg, gen(9)))  # the same draws from the same generator
    assert torch.equal(x, expected) and x.is_contiguous(memory_format=torch.channels_last)


def test_crop_and_flip_together_are_a_translate_of_the_image_or_its_mirror():
    p = 2
    x = copies(64)
    out = augment(x, DataConfig(crop_padding=p, flip=True, cutout=0), gen(4))
    kinds = set()
    for o in out:
        found = [(f, dy, dx) for f in (False, True) for dy in range(-p, p + 1) for dx in range(-p, p + 1)
                 if torch.equal(o, _shift(x[0].flip(2) if f else x[0], dy, dx))]
        assert len(found) == 1, "not a zero-padded translate of the image or of its mirror"
        kinds.add(found[0])
    assert {f for f, _, _ in kinds} == {False, True} and len(kinds) > 16


def test_a_split_keeps_one_augmenter_that_grows_to_serve_every_config():
    from budgetnet.data import ImageSet

    split = ImageSet(random_images(20), torch.arange(20))
    a = split.augmenter(DataConfig(crop_padding=2, flip=False))
    assert (a.padding, a.flip) == (2, False)
    assert split.augmenter(DataConfig(crop_padding=0, flip=False)) is a  # less padding: the same store
    b = split.augmenter(DataConfig(crop_padding=1, flip=True))  # a flip it lacks: rebuilt to cover both
    assert b is not a and (b.padding, b.flip) == (2, True)
    c = split.augmenter(DataConfig(crop_padding=4, flip=False))
    assert (c.padding, c.flip) == (4, True)
    for p, f in [(0, False), (2, True), (4, True), (3, False)]:
        assert split.augmenter(DataConfig(crop_padding=p, flip=f)) is c
    with pytest.raises(ValueError, match="cannot serve"):
        a(torch.arange(3), gen(), DataConfig(crop_padding=4))


@pytest.mark.parametrize("cfg", [DataConfig(crop_padding=2, flip=False, cutout=0),
                                 DataConfig(crop_padding=0, flip=True, cutout=6),
                                 DataConfig(crop_padding=3, flip=True, cutout=4), OFF])
def test_a_larger_store_gives_the_same_batch_as_a_store_built_for_the_config(cfg):
    from budgetnet.data import Augmenter

    x = random_images(12)
    idx = torch.tensor([5, 0, 11, 5])
    exact = Augmenter(x, cfg.crop_padding, cfg.flip)(idx, gen(3), cfg)
    shared = Augmenter(x, 4, True)(idx, gen(3), cfg)
    assert torch.equal(exact, shared)
    assert torch.equal(exact, augment(x[idx], cfg, gen(3)))


@pytest.mark.parametrize("c", [1, 3])
def test_normalizer_reads_contiguous_and_channels_last_batches_alike(c):
    info = DATASET_INFO["fashion_mnist" if c == 1 else "cifar10"]
    x = random_images(6, c, 28)
    norm = normalizer(info, "cpu", torch.channels_last)
    a, b = norm(x), norm(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)
    mean, std = torch.tensor(info.mean).view(1, c, 1, 1), torch.tensor(info.std).view(1, c, 1, 1)
    assert torch.allclose(a, (x.float() / 255 - mean) / std, atol=1e-5)


# -- synthetic: splits ----------------------------------------------------------------------------------

def _keys(images: torch.Tensor) -> list[bytes]:
    return [img.numpy().tobytes() for img in images]


def test_synthetic_default_split(synthetic_data):
    d = synthetic_data
    assert len(d.train) == 2000 and len(d.val) == 400
    assert d.train.images.shape == (2000, 3, 32, 32) and d.train.images.dtype == torch.uint8
    assert d.train.labels.dtype == torch.int64 and d.train.images.device.type == "cpu"
    assert d.train.images.is_contiguous(memory_format=torch.channels_last)  # rows of W x C for normalizer
    assert d.info.shape == DATASET_INFO["synthetic"].shape
    assert len(d.classes) == 10
    images, labels, _ = read_split("synthetic", None, train=True)
    by_image = dict(zip(_keys(torch.from_numpy(images)), labels.tolist()))
    assert len(by_image) == 2400  # every synthetic image is distinct
    train_keys, val_keys = _keys(d.train.images), _keys(d.val.images)
    assert not set(train_keys) & set(val_keys), "train and validation overlap"
    assert set(train_keys) | set(val_keys) == set(by_image)  # together, the whole training split
    assert [by_image[k] for k in val_keys] == d.val.labels.tolist()  # labels travel with their images
    assert [by_image[k] for k in train_keys] == d.train.labels.tolist()
    assert set(d.val.labels.tolist()) == set(range(10))


def test_split_is_seeded(synthetic_data):
    again = load_data(DataConfig(dataset="synthetic"))
    assert torch.equal(again.val.images, synthetic_data.val.images)
    assert torch.equal(again.train.labels, synthetic_data.train.labels)
    other = load_data(DataConfig(dataset="synthetic", split_seed=1))
    assert len(other.val) == 400
    assert set(_keys(other.val.images)) != set(_keys(synthetic_data.val.images))


def test_val_size_and_merge():
    d = load_data(DataConfig(dataset="synthetic", val_size=100))
    assert (len(d.train), len(d.val)) == (2300, 100)
    merged = load_data(DataConfig(dataset="synthetic", val_size=100), merge_val=True)
    assert len(merged.train) == 2400 and merged.val is None
    assert load_data(DataConfig(dataset="synthetic", val_size=0)).val is None
    with pytest.raises(DatasetNotFound, match="val_size"):
        load_data(DataConfig(dataset="synthetic", val_size=2400))


def test_synthetic_test_split_is_separate(synthetic_data):
    test, classes = load_test("synthetic")
    assert test.images.shape == (600, 3, 32, 32) and len(test) == 600
    assert classes == synthetic_data.classes
    train_keys = set(_keys(synthetic_data.train.images)) | set(_keys(synthetic_data.val.images))
    assert not train_keys & set(_keys(test.images))


# -- CIFAR on disk --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, folder", [("cifar100", "cifar-100-python"), ("cifar10", "cifar-10-batches-py")])
def test_missing_cifar_names_path_and_flag(tmp_path, name, folder):
    where = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFound) as info:
        load_data(DataConfig(dataset=name), where)
    msg = str(info.value)
    assert folder in msg and str(where) in msg
    assert "--data-dir" in msg
    with pytest.raises(DatasetNotFound, match="--data-dir"):
        load_test(name, where)


def test_missing_cifar_meta_is_missing(tmp_path):
    write_cifar100(tmp_path, 4, 2)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DatasetNotFound, match="cifar-100-python"):
        load_data(DataConfig(dataset="cifar100", val_size=1), tmp_path)


def test_reads_fabricated_cifar100(cifar100_dir):
    root, written = cifar100_dir
    data, fine = written["train"]
    d = load_data(DataConfig(dataset="cifar100", val_size=5), root)
    assert d.train.images.shape == (15, 3, 32, 32) and d.val.images.shape == (5, 3, 32, 32)
    assert d.train.images.dtype == torch.uint8 and d.train.labels.dtype == torch.int64
    assert d.classes == written["classes"] and len(d.classes) == 100
    # merged: the file's order, CIFAR's layout (N x 3072 = R, G, B planes of 32 x 32, row-major)
    m = load_data(DataConfig(dataset="cifar100", val_size=5), root, merge_val=True)
    assert np.array_equal(m.train.images.numpy(), data.reshape(-1, 3, 32, 32))
    assert np.array_equal(m.train.labels.numpy(), fine)
    assert m.train.images[3, 1, 2, 5].item() == data[3, 1024 + 2 * 32 + 5]
    # the split partitions the file
    rows = {r.tobytes(): i for i, r in enumerate(data.reshape(-1, 3, 32, 32))}
    idx = sorted(rows[k] for k in _keys(d.train.images) + _keys(d.val.images))
    assert idx == list(range(20))
    test, classes = load_test("cifar100", root)
    tdata, tfine = written["test"]
    assert np.array_equal(test.images.numpy(), tdata.reshape(-1, 3, 32, 32))
    assert np.array_equal(test.labels.numpy(), tfine)
    assert classes == written["classes"]


def test_reads_fabricated_cifar10(tmp_path):
    written = write_cifar10(tmp_path, n_per_batch=4, n_test=6)
    m = load_data(DataConfig(dataset="cifar10", val_size=3), tmp_path, merge_val=True)
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert np.array_equal(m.train.images.numpy(), data.reshape(-1, 3, 32, 32))
    assert np.array_equal(m.train.labels.numpy(), labels)
    assert m.classes == written["classes"]
    test, _ = load_test("cifar10", tmp_path)
    assert np.array_equal(test.labels.numpy(), written["test_batch"][1])


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_with_forbidden_global_is_refused_not_executed(tmp_path):
    write_cifar100(tmp_path, 4, 2)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": _Evil(marker), "fine_labels": [0]}, f, protocol=2)
    with pytest.raises(DatasetNotFound, match="forbidden"):
        load_data(DataConfig(dataset="cifar100", val_size=1), tmp_path)
    assert not marker.exists(), "the pickle's payload ran"


def test_corrupt_cifar_file_is_reported(tmp_path):
    write_cifar100(tmp_path, 4, 2)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetNotFound, match="corrupt"):
        load_data(DataConfig(dataset="cifar100", val_size=1), tmp_path)


# -- Fashion-MNIST idx ------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_reads_fabricated_fashion_mnist(tmp_path, gz):
    written = write_fashion_mnist(tmp_path, 12, 6, gz=gz)
    d = load_data(DataConfig(dataset="fashion_mnist", val_size=2), tmp_path)
    assert d.train.images.shape == (10, 1, 28, 28) and d.val.images.shape == (2, 1, 28, 28)
    assert d.classes == FASHION_MNIST_CLASSES
    m = load_data(DataConfig(dataset="fashion_mnist", val_size=2), tmp_path, merge_val=True)
    images, labels = written["train"]
    assert np.array_equal(m.train.images.numpy()[:, 0], images)
    assert np.array_equal(m.train.labels.numpy(), labels)
    assert m.train.labels.dtype == torch.int64
    test, classes = load_test("fashion_mnist", tmp_path)
    assert np.array_equal(test.images.numpy()[:, 0], written["t10k"][0])
    assert np.array_equal(test.labels.numpy(), written["t10k"][1])
    assert classes == FASHION_MNIST_CLASSES


def test_missing_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(bd, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(DatasetNotFound) as info:
        load_data(DataConfig(dataset="fashion_mnist"), tmp_path / "empty")
    assert "FashionMNIST/raw" in str(info.value) and "--data-dir" in str(info.value)


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"])
def test_truncated_idx_payload_errors_clearly(tmp_path, name):
    path = write_idx(tmp_path / name, raw=idx_bytes(np.zeros((5, 28, 28), np.uint8))[:-100])
    with pytest.raises(DatasetNotFound, match="truncated") as info:
        bd._read_idx(path)
    assert str(path) in str(info.value)


def test_idx_with_wrong_magic_errors_clearly(tmp_path):
    raw = bytearray(idx_bytes(np.zeros((2, 4), np.uint8)))
    raw[2] = 0x0D  # float32 type code
    path = write_idx(tmp_path / "x-idx2-ubyte", raw=bytes(raw))
    with pytest.raises(DatasetNotFound, match="not an idx file"):
        bd._read_idx(path)


def test_truncated_fashion_file_through_load_data(tmp_path):
    write_fashion_mnist(tmp_path, 12, 6)
    raw = idx_bytes(np.zeros((12, 28, 28), np.uint8))
    write_idx(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz", raw=raw[: len(raw) // 2])
    with pytest.raises(DatasetNotFound, match="truncated"):
        load_data(DataConfig(dataset="fashion_mnist", val_size=2), tmp_path)


def test_cut_off_gzip_errors_clearly(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    gz = __import__("gzip").compress(idx_bytes(np.zeros((5, 28, 28), np.uint8)))
    path.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DatasetNotFound):
        bd._read_idx(path)


def test_cut_off_header_errors_clearly(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte", raw=idx_bytes(np.zeros((5, 28, 28), np.uint8))[:10])
    with pytest.raises(DatasetNotFound):
        bd._read_idx(path)


def test_image_label_count_mismatch_is_refused(tmp_path):
    write_fashion_mnist(tmp_path, 12, 6)
    write_idx(tmp_path / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte.gz", np.zeros(10, np.uint8))
    with pytest.raises(DatasetNotFound):
        load_data(DataConfig(dataset="fashion_mnist", val_size=2), tmp_path)


def test_labels_outside_the_classes_are_a_corrupt_file_not_a_crash_later(tmp_path):
    write_fashion_mnist(tmp_path, 12, 6)
    write_idx(tmp_path / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte.gz", np.full(12, 10, np.uint8))
    with pytest.raises(DatasetNotFound, match="labels run from 10 to 10, for 10 classes"):
        load_data(DataConfig(dataset="fashion_mnist", val_size=2), tmp_path)


def test_fashion_files_are_not_mixed_across_folders(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    for prefix, n in (("train", 30), ("t10k", 30)):
        write_idx(debian / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 28, 28), np.uint8))
        write_idx(debian / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(n, np.uint8))
    monkeypatch.setattr(bd, "DEBIAN_FASHION_MNIST", debian)
    mine = tmp_path / "mine"
    write_idx(mine / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz", np.zeros((12, 28, 28), np.uint8))
    with pytest.raises(DatasetNotFound):
        load_data(DataConfig(dataset="fashion_mnist", val_size=2), mine)
