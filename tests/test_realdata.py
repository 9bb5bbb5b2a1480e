"""Real data: Fashion-MNIST from Debian's dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist).

Skipped when the Debian files are absent, or when BUDGETNET_REALDATA=0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from budgetnet.config import DataConfig, PlainConfig, RunConfig, TrainConfig
from budgetnet.data import DEBIAN_FASHION_MNIST, load_data, load_test, normalizer
from budgetnet.train import evaluate_model, train_run

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").exists()
                       or os.environ.get("BUDGETNET_REALDATA") == "0",
                       reason=f"Fashion-MNIST not installed at {DEBIAN_FASHION_MNIST}"),
]


def test_real_fashion_mnist_trains_to_a_sensible_accuracy():
    cfg = RunConfig(model=PlainConfig(n_conv=2, width=16, hidden=(64,)),
                    train=TrainConfig(lr=0.05, batch_size=128, eval_points=2),
                    data=DataConfig(dataset="fashion_mnist", crop_padding=0, flip=False))
    data = load_data(cfg.data, device="cpu")
    assert len(data.train) == 55_000 and len(data.val) == 5_000
    assert data.classes[0] == "T-shirt/top"
    result = train_run(cfg, data, device="cpu", seconds=25)
    assert result.status == "complete"
    test, _ = load_test("fashion_mnist")
    assert len(test) == 10_000
    from budgetnet.models import build_model

    model = build_model(cfg.model, data.info.shape)
    model.load_state_dict(result.state_dict)
    acc = evaluate_model(model, test, normalizer(data.info, "cpu"), __import__("torch").device("cpu"))["val_acc"]
    assert acc > 0.80, acc


def test_real_fashion_mnist_search_then_evaluate(tmp_path):
    cmd = [sys.executable, "-m", "budgetnet", "search", "--dataset", "fashion_mnist", "--max-params", "1e6",
           "--hours", "0.02", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--out", str(tmp_path / "best.pt"),
           "--artifact-dir", str(tmp_path / "art"), "--device", "cpu", "--json"]
    search = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    assert search.returncode == 0, search.stderr
    summary = json.loads(search.stdout.strip().splitlines()[-1])
    assert summary["seconds_used"] <= 72 + 15
    assert summary["n_params"] <= 1e6
    ev = subprocess.run([sys.executable, "-m", "budgetnet", "evaluate", str(tmp_path / "best.pt"), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr
    report = json.loads(ev.stdout)
    assert report["test_images"] == 10_000 and report["top1"] > 0.6, report["top1"]
