"""Shared test helpers: fabricate tiny datasets in the standard on-disk formats, and cheap fixtures.

The ``write_*`` functions are plain functions (usable from any test module, e.g. ``from conftest import
write_cifar100``); the fixtures wrap them for the common case.

* ``write_cifar100(root, n_train, n_test)`` writes ``root/cifar-100-python/{train,test,meta}`` exactly as
  torchvision downloads them: Python 2 ``cPickle`` protocol-2 files (byte strings as py2 ``str``, numpy
  arrays via ``numpy.core.multiarray._reconstruct``), ``data`` an N x 3072 uint8 array (R, G, B planes of
  a 32 x 32 image, row-major), ``fine_labels``/``coarse_labels`` lists of int, ``meta`` with
  ``fine_label_names``/``coarse_label_names``. ``write_cifar10`` does the same for ``cifar-10-batches-py``.
* ``write_idx`` / ``write_fashion_mnist(root, n_train, n_test)`` write MNIST idx files (``.gz`` by default)
  under ``root/FashionMNIST/raw``, the layout torchvision uses.
* ``postgres_url``: an empty database of a throwaway PostgreSQL server, one per test (``postgres_server``
  starts the server once a session).
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import io
import os
import pickle
import pwd
import shutil
import socket
import struct
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

# Every test model here is tiny: intra-op parallelism gains nothing, and on a shared 2-core machine
# OpenMP threads spin-waiting for a busy core made single ops 10-100x slower (seconds for a 2-image
# backward pass). One thread keeps the suite fast and its timings stable. BUDGETNET_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("BUDGETNET_TEST_THREADS", "1")))

CIFAR100_FINE = [f"fine{i:02d}" for i in range(100)]
CIFAR100_COARSE = [f"coarse{i:02d}" for i in range(20)]


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's ``cPickle.dump(d, f, 2)`` wrote for the CIFAR files.

    Python 3 pickles ``bytes`` at protocol 2 through ``_codecs.encode`` and names numpy's
    ``numpy._core.multiarray``; Python 2 wrote byte strings as (SHORT_)BINSTRING and named
    ``numpy.core.multiarray``. We reproduce the latter, so the loader is tested against the real format.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None) -> None:
        if obj is _np_reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_pickle_dump(obj, path: Path) -> None:
    """Pickle ``obj`` the way Python 2 did (use ``bytes`` keys and strings for py2 ``str``)."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    Path(path).write_bytes(buf.getvalue())


def cifar_images(n: int, seed: int) -> np.ndarray:
    """n random images as CIFAR stores them: uint8, N x 3072 (channel planes, row-major)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar100(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    """Write a tiny CIFAR-100 in torchvision's ``cifar-100-python`` layout under ``root``.

    Returns what was written: ``{"train": (data, fine_labels), "test": (...), "classes": [...]}`` with
    ``data`` as N x 3072 uint8 and labels as int64 arrays.
    """
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    written = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 100)):
        data = cifar_images(n, s)
        fine = rng.integers(0, 100, n)
        obj = {
            b"filenames": [f"img_{split}_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{split} batch".encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) // 5 for v in fine],
            b"data": data,
        }
        py2_pickle_dump(obj, folder / split)
        written[split] = (data, fine.astype(np.int64))
    py2_pickle_dump({b"fine_label_names": [c.encode() for c in CIFAR100_FINE],
                     b"coarse_label_names": [c.encode() for c in CIFAR100_COARSE]}, folder / "meta")
    written["classes"] = list(CIFAR100_FINE)
    return written


def write_cifar10(root: Path, n_per_batch: int = 4, n_test: int = 6, seed: int = 0) -> dict:
    """Write a tiny CIFAR-10 in torchvision's ``cifar-10-batches-py`` layout (5 train batches, test, meta)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for k, name in enumerate(names):
        n = n_test if name == "test_batch" else n_per_batch
        data = cifar_images(n, seed + 10 * k)
        labels = rng.integers(0, 10, n)
        py2_pickle_dump({b"batch_label": name.encode(), b"labels": [int(v) for v in labels], b"data": data,
                         b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}, folder / name)
        written[name] = (data, labels.astype(np.int64))
    classes = [f"c10_{i}" for i in range(10)]
    py2_pickle_dump({b"num_cases_per_batch": n_per_batch, b"label_names": [c.encode() for c in classes],
                     b"num_vis": 3072}, folder / "batches.meta")
    written["classes"] = classes
    return written


def idx_bytes(arr: np.ndarray) -> bytes:
    """MNIST idx encoding of a uint8 array: magic 0x0000 08 ndim, big-endian int32 sizes, data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">i", s) for s in arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray | None = None, *, raw: bytes | None = None) -> Path:
    """Write an idx file (gzip-compressed if ``path`` ends in .gz); ``raw`` writes given bytes instead."""
    data = idx_bytes(arr) if raw is None else raw
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_fashion_mnist(root: Path, n_train: int = 12, n_test: int = 6, seed: int = 0, gz: bool = True) -> dict:
    """Write the four Fashion-MNIST idx files under ``root/FashionMNIST/raw``; returns the arrays."""
    raw = Path(root) / "FashionMNIST" / "raw"
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        written[prefix] = (images, labels.astype(np.int64))
    return written


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture
def cifar100_dir(tmp_path) -> tuple[Path, dict]:
    """(data_dir, written) for a 20-train / 10-test fabricated CIFAR-100."""
    return tmp_path, write_cifar100(tmp_path, 20, 10)


@pytest.fixture
def fashion_mnist_dir(tmp_path) -> tuple[Path, dict]:
    """(data_dir, written) for a 12-train / 6-test fabricated Fashion-MNIST (.gz idx files)."""
    return tmp_path, write_fashion_mnist(tmp_path, 12, 6)


@pytest.fixture(scope="session")
def synthetic_data():
    """The built-in synthetic dataset, loaded once per session on the CPU (2,000 train / 400 val).

    Tests must not modify its tensors.
    """
    from budgetnet.config import DataConfig
    from budgetnet.data import load_data

    return load_data(DataConfig(dataset="synthetic"), device="cpu")


@pytest.fixture(scope="session")
def warm_torch():
    """Pay torch's one-off first-optimizer cost (~2 s: lazy imports) outside of any timed run."""
    from budgetnet.config import TrainConfig
    from budgetnet.recipe import make_optimizer

    model = torch.nn.Linear(2, 2)
    make_optimizer(model, TrainConfig())
    make_optimizer(model, TrainConfig(optimizer="adamw"))
    return True


@pytest.fixture(scope="session")
def slice_s(synthetic_data) -> float:
    """A trial slice for the search tests, from this machine's measured speed, not a fixed guess: long
    enough for ~60 training steps of a small synthetic-task net (at batch 64), and at least 3 s."""
    from budgetnet.config import DataConfig, PlainConfig, RunConfig, TrainConfig
    from budgetnet.train import train_run

    cfg = RunConfig(model=PlainConfig(n_conv=2, width=8, hidden=(32,)), train=TrainConfig(batch_size=64),
                    data=DataConfig(dataset="synthetic"))
    result = train_run(cfg, synthetic_data, device="cpu", epochs=0.5)
    return max(3.0, 60 * 64 / result.images_per_s)


# -- a throwaway PostgreSQL ---------------------------------------------------------------------------

def _postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL's binaries (not on PATH there), else those on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[4].split(".")])
    if found:
        return Path(found[-1]).parent
    return Path(shutil.which("initdb")).parent if shutil.which("initdb") else None


def _unavailable(reason: str) -> None:
    """Skip, but fail under CI: there the PostgreSQL tests must run, never skip unseen."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason}; CI is set, so the PostgreSQL tests may not skip")
    pytest.skip(reason)


def _as_user(uid: int, gid: int):
    def demote() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return demote


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for this test session: ``postgresql://budgetnet@127.0.0.1:PORT/postgres``
    (superuser budgetnet, trust authentication, no password). A cluster made by ``initdb`` in a temporary
    folder, listening on 127.0.0.1 on a free port (and a socket in that folder), without fsync, run as
    ``nobody`` when the tests run as root (PostgreSQL refuses root), stopped and removed at the end.
    ``BUDGETNET_TEST_POSTGRES=<url>`` uses that server instead (a user who may create databases).
    No PostgreSQL binaries or no psycopg: the tests skip, or fail where the environment variable CI is set."""
    if os.environ.get("BUDGETNET_TEST_POSTGRES"):
        yield os.environ["BUDGETNET_TEST_POSTGRES"]
        return
    if importlib.util.find_spec("psycopg") is None:
        _unavailable("psycopg is not installed (pip install -e '.[dev]')")
    bindir = _postgres_bindir()
    if bindir is None:
        _unavailable("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="budgetnet-pg-"))  # under /tmp: nobody must reach it
    run = {"env": {**os.environ, "LC_ALL": "C"}, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE,
           "text": True, "timeout": 60}
    if os.geteuid() == 0:
        user = pwd.getpwnam("nobody")
        os.chown(root, user.pw_uid, user.pw_gid)
        run["preexec_fn"] = _as_user(user.pw_uid, user.pw_gid)
    data, started = root / "data", False
    try:
        made = subprocess.run([bindir / "initdb", "-D", data, "-A", "trust", "-U", "budgetnet", "-E", "UTF8",
                               "--locale=C", "--no-sync"], **run)
        assert made.returncode == 0, f"initdb failed: {made.stderr}"
        with socket.socket() as s:  # a free port now; another process taking it first fails the start
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off")
        up = subprocess.run([bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-o", options, "-w",
                             "-t", "30", "start"], **run)
        started = up.returncode == 0
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        assert started, f"pg_ctl start failed: {up.stderr}{log[-2000:]}"
        yield f"postgresql://budgetnet@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run([bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], **run)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A new, empty database on ``postgres_server`` for one test (its URL, without a driver: as a user gives
    it), dropped after it. Every test has its own, so study names need not differ between tests."""
    import psycopg
    from sqlalchemy.engine import make_url

    server = make_url(postgres_server).set(drivername="postgresql")
    admin = server.render_as_string(hide_password=False)
    name = f"budgetnet_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield server.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:  # FORCE: also what a killed test process left open
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
