"""``budgetnet export``: every family (pruned too) as ONNX, int8 and TorchScript, taking pixel values at any
batch size, checked against PyTorch before anything is written; hostile files refused unrun."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import write_cifar10

from budgetnet import export
from budgetnet.budget import count_flops, count_params
from budgetnet.checkpoint import load_checkpoint, model_from_checkpoint, recorded_info, save_checkpoint
from budgetnet.cli import main
from budgetnet.config import (
    DataConfig,
    MobileNetConfig,
    PlainConfig,
    ResNetConfig,
    RunConfig,
    TrainConfig,
)
from budgetnet.data import normalizer
from budgetnet.datasets.info import DATASET_INFO
from budgetnet.evaluate import file_sha256
from budgetnet.models import build_model
from budgetnet.prune import prune_model

SHAPE = DATASET_INFO["synthetic"].shape  # 3 x 32 x 32, 10 classes
CONFIGS = {
    "plain": PlainConfig(n_conv=2, width=8, hidden=(24,), activation="prelu"),
    "resnet": ResNetConfig(depths=(1, 1, 1), widths=(8, 16, 16), stem_width=8),  # zero-padded shortcuts
    "resnet-bottleneck": ResNetConfig(block="bottleneck", depths=(1, 1), widths=(4, 8), stem_width=8,
                                      activation="silu"),
    "mobilenet": MobileNetConfig(stem_width=8, widths=(8, 16), depths=(1, 2), strides=(1, 2), expansion=3,
                                 head_width=24, activation="gelu"),
}
FAST = {"images": 96, "latency_seconds": 0.0, "latency_rounds": 1, "log": lambda line: None}


def _save(path: Path, model_cfg, model: torch.nn.Module, dataset: str = "synthetic", classes=None) -> Path:
    cfg = RunConfig(model=model_cfg, train=TrainConfig(batch_size=32, eval_points=1), data=DataConfig(dataset=dataset))
    info = DATASET_INFO[dataset]
    return save_checkpoint(path, cfg, model.state_dict(), metrics={}, n_params=count_params(model_cfg, info.shape),
                           flops=count_flops(model_cfg, info.shape),
                           classes=classes or [f"class{i}" for i in range(10)], train_seconds=1.0, precision="fp32")


def _seeded(model_cfg, shape=SHAPE) -> torch.nn.Module:
    """Seeded weights, and batch-norm statistics that are not the identity, so the export must carry them."""
    torch.manual_seed(0)
    model = build_model(model_cfg, shape)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    out = {name: _save(root / f"{name}.pt", cfg, _seeded(cfg)) for name, cfg in CONFIGS.items()}
    for name in ("resnet", "mobilenet"):  # pruned as `budgetnet prune` writes them: conv_widths in the config
        pruned, pruned_cfg = prune_model(_seeded(CONFIGS[name]), CONFIGS[name], SHAPE, 0.5)
        assert pruned_cfg.conv_widths is not None
        out[f"{name}-pruned"] = _save(root / f"{name}-pruned.pt", pruned_cfg, pruned)
    return out


def _eager_on_normalised(ckpt_path: Path, pixels: np.ndarray) -> np.ndarray:
    """What PyTorch computes for uint8 images normalised as in training (data.normalizer)."""
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt)
    with torch.no_grad():
        return model(normalizer(recorded_info(ckpt), "cpu")(torch.from_numpy(pixels))).numpy()


def _pixels(n: int, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *(SHAPE.channels, SHAPE.image_size, SHAPE.image_size)),
                                                dtype=np.uint8)


@pytest.mark.parametrize("name", [*CONFIGS, "resnet-pruned", "mobilenet-pruned"])
def test_every_family_exports_to_onnx_taking_pixels_at_any_batch_size(name, checkpoints, tmp_path):
    out = tmp_path / "model.onnx"
    report = export.export_checkpoint(checkpoints[name], out, **FAST)
    assert report["fp32"]["agreement"] >= 0.999 and report["fp32"]["max_abs_diff"] < 1e-3
    assert report["check"] == {"source": "test", "images": 96, "note": ""}  # synthetic's own test split
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # the batch axis is dynamic; [0, 255] pixels in, the training normalisation inside
        pixels = _pixels(batch)
        got = session.run(None, {"pixels": pixels.astype(np.float32)})[0]
        want = _eager_on_normalised(checkpoints[name], pixels)
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_json_beside_the_model_says_how_to_feed_it_and_where_it_came_from(checkpoints, tmp_path):
    out = tmp_path / "net.onnx"
    report = export.export_checkpoint(checkpoints["resnet"], out, **FAST)
    side = json.loads((tmp_path / "net.json").read_text())
    assert side["classes"] == [f"class{i}" for i in range(10)]
    assert side["input"]["shape"] == ["batch", 3, 32, 32] and side["input"]["layout"] == "NCHW"
    assert side["input"]["range"] == [0, 255] and side["input"]["dtype"] == "float32"
    assert side["input"]["mean"] == [0.5, 0.5, 0.5] and side["input"]["channels"] == 3
    assert side["source"]["sha256"] == file_sha256(checkpoints["resnet"]) == report["checkpoint_sha256"]
    assert side["model_sha256"] == file_sha256(out) and side["model_file"] == "net.onnx"
    assert side["model_format"] == "onnx" and side["int8"] is False and side["source"]["family"] == "resnet"
    assert side["check"]["fp32"]["agreement"] == report["fp32"]["agreement"] and side["check"]["source"] == "test"
    assert set(report["eager"]["latency_ms"]) == set(report["fp32"]["latency_ms"]) == {"1", "256"}


def test_int8_is_smaller_runs_and_reports_top1_before_and_after(tmp_path, synthetic_data):
    from budgetnet.train import train_run

    cfg = RunConfig(model=PlainConfig(n_conv=2, width=16, hidden=(128,)), train=TrainConfig(batch_size=64),
                    data=DataConfig(dataset="synthetic"))
    result = train_run(cfg, synthetic_data, device="cpu", epochs=2)  # above chance: top-1 means something
    torch.manual_seed(0)
    model = build_model(cfg.model, SHAPE)
    model.load_state_dict(result.state_dict)
    ckpt = _save(tmp_path / "trained.pt", cfg.model, model)
    out = tmp_path / "int8.onnx"
    report = export.export_checkpoint(ckpt, out, int8=True, calibration_images=64, int8_max_drop=0.05,
                                      **{**FAST, "images": 0})
    q, fp32 = report["int8"], report["fp32"]
    assert out.stat().st_size == q["size_bytes"] < fp32["size_bytes"] / 2  # int8 weights: a quarter, plus scales
    assert report["check"]["images"] == 600 and fp32["top1"] > 0.2 and q["top1"] > 0.2  # chance: 0.1
    assert q["top1_drop"] == pytest.approx(fp32["top1"] - q["top1"]) and q["calibration_images"] == 64
    assert q["target"] in export.INT8_SCHEMES and 0.5 < q["agreement_fp32"] <= 1
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in __import__("onnx").load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    assert session.run(None, {"pixels": _pixels(3).astype(np.float32)})[0].shape == (3, 10)
    assert json.loads((tmp_path / "int8.json").read_text())["int8"] is True
    assert "int8" in export.format_export_report(report)


def test_an_export_that_disagrees_with_pytorch_is_not_written(checkpoints, tmp_path, monkeypatch, capsys):
    """The check compares with the checkpoint itself: a graph that computes something else fails it."""
    real = export.onnx_model

    def other_weights(module, shape):
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(torch.randn_like(p))
        return real(module, shape)

    monkeypatch.setattr(export, "onnx_model", other_weights)
    out = tmp_path / "model.onnx"
    assert main(["export", str(checkpoints["plain"]), "--out", str(out), "--images", "96"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "agrees with PyTorch on" in err[0] and "nothing written" in err[0]
    assert not out.exists() and not (tmp_path / "model.json").exists()


def test_an_int8_model_that_loses_too_much_top1_is_not_written(tmp_path, monkeypatch):
    """Refused on its measured top-1: here the 'quantised' graph is another net's, and the labels are the
    checkpoint's own answers (it scores 100%, the other net about chance)."""
    cfg = CONFIGS["plain"]
    ckpt = _save(tmp_path / "plain.pt", cfg, _seeded(cfg))
    monkeypatch.setattr(export, "int8_model", lambda fp32, calibration, target: _other_graph(cfg))
    sample = export.check_sample(ckpt, load_checkpoint(ckpt), 96)
    perfect = _eager_on_normalised(ckpt, sample.images.numpy()).argmax(1)  # labels the fp32 graph gets right
    monkeypatch.setattr(export, "check_sample", lambda *a, **k: export.Sample(sample.images, perfect, "test"))
    with pytest.raises(export.ExportCheckFailed, match="int8-max-drop"):
        export.export_checkpoint(ckpt, tmp_path / "q.onnx", int8=True, calibration_images=32, **FAST)
    assert not (tmp_path / "q.onnx").exists()


def _other_graph(cfg) -> bytes:
    torch.manual_seed(99)
    other = build_model(cfg, SHAPE).eval()
    return export.onnx_model(export.PixelInput(other, (0.5,) * 3, (0.25,) * 3), (3, 32, 32))


def test_torchscript_export_runs_in_pytorch_at_any_batch_size(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # TorchScript needs no extra
    out = tmp_path / "model.ts"
    assert main(["export", str(checkpoints["mobilenet-pruned"]), "--format", "torchscript", "--out", str(out),
                 "--images", "64", "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "torchscript" and report["fp32"]["agreement"] >= 0.999
    scripted = torch.jit.load(str(out))
    for batch in (1, 7):
        pixels = _pixels(batch, seed=batch)
        with torch.no_grad():
            got = scripted(torch.from_numpy(pixels).float()).numpy()
        np.testing.assert_allclose(got, _eager_on_normalised(checkpoints["mobilenet-pruned"], pixels),
                                   rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "model.json").read_text())["model_format"] == "torchscript"


class _Marker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["pickle_with_code", "torch_file_with_code", "random_bytes", "foreign_torch_file"])
def test_a_hostile_or_foreign_file_is_refused_without_running_anything(kind, tmp_path, capsys):
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    if kind == "pickle_with_code":
        path.write_bytes(pickle.dumps({"format": "budgetnet-checkpoint", "state_dict": _Marker(marker)}))
    elif kind == "torch_file_with_code":
        torch.save({"format": "budgetnet-checkpoint", "format_version": 1, "x": _Marker(marker)}, path)
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    assert main(["export", str(path), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("budgetnet: error:") and "checkpoint" in err[0]
    assert not marker.exists(), "the file's code ran"
    assert not (tmp_path / "m.onnx").exists()


def test_without_the_extra_onnx_export_says_how_to_install_it(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: importing it fails
    assert main(["export", str(checkpoints["plain"]), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'budgetnet[export]'" in err[0]


@pytest.mark.parametrize("case", ["int8_torchscript", "over_search_json", "out_is_json", "out_is_checkpoint"])
def test_mistakes_are_one_line_and_touch_nothing(case, checkpoints, tmp_path, capsys):
    ckpt = str(checkpoints["plain"])
    args = {"int8_torchscript": ["--format", "torchscript", "--int8", "--out", str(tmp_path / "m.ts")],
            "over_search_json": ["--out", str(tmp_path / "best.onnx")],
            "out_is_json": ["--out", str(tmp_path / "m.json")],
            "out_is_checkpoint": ["--format", "torchscript", "--out", ckpt]}[case]
    search_json = tmp_path / "best.json"
    search_json.write_text('{"best_trial": 3}')  # a search's summary beside its best.pt
    before = Path(ckpt).read_bytes()
    assert main(["export", ckpt, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("budgetnet: error:")
    assert search_json.read_text() == '{"best_trial": 3}' and Path(ckpt).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]


def test_checked_on_test_images_else_training_images_else_random_pixels_said_so(tmp_path, capsys):
    cfg = PlainConfig(n_conv=1, width=4, hidden=())
    data = tmp_path / "data"
    written = write_cifar10(data, n_per_batch=4, n_test=6)
    torch.manual_seed(0)
    ckpt = _save(tmp_path / "c10.pt", cfg, build_model(cfg, SHAPE).eval(), dataset="cifar10",
                 classes=written["classes"])
    found = export.export_checkpoint(ckpt, tmp_path / "a.onnx", data_dir=data, **FAST)
    assert found["check"] == {"source": "test", "images": 6, "note": ""} and found["eager"]["top1"] is not None
    (data / "cifar-10-batches-py" / "test_batch").unlink()
    notes = []
    train = export.export_checkpoint(ckpt, tmp_path / "b.onnx", data_dir=data, **{**FAST, "log": notes.append})
    assert train["check"]["source"] == "train" and train["check"]["images"] == 20
    assert len(notes) == 1 and "checked on training images instead" in notes[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    none = export.export_checkpoint(ckpt, tmp_path / "c.onnx", data_dir=empty, **{**FAST, "log": notes.append})
    assert none["check"]["source"] == "synthetic" and none["check"]["images"] == 96
    assert none["eager"]["top1"] is None and none["fp32"]["top1"] is None and none["fp32"]["agreement"] >= 0.999
    assert len(notes) == 2 and "random pixels" in notes[1]
    # --int8 calibrates on training images: with none, one line and exit 2, nothing written
    assert main(["export", str(ckpt), "--int8", "--data-dir", str(empty), "--out", str(tmp_path / "d.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibrates on the checkpoint's training images" in err[0]
    assert not (tmp_path / "d.onnx").exists()


def test_int8_is_quantised_for_this_cpu_unless_told_which(checkpoints, tmp_path):
    from budgetnet.device import cpu_family

    assert cpu_family() in export.INT8_SCHEMES  # what --int8-for auto picks
    report = export.export_checkpoint(checkpoints["plain"], tmp_path / "arm.onnx", int8=True, int8_for="arm",
                                      calibration_images=32, int8_max_drop=1.0, **FAST)
    assert report["int8"]["target"] == "arm"
    assert json.loads((tmp_path / "arm.json").read_text())["int8_target"] == "arm"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_flip_checkpoint_exports_its_flip_average_as_one_graph(fmt, tmp_path):
    cfg = CONFIGS["resnet"]
    plain = _save(tmp_path / "plain.pt", cfg, _seeded(cfg))
    raw = torch.load(plain, weights_only=True)
    flip = save_checkpoint(tmp_path / "flip.pt", RunConfig.from_json(raw["config"]), raw["state_dict"], metrics={},
                           n_params=raw["n_params"], flops=2 * raw["flops"], classes=raw["classes"],
                           train_seconds=1.0, precision="fp32", tta="flip")
    out = tmp_path / f"model.{fmt}"
    report = export.export_checkpoint(flip, out, fmt=fmt, **FAST)
    assert report["fp32"]["agreement"] >= 0.999
    pixels = _pixels(4)
    one = _eager_on_normalised(plain, pixels)
    mirrored = _eager_on_normalised(plain, np.ascontiguousarray(pixels[..., ::-1]))
    if fmt == "onnx":
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"pixels": pixels.astype(np.float32)})[0]
    else:
        got = torch.jit.load(str(out))(torch.from_numpy(pixels).float()).detach().numpy()
    np.testing.assert_allclose(got, (one + mirrored) / 2, rtol=1e-4, atol=1e-4)
    assert np.abs(one - mirrored).max() > 1e-3  # the views differ: the graph must hold both to match
    assert json.loads((tmp_path / "model.json").read_text())["source"]["tta"] == "flip"
