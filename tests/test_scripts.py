"""The benchmark scripts run end to end at toy sizes (their numbers are measured in docs/benchmarks.md,
never asserted here): a GPU session has minutes, not retries, to spend on them."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_fashion_mnist

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_bench_pipeline_reports_every_pipeline_and_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = _load("bench_pipeline").main(["--device", "cpu", "--images", "64", "--batch-size", "32", "--workers", "0",
                                       "--warmup", "1", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"a", "b", "c", "aug_batched", "aug_per_sample"}
    for k, r in report["results"].items():
        assert r["images"] == 64 and r["images_per_s"] > 0, k
    assert report["results"]["aug_batched"]["setup_seconds"] > 0  # the store build is timed apart
    assert set(report["ratios"]) == {"a_over_c", "a_over_b", "aug_batched_over_per_sample"}
    assert report["train_run_images_per_s"] > 0  # the cross-check epoch through train_run completed
    printed = capsys.readouterr().out
    assert "| augmentation: batched / per-sample |" in printed and "augmentation store build" in printed


def test_bench_pipeline_only_augment(tmp_path):
    out = tmp_path / "aug.json"
    rc = _load("bench_pipeline").main(["--device", "cpu", "--images", "64", "--batch-size", "32", "--warmup", "1",
                                       "--repeats", "2", "--only-augment", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert len(report["aug_batched"]["images_per_s_all"]) == 2 and report["aug_per_sample"]["images"] == 64


def test_bench_pipeline_rejects_fewer_images_than_a_batch():
    with pytest.raises(SystemExit) as e:
        _load("bench_pipeline").main(["--device", "cpu", "--images", "16", "--batch-size", "32"])
    assert e.value.code == 2


def test_bench_precision_reports_every_model_and_precision_against_fp32(tmp_path, capsys):
    out = tmp_path / "prec.json"
    rc = _load("bench_precision").main(["--batch-size", "8", "--steps", "1", "--warmup", "1", "--repeats", "1",
                                        "--fp16", "--models", "resnet20", "plain", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {(r["model"], r["precision"]) for r in report["results"]} == {
        (m, p) for m in ("resnet20", "plain") for p in ("fp32", "bf16", "fp16", "fp32-nchw")} | {
        ("plain", "fp32-act-first")}  # the layer order is the plain net's only
    assert all(r["images_per_s"] > 0 for r in report["results"])
    assert [r["vs_fp32"] for r in report["results"] if r["precision"] == "fp32"] == [1.0, 1.0]
    assert report["auto"] == report["profile"]["precision"] in ("fp32", "bf16")
    assert "auto picks" in capsys.readouterr().out


def test_gpu_check_smoke_runs_every_step_on_the_cpu(tmp_path):
    import subprocess

    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHON=sys.executable))  # this interpreter, wherever it lives
    assert proc.returncode == 0, proc.stderr[-2000:]
    block = (tmp_path / "gpu_check.md").read_text()
    assert block in proc.stdout
    assert "`--precision auto` picks **" in block
    assert "| plain | fp16 |" in block  # the precision table
    assert "| a / c |" in block  # the pipeline's ratios
    assert "| plain |" in block.split("Eager against compiled")[1]  # the compiled step ran (traced only)
    (row,) = [line for line in block.splitlines() if line.startswith("| synthetic, 22 s |")]
    assert "| ok," in row and "overshoot" in row
    assert (tmp_path / "precision.json").exists() and (tmp_path / "synthetic, 22 s" / "study.db").exists()


def test_gpu_check_cuts_a_step_that_would_not_fit(tmp_path):
    """Each step's estimate is set against the time left: one that would not fit is cut, and the steps
    table says why; a cheaper one after it still runs. No step may run past the deadline."""
    check = _load("gpu_check")
    now, stops = [0.0], []

    def step(took):
        def fn(_, until):
            stops.append(until)
            now[0] += took
            return check.Result(["row"])
        return fn

    steps = [check.Step("a", "machine", 100, step(120)), check.Step("b", "tests", 300, step(0)),
             check.Step("c", "tests", 30, step(30))]
    done, rows = check.run_steps(steps, check.Check(sys.executable, True, tmp_path, []), check.RESERVE_S + 200,
                                 clock=lambda: now[0])
    assert [s.name for s, _ in done] == ["a", "c"]
    assert rows[1] == "| b | 300 s | - | cut: needs about 300 s, 80 s left |"
    assert stops == [200, 200]  # the deadline, before each step's own limit (4 x its estimate under --smoke)
    assert check.render(done) == ["", "row", "", "**CUDA tests** (`pytest -m gpu`):", "row"]


def test_bench_folder_search_writes_pngs_whose_cache_equals_the_idx_files(tmp_path):
    """The folder benchmark's own check, on fabricated idx files: the PNG folders it writes load (through
    the folder cache) as exactly the idx files' images and labels; one changed image is caught."""
    from PIL import Image

    bench = _load("bench_folder_search")
    data_dir, root = tmp_path / "idx", tmp_path / "png"
    write_fashion_mnist(data_dir, n_train=60, n_test=40, seed=1)
    n, _ = bench.write_pngs(root, str(data_dir))
    assert n == 100 and len(list(root.glob("*/*/*.png"))) == 100
    assert bench.write_pngs(root, str(data_dir))[1] == 0.0  # all there: not written again
    check = bench.check_cache(root, str(data_dir))
    assert check["train_equal"] and check["test_equal"], check
    first = sorted(root.glob("train/*/*.png"))[0]
    pixels = np.array(Image.open(first))
    Image.fromarray(255 - pixels).save(first)
    check = bench.check_cache(root, str(data_dir))
    assert not check["train_equal"] and check["test_equal"], check


def test_bench_pool_order_runs_both_orders_to_the_same_fit(capsys):
    assert _load("bench_pool_order").main(["--dataset", "synthetic", "--epochs", "0.3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    fits = [line.rsplit("fit ", 1)[1] for line in out.splitlines() if line.startswith("round 1:")]
    assert len(fits) == 2 and fits[0] == fits[1] != "None"  # the same function: the same fit, to the digit
    assert "| pool, then ReLU |" in out and "| ReLU, then pool |" in out
    from budgetnet.models import plain

    assert plain.MONOTONE == ("relu", "leaky_relu")  # restored


def test_bench_warm_start_prints_one_row_per_lr_and_counts_failed_runs(capsys):
    bench = _load("bench_warm_start")
    assert bench.main(["--max-params", "1e5", "--epochs", "0.1", "--seeds", "2", "--lrs", "0.05,1e-6",
                       "--failed", "0.5"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.05 |")
            or line.startswith("| 1e-06 |")]
    assert [r[0] for r in rows] == ["| 0.05", "| 1e-06"]
    assert len(rows[1][2].split(" / ")) == 2  # one accuracy per seed
    assert rows[1][-1] == "2 of 2 |"  # lr 1e-6 learns nothing in a tenth of an epoch: both runs under 50%


def test_bench_guard_smoke_times_the_param_and_mac_checks_and_the_latency_guard(capsys):
    assert _load("bench_guard").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ResNet")]
    assert len(rows) == 2 and all(line.count("|") == 8 for line in rows)  # every column filled, per config
    assert "MAC check (median ms)" in out and "latency guard" in out and "param + MAC check (cold)" in out


def test_bench_export_prints_the_table_of_eager_fp32_int8_and_torchscript(tmp_path, capsys):
    assert _load("bench_export").main(["--smoke", "--torchscript", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    names = [r.split(" | ")[0] for r in rows]
    assert names[:2] == ["| PyTorch eager", "| ONNX fp32, onnxruntime"] and names[3] == "| TorchScript (frozen), torch.jit"
    assert names[2].startswith("| ONNX int8 (QDQ, for ") and len(rows) == 4
    assert "(1.00x)" in rows[0] and "checked on 64 test images" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.int8.json", "tiny.int8.onnx", "tiny.ts.json",
                                                          "tiny.ts.pt"]
@pytest.mark.slow
def test_bench_transfer_smoke_runs_every_method_and_prints_the_table(tmp_path, capsys):
    bench = _load("bench_transfer")
    write_fashion_mnist(tmp_path / "data", 300, 100)
    out = tmp_path / "out"
    rc = bench.main(["--smoke", "--data-dir", str(tmp_path / "data"), "--root", str(tmp_path / "png"),
                     "--out-dir", str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == list(bench.METHODS)
    for r in rows:  # every method writes a model (a search's slices are 1 s)
        assert r["rc"] == 0 and r["test"] is not None, r
    assert len(list((tmp_path / "png" / "target-5" / "train").glob("*/*.png"))) == 25
    printed = capsys.readouterr().out
    assert "| `search --init` |" in printed and "| `train --init --freeze gradual` |" in printed
