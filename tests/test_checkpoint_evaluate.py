"""Checkpoints round-trip without pickled code; evaluate reads a fabricated CIFAR-100 test file."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from conftest import write_cifar100

from budgetnet import evaluate
from budgetnet.budget import count_flops, count_params
from budgetnet.checkpoint import (
    CheckpointError,
    deployed_model,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from budgetnet.cli import main
from budgetnet.config import DataConfig, MobileNetConfig, PlainConfig, ResNetConfig, RunConfig, TrainConfig
from budgetnet.data import load_data
from budgetnet.datasets.info import DATASET_INFO
from budgetnet.evaluate import evaluate_checkpoint, format_report
from budgetnet.train import train_run


def _tiny_cifar_checkpoint(tmp_path, n_train=64, n_test=40):
    write_cifar100(tmp_path, n_train, n_test)
    cfg = RunConfig(model=PlainConfig(n_conv=2, width=8, hidden=(16,)),
                    train=TrainConfig(batch_size=16, eval_points=2),
                    data=DataConfig(dataset="cifar100", val_size=16))
    data = load_data(cfg.data, tmp_path)
    result = train_run(cfg, data, device="cpu", epochs=1)
    shape = DATASET_INFO["cifar100"].shape
    path = save_checkpoint(tmp_path / "best.pt", cfg, result.state_dict, metrics=result.metrics,
                           n_params=count_params(cfg.model, shape), flops=count_flops(cfg.model, shape),
                           classes=data.classes, train_seconds=result.seconds, precision=result.precision,
                           extra={"phase": "test"})
    return cfg, path, result


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    cfg, path, result = _tiny_cifar_checkpoint(tmp_path)
    raw = torch.load(path, weights_only=True)  # nothing in it needs pickled code
    assert raw["format"] == "budgetnet-checkpoint" and raw["dataset"] == "cifar100"
    assert raw["normalization"]["mean"] == list(DATASET_INFO["cifar100"].mean)
    assert len(raw["classes"]) == 100 and raw["versions"]["torch"] == str(torch.__version__)
    ckpt = load_checkpoint(path)
    assert ckpt["run_config"] == cfg
    model = model_from_checkpoint(ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, result.state_dict[k]), k
    assert not list(tmp_path.glob(".best.pt.*"))  # the temp file was renamed away


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    cfg, path, _ = _tiny_cifar_checkpoint(tmp_path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, cfg, {}, metrics={}, n_params=1, flops=1, classes=[], train_seconds=0,
                        precision="fp32")
    assert path.read_bytes() == before  # the old best.pt is intact
    assert not list(tmp_path.glob(".best.pt.*"))


def test_evaluate_on_fabricated_cifar100_test_split(tmp_path):
    cfg, path, _ = _tiny_cifar_checkpoint(tmp_path)
    report = evaluate_checkpoint(path, tmp_path, "cpu", plots=tmp_path / "plots", latency_repeats=2,
                                 precision="fp32")
    assert report["test_images"] == 40 and report["precision"] == "fp32"
    assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
    assert report["loss"] > 0
    assert report["n_params_match"] and report["n_params"] == count_params(cfg.model, DATASET_INFO["cifar100"].shape)
    assert report["flops"] > 0
    assert [lat["batch_size"] for lat in report["latency"]] == [1, 256]
    assert all(lat["latency_ms"] > 0 and lat["images_per_s"] > 0 for lat in report["latency"])
    assert len(report["worst_classes"]) == 5
    for name in ("confusion.png", "predictions.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["predictions_png"] == str(tmp_path / "plots" / "predictions.png")

    # top-1 recomputed independently from the fabricated test file
    model = model_from_checkpoint(load_checkpoint(path))
    test = write_cifar100(tmp_path / "again", 64, 40)["test"]
    x = torch.from_numpy(test[0]).view(-1, 3, 32, 32).float() / 255
    mean = torch.tensor(DATASET_INFO["cifar100"].mean).view(1, 3, 1, 1)
    std = torch.tensor(DATASET_INFO["cifar100"].std).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = model(((x - mean) / std).contiguous(memory_format=torch.channels_last)).argmax(1)
    expected = (pred == torch.from_numpy(test[1])).float().mean().item()
    assert report["top1"] == pytest.approx(expected, abs=1 / 40 + 1e-9)
    # flip averaging, by hand: the mean of the softmax-free logits over each image and its mirror
    with torch.no_grad():
        both = model((x - mean) / std) + model(((x - mean) / std).flip(3))
    expected_flip = ((both / 2).argmax(1) == torch.from_numpy(test[1])).float().mean().item()
    assert report["top1_flip"] == pytest.approx(expected_flip, abs=1 / 40 + 1e-9)
    assert "flip-averaged top-1" in format_report(report)
    assert report["trained_with_flips"] == cfg.data.flip
    # a model trained without flips never saw a mirrored image (on Fashion-MNIST flip averaging cost such
    # models up to 4 points): the report says so beside the number
    plain = format_report({**report, "trained_with_flips": False})
    assert "trained without flips" in plain and "trained without flips" not in format_report(
        {**report, "trained_with_flips": True})


def test_flip_averaging_is_the_mean_of_the_logits_over_each_image_and_its_mirror():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 1, 6, 6), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (300,), generator=g)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 4))  # left and right weigh differently
    normalize = lambda u: u.float() / 255 - 0.5  # noqa: E731
    m = evaluate.test_metrics(model, images, labels, normalize, torch.device("cpu"), 4, batch_size=128)
    with torch.no_grad():
        x = normalize(images)
        plain = model(x)
        mean = (plain + model(x.flip(3))) / 2
    assert m["top1"] == (plain.argmax(1) == labels).sum().item() / 300
    assert m["top1_flip"] == (mean.argmax(1) == labels).sum().item() / 300
    assert (mean.argmax(1) != plain.argmax(1)).any()  # the two answers differ here: the check can fail
    deployed = evaluate.test_metrics(model, images, labels, normalize, torch.device("cpu"), 4, batch_size=128,
                                     tta="flip")  # every figure is the flip average's, one view's beside it
    assert deployed["top1"] == m["top1_flip"] and deployed["top1_single"] == m["top1"]
    assert torch.equal(deployed["confusion"].diag().sum(), torch.tensor(round(deployed["top1"] * 300)))


def test_evaluate_measures_in_the_precision_it_reports_with_weights_cast_once(tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    from budgetnet.evaluate import inference_model, model_input

    cfg, path, result = _tiny_cifar_checkpoint(tmp_path)
    assert load_checkpoint(path)["precision"] == result.precision  # what the run trained in
    report = evaluate_checkpoint(path, tmp_path, "cpu", latency_repeats=1, precision="bf16")
    assert report["precision"] == "bf16" and report["trained_precision"] == result.precision
    assert 0.0 <= report["top1"] <= 1.0

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    model = inference_model(model_from_checkpoint(load_checkpoint(path)), "bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), Casts() as casts:
        for _ in range(3):
            assert model(model_input(model, x)).dtype == torch.bfloat16
    assert casts.n == 3  # the input, once a call; never a weight (autocast re-casts every weight every call)


def test_evaluate_cli_json(tmp_path, capsys):
    _tiny_cifar_checkpoint(tmp_path)
    assert main(["evaluate", str(tmp_path / "best.pt"), "--data-dir", str(tmp_path), "--device", "cpu",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dataset"] == "cifar100" and report["test_images"] == 40
    # kept beside the checkpoint for `budgetnet report`, tied to the bytes it evaluated
    saved = json.loads((tmp_path / "best.eval.json").read_text())
    assert saved["top1"] == report["top1"]
    assert saved["checkpoint_sha256"] == hashlib.sha256((tmp_path / "best.pt").read_bytes()).hexdigest()


def test_prediction_grid_frames_mistakes_in_red(tmp_path):
    from matplotlib.image import imread

    from budgetnet.evaluate import plot_predictions

    images = torch.full((8, 1, 28, 28), 128, dtype=torch.uint8)  # grey: no red from the images themselves
    labels = torch.arange(8) % 3
    classes = ["a", "b", "c"]

    def red_pixels(predicted) -> int:
        png = plot_predictions(images, labels, predicted, classes, tmp_path / "grid.png", columns=4)
        rgb = imread(png)[..., :3]
        return int(((rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.2) & (rgb[..., 2] < 0.2)).sum())

    assert red_pixels(labels.clone()) == 0  # all right: nothing marked
    one_wrong, two_wrong = labels.clone(), labels.clone()
    one_wrong[5] = (labels[5] + 1) % 3
    two_wrong[[1, 5]] = (labels[[1, 5]] + 1) % 3
    assert 0 < red_pixels(one_wrong) < red_pixels(two_wrong)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("kind", ["missing", "random", "truncated", "not_budgetnet", "pickled_code", "bad_config",
                                  "config_not_text", "no_param_count"])
def test_bad_checkpoints_give_one_line_and_exit_2(tmp_path, capsys, kind):
    path = tmp_path / "bad.pt"
    if kind == "random":
        path.write_bytes(bytes(range(256)) * 10)
    elif kind == "truncated":
        cfg, good, _ = _tiny_cifar_checkpoint(tmp_path)
        path.write_bytes(good.read_bytes()[:2000])
    elif kind == "not_budgetnet":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "pickled_code":
        torch.save({"format": "budgetnet-checkpoint", "x": _Evil()}, path)
    elif kind == "bad_config":
        torch.save({"format": "budgetnet-checkpoint", "format_version": 1, "config": '{"model": {"family": "x"}}'},
                   path)
    elif kind in ("config_not_text", "no_param_count"):  # hand-edited files
        cfg, good, _ = _tiny_cifar_checkpoint(tmp_path)
        raw = torch.load(good, weights_only=True)
        if kind == "config_not_text":
            raw["config"] = 5
        else:
            del raw["n_params"]
        torch.save(raw, path)
    code = main(["evaluate", str(path), "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 2
    assert "pwned" not in out.out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("budgetnet: error:") and "Traceback" not in out.err
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_a_saved_evaluation_names_the_bytes_it_evaluated_even_if_the_file_was_replaced_meanwhile(tmp_path,
                                                                                                 monkeypatch):
    """`budgetnet evaluate best.pt` while a search runs: the search may replace best.pt mid-evaluation. The
    saved report must carry the hash of the model it scored, so that `budgetnet report` does not show that
    model's accuracy as the new file's."""
    cfg, path, _ = _tiny_cifar_checkpoint(tmp_path)
    evaluated = hashlib.sha256(path.read_bytes()).hexdigest()
    real = evaluate.test_metrics

    def replaced_meanwhile(*a, **kw):
        out = real(*a, **kw)
        raw = torch.load(path, weights_only=True)
        raw["metrics"]["val_acc"] = 0.99  # another model's file, say
        torch.save(raw, path)
        return out

    monkeypatch.setattr(evaluate, "test_metrics", replaced_meanwhile)
    report = evaluate_checkpoint(path, data_dir=tmp_path, device="cpu", latency_repeats=1)
    saved = json.loads(evaluate.save_evaluation(report).read_text())
    assert saved["checkpoint_sha256"] == evaluated != hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_class_with_no_test_image_is_no_worst_class_and_top5_needs_more_than_5_classes():
    confusion = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 4]])  # class 1 has no test image
    acc = evaluate.class_accuracy(confusion)
    assert acc[0] == 0.75 and torch.isnan(acc[1]) and acc[2] == 0.8
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    images, labels = torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2])
    m = evaluate.test_metrics(model, images, labels, lambda x: x.float(), torch.device("cpu"), 3)
    assert m["top5"] is None and 0 <= m["top1"] <= 1  # top-5 of 3 classes would be 100% by construction


def test_a_checkpoint_claiming_a_very_deep_net_is_refused_in_bounded_time(tmp_path, capsys, monkeypatch):
    import budgetnet.models as models

    cfg, good, _ = _tiny_cifar_checkpoint(tmp_path)
    ckpt = torch.load(good, weights_only=True)
    monkeypatch.setattr(models, "build_model", lambda *a: pytest.fail("built a model the file cannot hold"))
    # deep, yet within the layers any config may have: refused by the file's tensor count, before building
    for deep in (ResNetConfig(depths=(600, 1, 1)), MobileNetConfig(depths=(1, 1, 900, 1, 1)),
                 PlainConfig(n_conv=1500, width=8, width_pattern="equal", hidden=())):
        torch.save({**ckpt, "config": cfg.replace(model=deep).to_json()}, tmp_path / "deep.pt")
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError, match="claims at least .* layers, the file holds"):
            model_from_checkpoint(load_checkpoint(tmp_path / "deep.pt"))
        assert time.perf_counter() - t0 < 5.0
        assert main(["evaluate", str(tmp_path / "deep.pt"), "--device", "cpu"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # past them: no such config exists, so the file is refused as it is read
    too_deep = {**cfg.to_dict(), "model": {"family": "resnet", "depths": [10**9, 1, 1], "widths": [16, 32, 64]}}
    torch.save({**ckpt, "config": json.dumps(too_deep)}, tmp_path / "deep.pt")
    with pytest.raises(CheckpointError, match="past the 2,000"):
        load_checkpoint(tmp_path / "deep.pt")


def test_a_checkpoint_whose_config_claims_a_huge_model_is_refused_before_building_it(tmp_path, capsys):
    cfg, good, _ = _tiny_cifar_checkpoint(tmp_path)
    ckpt = torch.load(good, weights_only=True)
    # the same weights, but a config whose model would take 4.6 TiB (or overflow) to build for real
    for n_conv in (16, 64):
        huge = cfg.replace(model=PlainConfig(n_conv=n_conv, width=8, convs_per_block=n_conv, hidden=()))
        torch.save({**ckpt, "config": huge.to_json()}, tmp_path / "huge.pt")
        with pytest.raises(CheckpointError, match="do not match its config"):
            model_from_checkpoint(load_checkpoint(tmp_path / "huge.pt"))
        assert main(["evaluate", str(tmp_path / "huge.pt"), "--device", "cpu"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bad_checkpoint_exit_code_from_the_real_command(tmp_path):
    path = tmp_path / "junk.pt"
    with zipfile.ZipFile(path, "w") as z:  # a zip, but not a torch file
        z.writestr("data.pkl", pickle.dumps({"a": 1}))
    proc = subprocess.run([sys.executable, "-m", "budgetnet", "evaluate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_plots_onto_a_file_is_refused_before_evaluating(tmp_path, capsys, monkeypatch):
    import budgetnet.evaluate as ev

    _, good, _ = _tiny_cifar_checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("keep")
    monkeypatch.setattr(ev, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated first"))
    assert main(["evaluate", str(good), "--device", "cpu", "--plots", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--plots {tmp_path / 'notes.txt'} is a file" in err[0], err
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_a_flip_checkpoint_predicts_the_flip_average_in_evaluate_and_counts_two_views(tmp_path):
    cfg, path, result = _tiny_cifar_checkpoint(tmp_path)
    assert load_checkpoint(path)["tta"] == "none"  # the default: one view
    shape = DATASET_INFO["cifar100"].shape
    flip_path = save_checkpoint(tmp_path / "flip.pt", cfg, result.state_dict, metrics=result.metrics,
                                n_params=count_params(cfg.model, shape), flops=2 * count_flops(cfg.model, shape),
                                classes=load_checkpoint(path)["classes"], train_seconds=result.seconds,
                                precision=result.precision, tta="flip")
    one, two = (evaluate_checkpoint(p, tmp_path, "cpu", latency_repeats=2, precision="fp32") for p in (path, flip_path))
    assert one["tta"] == "none" and two["tta"] == "flip"
    assert two["top1"] == one["top1_flip"] and two["top1_single"] == one["top1"] == one["top1_single"]
    assert two["top1_flip"] == one["top1_flip"]
    assert two["flops"] == 2 * one["flops"] and two["macs"] == 2 * one["macs"]  # what --max-flops caps
    assert "predicts the flip average" in format_report(two) and "predicts" not in format_report(one)
    # the deployed model is the mean of the net's logits over each image and its mirror
    net = model_from_checkpoint(load_checkpoint(flip_path))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deployed_model(load_checkpoint(flip_path))(x), (net(x) + net(x.flip(3))) / 2)
        assert not torch.allclose(net(x), net(x.flip(3)))  # the two views differ: the check can fail


def test_a_file_from_before_tta_was_recorded_predicts_with_one_view_and_a_bad_tta_is_refused(tmp_path):
    _, path, _ = _tiny_cifar_checkpoint(tmp_path)
    raw = torch.load(path, weights_only=True)
    del raw["tta"]
    torch.save(raw, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["tta"] == "none"
    raw["tta"] = "rotate"
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="tta 'rotate' is not one of none, flip"):
        load_checkpoint(tmp_path / "bad.pt")


def test_scoring_with_the_mirror_counts_the_images_the_flip_average_fixes_and_breaks():
    from budgetnet.data import ImageSet
    from budgetnet.score import evaluate_model

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (300, 1, 6, 6), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (300,), generator=g)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 4))
    normalize = lambda u: u.float() / 255 - 0.5  # noqa: E731
    m = evaluate_model(model, ImageSet(images, labels), normalize, torch.device("cpu"), batch_size=64, mirror=True)
    assert "val_acc_flip" not in evaluate_model(model, ImageSet(images, labels), normalize, torch.device("cpu"))
    with torch.no_grad():
        x = normalize(images)
        one = model(x).argmax(1) == labels
        both = (model(x) + model(x.flip(3))).argmax(1) == labels
    assert m["val_acc"] == one.sum().item() / 300 and m["val_acc_flip"] == both.sum().item() / 300
    assert m["flip_fixed"] == (both & ~one).sum().item() and m["flip_broke"] == (one & ~both).sum().item()
    assert m["flip_fixed"] + m["flip_broke"] > 0  # the views disagree on some images: the counts can be wrong
    assert m["val_acc_flip"] - m["val_acc"] == pytest.approx((m["flip_fixed"] - m["flip_broke"]) / 300)
