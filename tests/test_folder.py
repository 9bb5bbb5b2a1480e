"""Image folders as datasets (``--dataset folder:PATH``), on folders these tests write with Pillow: PNG and
JPEG files of several sizes, one grayscale image and one corrupt file among a few hundred."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_fashion_mnist
from PIL import Image

from budgetnet.checkpoint import load_checkpoint
from budgetnet.cli import main
from budgetnet.cli.parser import build_parser
from budgetnet.config import ConfigError, DataConfig
from budgetnet.data import load_data, load_test
from budgetnet.datasets import folder
from budgetnet.datasets.read import dataset_info
from budgetnet.search.report import Reporter
from budgetnet.search.runner import SearchOptions, run_search
from budgetnet.search.space import load_grid

CLASSES = ("ants", "bees", "cats")
SIZES = ((24, 24), (40, 30), (52, 64))  # (width, height): mixed sizes and aspect ratios


def _picture(label: int, w: int, h: int, rng) -> np.ndarray:
    """A learnable picture: stripes whose direction is the class, in a random colour, with noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    phase = [yy, xx, xx + yy][label % 3] * (6.0 / max(w, h)) * np.pi
    wave = (np.sin(phase + rng.uniform(0, 6.3)) > 0).astype(np.float64)
    colour = rng.uniform(80, 255, 3)
    img = wave[..., None] * colour + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image_folder(root: Path, per_class: dict[str, int], *, classes=CLASSES, gray=False, seed=0,
                       corrupt: int = 0) -> list[Path]:
    """Write ``per_class[split]`` images per class under ``root/<split>/<class>/`` (split "" for one tree),
    alternating PNG and JPEG and the sizes in SIZES; the first image written is grayscale; ``corrupt`` more
    files in the first split's first class hold bytes that are no image. Returns the paths written."""
    rng = np.random.default_rng(seed)
    paths = []
    for split, n in per_class.items():
        for label, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = SIZES[i % len(SIZES)]
                img = Image.fromarray(_picture(label, w, h, rng))
                if gray or not paths:
                    img = img.convert("L")
                p = d / f"{i:03d}.{'png' if i % 2 else 'jpg'}"
                img.save(p, quality=90) if p.suffix == ".jpg" else img.save(p)
                paths.append(p)
        for i in range(corrupt if split == next(iter(per_class)) else 0):
            bad = root / split / classes[0] / f"broken{i}.jpg"
            bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
            paths.append(bad)
    return paths


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory) -> Path:
    """train/ and test/ with 3 classes: 3 x 60 training and 3 x 15 test images, one of them grayscale,
    plus one corrupt training file. Tests must not modify it (copy it first)."""
    root = tmp_path_factory.mktemp("photos")
    write_image_folder(root, {"train": 60, "test": 15}, corrupt=1)
    return root


def _name(root: Path) -> str:
    return f"folder:{root}"


def _caches(root: Path) -> list[Path]:
    return sorted(root.glob(".budgetnet-cache-*.npz"))


# -- the end-to-end path -------------------------------------------------------------------------------

@pytest.mark.timing
def test_search_then_best_pt_then_evaluate_on_a_folder(split_folder, tmp_path, capsys, caplog, slice_s):
    data = tmp_path / "photos"
    shutil.copytree(split_folder, data)  # copy2 keeps mtimes: a cache copied along stays valid
    out = tmp_path / "best.pt"
    # what `budgetnet search --dataset folder:PATH` runs (in-process, its budget starting now), on a grid of
    # one small net that learns these stripes in a few dozen steps: a sampled net may not in seconds
    grid = load_grid(json.dumps({"base": {"model": {"family": "plain", "n_conv": 3, "width": 8, "hidden": [32]},
                                          "train": {"batch_size": 32, "lr": 0.05}, "data": {"crop_padding": 0}},
                                 "grid": {"train.lr": [0.05]}}))
    opts = SearchOptions(max_params=60_000, budget_seconds=5 * slice_s, dataset=_name(data), trial_seconds=slice_s,
                         storage=f"sqlite:///{tmp_path / 's.db'}", out=str(out), device="cpu", sampler="grid",
                         grid=grid, artifact_dir=str(tmp_path / "art"))
    summary = run_search(opts, Reporter("quiet"))
    assert summary["checkpoint"] == str(out), summary
    assert caplog.text.count("skipped 1 unreadable image(s) of 226") == 1  # the corrupt file, when caching
    ckpt = load_checkpoint(out)
    info = dataset_info(_name(data))
    assert ckpt["dataset"] == _name(data) and ckpt["classes"] == list(CLASSES)
    assert ckpt["input_shape"] == [3, 32, 32]  # grayscale and RGB mixed: all RGB
    assert ckpt["normalization"] == {"mean": list(info.mean), "std": list(info.std)}
    train_images = load_data(DataConfig(dataset=_name(data)), merge_val=True).train.images
    assert np.allclose(info.mean, (train_images.double() / 255).mean((0, 2, 3)).tolist(), atol=1e-6)

    # the model evaluates from the file alone, on the folder moved elsewhere
    moved = tmp_path / "moved"
    data.rename(moved)
    assert main(["evaluate", str(out), "--device", "cpu", "--json"]) == 2  # the recorded path is gone
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", str(out), "--device", "cpu", "--json", "--dataset", _name(moved)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test_images"] == 45 and report["dataset"] == _name(moved)
    assert report["top1"] > 0.6  # stripes by direction are easy; chance is 1/3
    assert main(["evaluate", str(out), "--device", "cpu", "--dataset", "cifar10"]) == 2


def test_train_on_a_folder_then_evaluate(split_folder, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": {"family": "plain", "n_conv": 2, "width": 4, "hidden": [16]},
                               "train": {"batch_size": 32}, "data": {"dataset": "synthetic"}}))
    out, data = tmp_path / "m.pt", tmp_path / "photos"
    shutil.copytree(split_folder, data)
    args = ["train", "--config", str(cfg), "--epochs", "1", "--out", str(out), "--device", "cpu"]
    assert main([*args, "--dataset", _name(data), "--image-size", "16"]) == 0
    capsys.readouterr()
    ckpt = load_checkpoint(out)
    assert ckpt["input_shape"] == [3, 16, 16] and ckpt["run_config"].data.image_size == 16
    assert main(["evaluate", str(out), "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test_images"] == 45 and report["latency"][0]["images_per_s"] > 0
    # prune reads the folder model's recorded input too (16 px, its own normalisation)
    assert main(["prune", str(out), "--amount", "0.3", "--seconds", "0", "--out", str(tmp_path / "p.pt"),
                 "--device", "cpu", "--json"]) == 0
    assert load_checkpoint(tmp_path / "p.pt")["input_shape"] == [3, 16, 16]
    capsys.readouterr()
    assert main([*args, "--image-size", "16"]) == 2  # synthetic has its own size
    assert "folder datasets only" in capsys.readouterr().err


# -- the cache -----------------------------------------------------------------------------------------

def test_the_second_run_loads_the_cache_and_a_changed_file_rebuilds_it(split_folder, tmp_path, monkeypatch):
    data = tmp_path / "photos"
    shutil.copytree(split_folder, data)
    for c in _caches(data):
        c.unlink()
    calls = []
    real = folder.decode_images
    monkeypatch.setattr(folder, "decode_images", lambda paths, *a: calls.append(len(paths)) or real(paths, *a))
    first = load_test(_name(data))[0].images
    assert calls == [226] and [c.name for c in _caches(data)] == [".budgetnet-cache-32px.npz"]
    assert not list(data.glob(".*.tmp"))

    t0 = time.perf_counter()
    again = load_data(DataConfig(dataset=_name(data)))
    assert time.perf_counter() - t0 < 5.0  # no decoding: a read of a few hundred KB
    assert calls == [226] and torch.equal(load_test(_name(data))[0].images, first)
    assert len(again.train) + len(again.val) == 180  # 181 training files, one corrupt

    img = data / "test" / "bees" / "000.jpg"
    Image.new("RGB", (30, 30), (255, 0, 0)).save(img)
    os.utime(img, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
    changed = load_test(_name(data))[0].images
    assert calls == [226, 226] and not torch.equal(changed, first)
    i = 15  # the first bees test image, now red
    assert changed[i, 0].float().mean() > 250 and changed[i, 1:].float().mean() < 5


def test_a_damaged_cache_is_rebuilt_not_a_crash(split_folder, tmp_path):
    """A cache cut short (a partial copy, a disk fault) is no zip archive: rebuilt like a stale one."""
    data = tmp_path / "photos"
    shutil.copytree(split_folder, data)
    first = load_test(_name(data))[0].images  # built, or copied fresh
    (cache,) = _caches(data)
    cache.write_bytes(cache.read_bytes()[:1000])
    assert torch.equal(load_test(_name(data))[0].images, first)
    assert cache.stat().st_size > 1000


def test_deep_and_float_grayscale_images_are_scaled_not_clipped(tmp_path):
    """16-bit PNG/TIFF, 32-bit integer and float TIFF (microscopy, medical, thermal images): Pillow's
    convert("L") clips them (a 16-bit ramp came out 99% white, a float image in [0, 1] all black)."""
    from budgetnet.datasets.decode import decode_image

    ramp = np.arange(64 * 64).reshape(64, 64) / (64 * 64 - 1)  # 0..1, left to right then down
    cases = {"16bit.png": Image.fromarray((ramp * 65535).astype(np.uint16)),
             "float.tif": Image.fromarray(ramp.astype(np.float32), "F"),
             "int32.tif": Image.fromarray((ramp * 4_000_000 - 1_000_000).astype(np.int32), "I")}
    eight = None
    for name, img in cases.items():
        img.save(tmp_path / name)
        a = decode_image(str(tmp_path / name), 32)
        assert a is not None and a.dtype == np.uint8 and a.shape == (32, 32), name
        assert a.min() < 10 and a.max() > 245 and (a == 255).mean() < 0.01, (name, a.min(), a.max())
        eight = a if eight is None else eight
        assert np.abs(a.astype(int) - eight.astype(int)).max() <= 2, name  # the same ramp, whatever the depth


def test_a_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    """A phone stores a portrait photo landscape and tags it "rotate 90° clockwise" (orientation 6)."""
    from budgetnet.datasets.decode import decode_image

    img = Image.new("RGB", (40, 20))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # red on the left as stored: on top once turned upright
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "portrait.jpg", exif=exif)
    a = decode_image(str(tmp_path / "portrait.jpg"), 16).astype(float)
    assert a[:4, :, 0].mean() > 200 and a[-4:, :, 0].mean() < 50  # red above, black below


def test_a_dangling_link_is_an_unreadable_image_and_an_unreadable_folder_one_line(tmp_path, caplog, capsys,
                                                                                monkeypatch):
    root = tmp_path / "photos"
    write_image_folder(root, {"": 30})
    (root / "ants" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with caplog.at_level("WARNING"):
        info = dataset_info(_name(root))
    assert info.train_size > 0 and "skipped 1 unreadable image(s) of 91" in caplog.text and "gone.jpg" in caplog.text
    locked = root / "bees" / "more"
    locked.mkdir()
    real_scandir = os.scandir

    def no_permission(path):  # what chmod 0 does to anyone but root (the tests may run as root)
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(folder.os, "scandir", no_permission)
    code = main(["datasets", _name(root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"cannot read folder {locked}" in err[0], err


def test_loading_a_folder_scans_its_files_once(split_folder, monkeypatch):
    load_data(DataConfig(dataset=_name(split_folder)))  # the cache is built (or found) first
    scans = []
    real = folder.scan
    monkeypatch.setattr(folder, "scan", lambda root: scans.append(root) or real(root))
    data = load_data(DataConfig(dataset=_name(split_folder)))
    assert len(scans) == 1 and data.info == dataset_info(_name(split_folder))  # the same info, one scan


def test_decoding_processes_give_what_this_process_gives(split_folder, monkeypatch):
    paths = sorted(str(f) for f in split_folder.rglob("*") if f.is_file() and not f.name.startswith("."))
    monkeypatch.setattr(folder, "MIN_PARALLEL_IMAGES", 1)  # a few hundred images: use the pool anyway
    here = folder.decode_images(paths, 32, workers=1)
    pooled = folder.decode_images(paths, 32, workers=2)
    assert len(pooled) == len(paths) and any(a is None for a in here)  # the corrupt file is in there
    assert all((a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
               for a, b in zip(here, pooled))  # same images, same order, same failures


def test_another_image_size_is_another_cache(split_folder, tmp_path):
    data = tmp_path / "photos"
    shutil.copytree(split_folder, data)
    d = load_data(DataConfig(dataset=_name(data), image_size=48, val_size=10))
    assert d.train.images.shape[1:] == (3, 48, 48) and d.info.image_size == 48
    assert {c.name for c in _caches(data)} >= {".budgetnet-cache-48px.npz"}


def _read_only(monkeypatch, data: Path) -> None:
    """What a read-only mount of ``data`` does to budgetnet's writes (chmod does not stop root, who runs CI)."""
    real = folder.write_atomic

    def read_only_data(path, write):
        if data in Path(path).parents:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, write)

    monkeypatch.setattr(folder, "write_atomic", read_only_data)


def test_a_read_only_data_folder_caches_in_the_users_cache_folder(split_folder, tmp_path, monkeypatch):
    data = tmp_path / "photos"
    shutil.copytree(split_folder, data)
    for c in _caches(data):
        c.unlink()
    monkeypatch.delenv(folder.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _read_only(monkeypatch, data)
    info = dataset_info(_name(data))
    assert info.num_classes == 3 and not _caches(data) and not list(data.glob(".*"))
    cached = list((tmp_path / "xdg" / "budgetnet" / "folder-cache").glob("photos-*-32px.npz"))
    assert len(cached) == 1
    assert folder.describe(_name(data))["cache"] == "fresh"  # found there on the next run
    monkeypatch.setenv(folder.CACHE_ENV, str(tmp_path / "mine"))  # the override
    assert folder.describe(_name(data))["cache"] == "missing"
    dataset_info(_name(data))
    assert len(list((tmp_path / "mine").glob("photos-*-32px.npz"))) == 1


def test_a_read_only_single_tree_keeps_its_split_from_any_working_directory(tmp_path, monkeypatch):
    """The split manifest of a folder budgetnet may not write into is found from every directory: when it
    was kept under the working directory, a run from elsewhere after images were added split all of them
    afresh, and moved images that a model had been tested on into its training split."""
    root = tmp_path / "tree"
    write_image_folder(root, {"": 20}, gray=True)
    monkeypatch.setenv(folder.CACHE_ENV, str(tmp_path / "cache"))
    _read_only(monkeypatch, root)
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    first = folder.scan(root)
    folder.write_manifest(first)
    assert not (root / folder.MANIFEST).exists()
    write_image_folder(root, {"": 30}, gray=True, seed=1)  # 10 more images a class
    monkeypatch.chdir(tmp_path / "b")
    grown = folder.scan(root)
    for split in ("train", "test"):
        assert {f for f, _ in first.files[split]} <= {f for f, _ in grown.files[split]}, split


def test_a_manifest_an_earlier_version_kept_under_studies_is_still_read(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    write_image_folder(root, {"": 10}, gray=True)
    split = folder.scan(root).files
    moved = split["test"][0][0]  # a split no seed gives: one test image moved to train
    legacy = {"train": [f for f, _ in split["train"]] + [moved], "test": [f for f, _ in split["test"][1:]]}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(folder.CACHE_ENV, str(tmp_path / "cache"))
    key = folder._manifest_paths(root)[-1]
    key.parent.mkdir(parents=True)
    key.write_text(json.dumps(legacy))
    assert key.parent == Path("studies/folder-cache")
    assert moved in {f for f, _ in folder.scan(root).files["train"]}


# -- the single-tree layout: a stable test split --------------------------------------------------------

def test_a_single_tree_keeps_a_stratified_test_split_that_never_moves(tmp_path):
    root = tmp_path / "tree"
    write_image_folder(root, {"": 20}, gray=True)
    test, classes = load_test(_name(root))
    manifest = json.loads((root / folder.MANIFEST).read_text())
    assert classes == list(CLASSES) and test.images.shape[1] == 1  # all grayscale: one channel
    assert np.bincount(test.labels.numpy()).tolist() == [4, 4, 4]  # 20% of each class
    assert len(manifest["test"]) == 12 and len(manifest["train"]) == 48
    assert len(load_data(DataConfig(dataset=_name(root), val_size=0)).train) == 48

    # the same split in a new process's worth of state (cache deleted), and after files are added
    for c in _caches(root):
        c.unlink()
    write_image_folder(root, {"": 30}, gray=True, seed=1)  # overwrites 000..019, adds 020..029 per class
    again = json.loads((root / folder.MANIFEST).read_text())
    load_test(_name(root))
    after = json.loads((root / folder.MANIFEST).read_text())
    assert again == manifest
    assert set(manifest["test"]) <= set(after["test"]) and set(manifest["train"]) <= set(after["train"])
    assert len(after["test"]) == 12 + 3 * 2  # the 10 new files of each class split 80/20 among themselves


def test_file_names_that_are_not_utf8_load_and_class_names_that_are_not_are_one_line(tmp_path, capsys):
    """Bytes from another system's encoding: a file so named is an image like any other (its name had
    crashed the cache's fingerprint); a class folder so named is refused, as its name is the class's."""
    root = tmp_path / "tree"
    write_image_folder(root, {"": 6})
    odd = os.fsdecode(b"ants/\xff-latin1.png")
    shutil.copy(root / "ants" / "001.png", root / odd)
    info = dataset_info(_name(root))
    assert sum(sum(c) for c in folder.scan(root).counts().values()) == 19 and info.num_classes == 3
    assert folder.describe(_name(root))["cache"] == "fresh"
    (root / "bees").rename(root / os.fsdecode(b"b\xe9es"))
    assert main(["datasets", _name(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not UTF-8 text" in err[0] and "b\\xe9es" in err[0], err


# -- bad input: one line, exit code 2, nothing cached ----------------------------------------------------

def _bad(root: Path, case: str) -> Path:
    if case == "no such path":
        return root / "nowhere"
    if case == "empty class folder":
        write_image_folder(root, {"train": 3, "test": 2})
        (root / "test" / "dogs").mkdir()
        (root / "train" / "dogs").mkdir()
    elif case == "a single class":
        write_image_folder(root, {"": 5}, classes=("only",))
    elif case == "too many corrupt images":
        write_image_folder(root, {"": 6}, corrupt=2)  # 2 of 20 files
    elif case == "train without test":
        write_image_folder(root, {"train": 3})
    elif case == "test without train":
        write_image_folder(root, {"test": 3})
    elif case == "different classes in train and test":
        write_image_folder(root, {"train": 3})
        write_image_folder(root, {"test": 3}, classes=("ants", "bees", "dogs"))
    return root


BAD = {"no such path": "does not exist", "empty class folder": "holds no images",
       "a single class": "at least 2", "too many corrupt images": "2 of the 20 images",
       "train without test": "holds train/ but no test/", "test without train": "holds test/ but no train/",
       "different classes in train and test": "only in one of them: cats, dogs"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folders_are_one_line_exit_2_and_nothing_is_cached(tmp_path, capsys, case):
    root = _bad(tmp_path / "photos", case)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(["search", "--dataset", _name(root), "--storage", f"sqlite:///{tmp_path / 's.db'}",
                 "--out", str(tmp_path / "best.pt"), "--device", "cpu", "--hours", "0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("budgetnet: error:"), err
    assert BAD[case] in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no cache, manifest, temp file or study


def test_a_few_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "photos"
    write_image_folder(root, {"": 30}, corrupt=1)  # 1 of 91
    with caplog.at_level("WARNING"):
        info = dataset_info(_name(root))
    assert info.train_size + len(load_test(_name(root))[1]) > 0
    assert "skipped 1 unreadable image(s) of 91" in caplog.text and "broken0.jpg" in caplog.text


# -- config and CLI ----------------------------------------------------------------------------------------

def test_folder_names_and_image_sizes_in_configs_and_flags(tmp_path):
    parsed = build_parser().parse_args(["search", "--dataset", "folder:rel/photos", "--image-size", "64"])
    assert parsed.dataset == f"folder:{Path.cwd() / 'rel' / 'photos'}" and parsed.image_size == 64
    with pytest.raises(ConfigError, match="absolute path"):
        DataConfig(dataset="folder:rel/photos")
    with pytest.raises(ConfigError, match="folder datasets only"):
        DataConfig(dataset="cifar10", image_size=64)
    cfg = DataConfig(dataset=f"folder:{tmp_path}", image_size=96)
    from budgetnet.config import RunConfig

    assert RunConfig.from_json(RunConfig(data=cfg).to_json()).data == cfg
    for bad in (["--image-size", "4"], ["--image-size", "64", "--dataset", "cifar10"]):
        assert main(["search", *bad, "--out", str(tmp_path / "b.pt"),
                     "--storage", f"sqlite:///{tmp_path / 's.db'}"]) == 2


def test_datasets_lists_the_built_ins_and_describes_a_folder(split_folder, tmp_path, capsys):
    write_fashion_mnist(tmp_path, 12, 6)
    assert main(["datasets", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "/usr/share/datasets/fashion-mnist" in lines["fashion_mnist"]
    assert lines["fashion_mnist"].endswith(f"found in {tmp_path / 'FashionMNIST' / 'raw'}")
    assert lines["cifar100"].endswith(f"looked for in {tmp_path / 'cifar-100-python'}: not found")
    assert "folder:PATH" in out
    data = tmp_path / "photos"
    shutil.copytree(split_folder, data)
    for c in _caches(data):
        c.unlink()
    assert main(["datasets", _name(data), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["classes"] == list(CLASSES) and d["counts"] == {"train": [61, 60, 60], "test": [15, 15, 15]}
    assert d["cache"] == "missing" and d["layout"] == "train/test" and not _caches(data)  # nothing built
    dataset_info(_name(data))
    assert main(["datasets", _name(data)]) == 0
    text = capsys.readouterr().out
    assert "up to date" in text and "3 channel(s), 1 unreadable image(s) skipped" in text and "bees" in text


def test_bench_folder_script_runs_at_toy_size(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_folder.py"
    proc = subprocess.run([sys.executable, str(script), "--n", "40", "--baseline-n", "10", "--root",
                           str(tmp_path / "jpegs")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| load the cache" in proc.stdout and "40 JPEGs" in proc.stdout
    assert len(list((tmp_path / "jpegs").glob("test/*/*.jpg"))) == 10  # every class in test/ (one image each here)
