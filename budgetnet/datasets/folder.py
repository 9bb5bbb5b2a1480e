"""Image folders as datasets (``--dataset folder:PATH``): scanned, decoded once, cached as uint8 arrays.

Two layouts, as torchvision's ``ImageFolder`` reads them:

* ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (the same class folders in both);
* one ``PATH/<class>/*`` tree: a seeded, class-stratified test split is kept out and written down in a
  manifest (``.budgetnet-split.json``), so an image keeps its split as the folder grows or shrinks.

Images are decoded in one process per core (``decode_images``; ``datasets.decode`` holds the per-image
code), grayscale when all are, RGB otherwise. Arrays, labels, class names, the training split's mean and
std and a fingerprint of the file list go in one ``.npz`` beside the data (else under ``fallback_dir()``),
written atomically; any change of the files rebuilds it. Names starting with "." are never read as data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from budgetnet.config import FOLDER_IMAGE_SIZE, FOLDER_PREFIX
from budgetnet.datasets.decode import decode_chunk
from budgetnet.datasets.info import DatasetInfo, DatasetNotFound
from budgetnet.files import write_atomic

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
TEST_SHARE = 0.2  # single-tree layout: share of each class's images kept out as the test split
SPLIT_SEED = 0  # seed of that split (fixed: the manifest, not the seed, is what keeps it stable)
MAX_BAD_SHARE = 0.05  # unreadable images are skipped up to this share of the files; beyond it, refused
MAX_DEFAULT_VAL = 5_000  # the default validation hold-out is 10% of the training split, at most this
CACHE_VERSION = 1  # bump when the cache's contents change meaning
MANIFEST = ".budgetnet-split.json"
CACHE_ENV = "BUDGETNET_CACHE_DIR"  # overrides where caches of read-only data folders go
LEGACY_FALLBACK_DIR = Path("studies/folder-cache")  # earlier versions wrote here (cwd-relative): read only
DECODE_WORKERS = min(32, os.cpu_count() or 1)  # decoding processes: one per core
MIN_PARALLEL_IMAGES = 512  # fewer images decode in this process: a pool's start-up would cost more


@dataclass
class Scan:
    """What a folder holds, without decoding anything: the layout, the classes and each split's files
    (paths relative to the root, labels)."""

    root: Path
    layout: str  # "train/test" or "single tree"
    classes: list[str]
    files: dict[str, list[tuple[str, int]]]  # "train"/"test" -> [(relative path, label)]
    stats: dict[str, tuple[int, int]]  # relative path -> (bytes, mtime in ns)
    manifest_needed: dict | None = None  # single tree: the manifest to write (new or changed), else None

    def fingerprint(self, image_size: int) -> str:
        # File names that are not UTF-8 (bytes of another system's encoding) hash as the bytes they are.
        h = hashlib.sha256(f"v{CACHE_VERSION} {image_size}px {self.layout}\n".encode())
        for split in ("train", "test"):
            for rel, label in self.files[split]:
                size, mtime = self.stats[rel]
                h.update(f"{split}\t{label}\t{rel}\t{size}\t{mtime}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def counts(self) -> dict[str, list[int]]:
        """Files per class in each split."""
        return {split: np.bincount([label for _, label in f], minlength=len(self.classes)).tolist()
                for split, f in self.files.items()}


def folder_root(dataset: str) -> Path:
    """The root folder of a ``folder:PATH`` dataset name."""
    return Path(dataset[len(FOLDER_PREFIX):])


# -- scanning ------------------------------------------------------------------------------------------

def _visible(path: Path | str) -> list[os.DirEntry]:
    """The entries of folder ``path`` but hidden ones, in name order; a folder that cannot be read (no
    permission, removed meanwhile) is one line (DatasetNotFound)."""
    try:
        with os.scandir(path) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise DatasetNotFound(f"cannot read folder {path}: {e.strerror or e}") from None


def _images_under(path: str, rel: str, stats: dict, out: list[str]) -> None:
    """Append the image files under ``path`` (recursively, in name order) as paths relative to the dataset
    root (``rel`` is ``path``'s), recording each one's size and mtime. ``DirEntry`` saves a path lookup per
    file, a faster scan than ``os.walk`` + ``os.stat``."""
    for e in _visible(path):
        if e.is_dir():
            _images_under(e.path, f"{rel}{e.name}/", stats, out)
        elif e.name.lower().endswith(IMAGE_EXTENSIONS):
            try:
                st = e.stat()
                stats[rel + e.name] = (st.st_size, st.st_mtime_ns)
            except OSError:  # a dangling link, a file removed meanwhile: unreadable, skipped and counted
                stats[rel + e.name] = (-1, -1)
            out.append(rel + e.name)


def _class_files(split_dir: Path, prefix: str, stats: dict) -> dict[str, list[str]]:
    """Class name -> image paths (relative to the dataset root) under ``split_dir``'s class folders."""
    classes = {}
    for entry in _visible(split_dir):
        if not entry.is_dir():
            continue  # loose files beside the class folders belong to no class
        files: list[str] = []
        _images_under(entry.path, f"{prefix}{entry.name}/", stats, files)
        if not files:
            raise DatasetNotFound(f"class folder {entry.path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        classes[entry.name] = files
    return classes


def scan(root: str | os.PathLike) -> Scan:
    """Find the layout, the classes and the files of an image folder (nothing is written)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFound(f"image folder {root} does not exist" if not root.exists()
                              else f"{root} is not a folder")
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() != test_dir.is_dir():
        have, lack = ("train", "test") if train_dir.is_dir() else ("test", "train")
        raise DatasetNotFound(f"{root} holds {have}/ but no {lack}/: give both {root}/train/<class>/ and "
                              f"{root}/test/<class>/, or one {root}/<class>/ tree (a test split is then kept out)")
    stats: dict[str, tuple[int, int]] = {}
    if train_dir.is_dir():
        per_split = {s: _class_files(root / s, f"{s}/", stats) for s in ("train", "test")}
        if list(per_split["train"]) != list(per_split["test"]):
            diff = sorted(set(per_split["train"]) ^ set(per_split["test"]))
            raise DatasetNotFound(f"{root}/train/ and {root}/test/ must hold the same class folders; "
                                  f"only in one of them: {', '.join(diff[:5])}")
        classes = list(per_split["train"])
        _check_classes(root, classes)
        files = {s: [(rel, label) for label, c in enumerate(classes) for rel in per_split[s][c]]
                 for s in ("train", "test")}
        return Scan(root, "train/test", classes, files, stats)
    by_class = _class_files(root, "", stats)
    classes = list(by_class)
    _check_classes(root, classes)
    files, manifest = _single_tree_split(root, by_class)
    return Scan(root, "single tree", classes, files, stats, manifest)


def _check_classes(root: Path, classes: list[str]) -> None:
    for c in classes:  # a class name travels in best.pt, reports and printed lines: it must be text
        try:
            c.encode("utf-8")
        except UnicodeEncodeError:
            shown = c.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise DatasetNotFound(f"class folder '{shown}' under {root} has a name that is not UTF-8 text; "
                                  f"rename it (its name is the class name)") from None
    if len(classes) < 2:
        raise DatasetNotFound(f"{root} holds {len(classes)} class folder(s){': ' + classes[0] if classes else ''}; "
                              f"a classifier needs at least 2 (one folder of images per class)")


def fallback_dir() -> Path:
    """Where the cache and split manifest of a data folder we may not write into go: $BUDGETNET_CACHE_DIR,
    else the user's cache folder ($XDG_CACHE_HOME or ~/.cache, then budgetnet/folder-cache). One place
    whatever the working directory: a manifest found from one directory and not from another would split a
    grown folder afresh there, and move images a model was tested on into its training split."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path(os.path.expanduser("~")) / ".cache"
    if not Path(base).is_absolute():  # no home directory to be found (a bare container's user)
        return LEGACY_FALLBACK_DIR
    return Path(base) / "budgetnet" / "folder-cache"


def _beside_or_fallback(root: Path, beside: str, suffix: str) -> list[Path]:
    """Where one of ``root``'s files may be: beside the data, under ``fallback_dir()``, or (read only) under
    the working directory's ``studies/folder-cache/``, where earlier versions wrote it. Writers take the
    first of these that can be written and never reach the last."""
    key = f"{_root_key(root)}-{suffix}"
    return [root / beside, fallback_dir() / key, LEGACY_FALLBACK_DIR / key]


def _manifest_paths(root: Path) -> list[Path]:
    return _beside_or_fallback(root, MANIFEST, "split.json")


def _root_key(root: Path) -> str:
    name = root.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return f"{name}-{hashlib.sha256(str(root.resolve()).encode('utf-8', 'surrogateescape')).hexdigest()[:12]}"


def _read_manifest(root: Path) -> dict[str, str]:
    """Relative path -> split, from the first manifest found (empty if none)."""
    for path in _manifest_paths(root):
        if path.is_file():
            try:
                d = json.loads(path.read_text())
                return {rel: split for split in ("train", "test") for rel in d[split]}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DatasetNotFound(f"split manifest {path} is unreadable ({e}); delete it to split "
                                      f"the images afresh") from None
    return {}


def _single_tree_split(root: Path, by_class: dict[str, list[str]]):
    """Each file's split: the manifest's where it has one; new files are split per class, seeded, with
    TEST_SHARE of them (at least one where the class has two or more new files) kept out. Returns the
    files per split and the manifest to write (None when it is unchanged)."""
    known = _read_manifest(root)
    rng = np.random.default_rng(SPLIT_SEED)
    split_of = {}
    for files in by_class.values():
        new = [f for f in files if f not in known]
        n_test = 0 if len(new) < 2 else max(1, round(TEST_SHARE * len(new)))
        test = set(rng.choice(len(new), n_test, replace=False).tolist()) if n_test else set()
        for i, f in enumerate(new):
            split_of[f] = "test" if i in test else "train"
        split_of.update({f: known[f] for f in files if f in known})
    files = {s: [(f, label) for label, c in enumerate(by_class) for f in by_class[c] if split_of[f] == s]
             for s in ("train", "test")}
    if not files["test"]:
        raise DatasetNotFound(f"{root} has too few images to keep a test split out (each class needs 2 or more)")
    changed = set(known) != set(split_of)
    manifest = {s: [f for f, _ in files[s]] for s in ("train", "test")} if changed else None
    return files, manifest


# -- decoding and the cache --------------------------------------------------------------------------

def decode_images(paths: list[str], size: int, workers: int | None = None) -> list[np.ndarray | None]:
    """Decode ``paths`` (``decode.decode_image``), in order, with ``workers`` processes (default: one per
    core) started from a fork server that imports only Pillow and numpy. Processes, not threads: the
    per-image Python work holds the GIL (docs/benchmarks.md, "Image folders"). A few hundred images,
    one worker, or a platform without a fork server decode in this process."""
    workers = workers or DECODE_WORKERS
    if workers == 1 or len(paths) < MIN_PARALLEL_IMAGES or "forkserver" not in mp.get_all_start_methods():
        return decode_chunk(paths, size)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["budgetnet.datasets.decode"])
    per = max(1, min(256, len(paths) // (4 * workers)))  # a few tasks per worker: balanced, few round trips
    chunks = [paths[i:i + per] for i in range(0, len(paths), per)]
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return [a for chunk in pool.map(decode_chunk, chunks, [size] * len(chunks)) for a in chunk]


def _stack(decoded: list[np.ndarray], channels: int) -> np.ndarray:
    """N x C x H x W uint8 from per-image arrays (grayscale ones repeated into RGB when channels is 3)."""
    if not decoded:
        return np.zeros((0, channels, 1, 1), np.uint8)
    size = decoded[0].shape[0]
    out = np.empty((len(decoded), channels, size, size), np.uint8)
    for i, a in enumerate(decoded):  # building the cache once, not the training hot loop
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return out


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (in [0, 1]) of uint8 N x C x H x W images, exact, from 256-bin histograms."""
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[1]):
        hist = np.bincount(images[:, c].reshape(-1), minlength=256).astype(np.float64)
        p = hist / max(hist.sum(), 1.0)
        m = float(p @ values)
        mean.append(m)
        std.append(max(float(np.sqrt(max(p @ values**2 - m * m, 0.0))), 1e-3))  # a flat channel: no 1/0
    return mean, std


def _cache_paths(root: Path, size: int) -> list[Path]:
    return _beside_or_fallback(root, f".budgetnet-cache-{size}px.npz", f"{size}px.npz")


def _write_first(paths: list[Path], write) -> Path:
    """Write to the first of ``paths[:2]`` that can be written (the data folder, else ``fallback_dir()``)."""
    paths = paths[:2]
    for i, path in enumerate(paths):
        try:
            write_atomic(path, write)
            return path
        except OSError as e:
            if i == len(paths) - 1:
                raise DatasetNotFound(f"cannot write {path} ({e.strerror or e})") from None
    raise AssertionError("unreachable")


def cache_state(scan_: Scan, size: int) -> tuple[str, Path | None]:
    """("fresh", path) when a cache matches the files, ("stale", path) when one exists but they changed,
    ("missing", None) otherwise."""
    want, stale = scan_.fingerprint(size), None
    for path in _cache_paths(scan_.root, size):
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    if str(z["fingerprint"]) == want:
                        return "fresh", path
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
                pass  # a damaged cache (a truncated copy, say) is rebuilt like a stale one
            stale = stale or path
    return ("stale", stale) if stale else ("missing", None)


def write_manifest(scan_: Scan) -> None:
    """Write a single tree's split manifest when it is new or its file list changed."""
    if scan_.manifest_needed is not None:
        text = json.dumps(scan_.manifest_needed, indent=0).encode()
        _write_first(_manifest_paths(scan_.root), lambda f: f.write(text))
        scan_.manifest_needed = None


def build_cache(scan_: Scan, size: int, workers: int | None = None) -> Path:
    """Decode every image of ``scan_`` at ``size`` px and write the cache (and the split manifest of a
    single tree) atomically. Unreadable images are skipped and counted in a warning, or the whole folder is
    refused when they are more than MAX_BAD_SHARE of the files; nothing is written then."""
    root = scan_.root
    order = [(s, rel, label) for s in ("train", "test") for rel, label in scan_.files[s]]
    decoded = decode_images([str(root / rel) for _, rel, _ in order], size, workers)
    bad = [rel for (_, rel, _), a in zip(order, decoded) if a is None]
    if len(bad) > MAX_BAD_SHARE * len(order):
        raise DatasetNotFound(f"{len(bad)} of the {len(order)} images under {root} are unreadable or corrupt "
                              f"(more than {MAX_BAD_SHARE:.0%}), e.g. {bad[0]}; nothing was cached")
    channels = 3 if any(a is not None and a.ndim == 3 for a in decoded) else 1
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        keep = [(a, label) for (s, _, label), a in zip(order, decoded) if s == split and a is not None]
        labels = np.array([label for _, label in keep], np.int64)
        missing = [scan_.classes[c] for c in np.flatnonzero(np.bincount(labels, minlength=len(scan_.classes)) == 0)]
        if split == "train" and missing:
            raise DatasetNotFound(f"class folder(s) {', '.join(missing[:5])} under {root} hold no readable "
                                  f"training image; nothing was cached")
        arrays[f"{split}_images"] = _stack([a for a, _ in keep], channels)
        arrays[f"{split}_labels"] = labels
    mean, std = channel_stats(arrays["train_images"])
    if bad:
        log.warning(f"budgetnet: warning: skipped {len(bad)} unreadable image(s) of {len(order)} under {root} "
                    f"(e.g. {bad[0]})")
    write_manifest(scan_)
    payload = dict(arrays, classes=np.array(scan_.classes), mean=np.array(mean), std=np.array(std),
                   fingerprint=np.array(scan_.fingerprint(size)), layout=np.array(scan_.layout),
                   skipped=np.array(bad, dtype=str))
    return _write_first(_cache_paths(root, size), lambda f: np.savez(f, **payload))


def open_folder(root: str | os.PathLike, image_size: int | None = None):
    """The cache of an image folder at ``image_size`` px (built first when missing or stale), as an open
    ``np.load`` archive: arrays are read from it only when asked for."""
    size = image_size or FOLDER_IMAGE_SIZE
    found = scan(Path(root))
    state, path = cache_state(found, size)
    if state != "fresh":
        path = build_cache(found, size)
    write_manifest(found)  # a fresh cache whose manifest was deleted: the split is written down again
    return np.load(path, allow_pickle=False)


def _info(z, dataset: str, size: int) -> DatasetInfo:
    mean, std, n_train = tuple(z["mean"].tolist()), tuple(z["std"].tolist()), len(z["train_labels"])
    return DatasetInfo(dataset, len(mean), len(z["classes"]), size, n_train,
                       max(1, min(MAX_DEFAULT_VAL, n_train // 10)), mean, std)


def folder_info(dataset: str, image_size: int | None = None) -> DatasetInfo:
    """The ``DatasetInfo`` of a ``folder:PATH`` dataset (the cache is built first when needed)."""
    size = image_size or FOLDER_IMAGE_SIZE
    with open_folder(folder_root(dataset), size) as z:  # only the small arrays are read
        return _info(z, dataset, size)


def read_folder_split(dataset: str, train: bool, image_size: int | None = None):
    """One split of a ``folder:PATH`` dataset: (uint8 N x C x H x W, int64 N, class names)."""
    return load_folder_split(dataset, train, image_size)[:3]


def load_folder_split(dataset: str, train: bool, image_size: int | None = None):
    """One split and the ``DatasetInfo`` of a ``folder:PATH`` dataset from one scan of its files:
    (uint8 N x C x H x W, int64 N, class names, info)."""
    size = image_size or FOLDER_IMAGE_SIZE
    split = "train" if train else "test"
    with open_folder(folder_root(dataset), size) as z:
        return z[f"{split}_images"], z[f"{split}_labels"], z["classes"].tolist(), _info(z, dataset, size)


def describe(dataset: str, image_size: int | None = None) -> dict:
    """What ``budgetnet datasets folder:PATH`` prints: layout, classes, counts per split, cache state.
    Nothing is decoded or written."""
    size = image_size or FOLDER_IMAGE_SIZE
    found = scan(folder_root(dataset))
    state, path = cache_state(found, size)
    d = {"dataset": dataset, "layout": found.layout, "classes": found.classes, "counts": found.counts(),
         "image_size": size, "cache": state, "cache_path": str(path) if path else None}
    if state == "fresh":
        with np.load(path, allow_pickle=False) as z:
            d.update(channels=int(z["test_images"].shape[1]), skipped=len(z["skipped"]))
    return d
