"""Real data: Fashion-MNIST from Debian's dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist).

Skipped when the Debian files are absent, or when BUDGETNET_REALDATA=0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from budgetnet.config import DataConfig
from budgetnet.data import load_data, load_test
from budgetnet.datasets.builtin import DEBIAN_FASHION_MNIST

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").exists()
                       or os.environ.get("BUDGETNET_REALDATA") == "0",
                       reason=f"Fashion-MNIST not installed at {DEBIAN_FASHION_MNIST}"),
]


def test_real_fashion_mnist_loads_in_its_splits_with_its_class_names():
    # Training on it, with its accuracy checked on the test split, is the search test below.
    data = load_data(DataConfig(dataset="fashion_mnist"), device="cpu")
    assert len(data.train) == 55_000 and len(data.val) == 5_000
    assert data.classes[0] == "T-shirt/top" and len(data.classes) == 10
    assert data.train.images.shape[1:] == (1, 28, 28) and data.train.images.dtype == torch.uint8
    assert torch.bincount(data.train.labels, minlength=10).min() > 5_000  # every class, about 6,000 each
    test, _ = load_test("fashion_mnist")
    assert len(test) == 10_000


def test_real_fashion_mnist_search_then_evaluate(tmp_path):
    cmd = [sys.executable, "-m", "budgetnet", "search", "--dataset", "fashion_mnist", "--max-params", "1e6",
           "--hours", "0.01", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--out", str(tmp_path / "best.pt"),
           "--artifact-dir", str(tmp_path / "art"), "--device", "cpu", "--json"]
    search = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    assert search.returncode == 0, search.stderr
    summary = json.loads(search.stdout.strip().splitlines()[-1])
    assert summary["seconds_used"] <= 36 + 15
    assert summary["n_params"] <= 1e6
    ev = subprocess.run([sys.executable, "-m", "budgetnet", "evaluate", str(tmp_path / "best.pt"), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr
    report = json.loads(ev.stdout)
    assert report["test_images"] == 10_000 and report["top1"] > 0.6, report["top1"]
