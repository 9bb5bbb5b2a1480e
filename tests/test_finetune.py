"""Fine-tuning from a checkpoint: the groups, the freezing rules inside the one training loop, the data and
head adaptation, ``train --init`` and ``search --init`` (``budgetnet.finetune``)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

from budgetnet.budget import count_params
from budgetnet.checkpoint import load_checkpoint, save_checkpoint
from budgetnet.cli import main
from budgetnet.config import (
    ConfigError,
    DataConfig,
    MobileNetConfig,
    PlainConfig,
    ResNetConfig,
    RunConfig,
    Shape,
    TrainConfig,
    parse_freeze,
)
from budgetnet.data import conform_images
from budgetnet.datasets.info import DATASET_INFO
from budgetnet.evaluate import evaluate_checkpoint, format_report
from budgetnet.finetune import Freezer, load_source, load_target, trainable_groups
from budgetnet.models import build_model, groups
from budgetnet.train import COMPLETE, train_run

SYNTH = DATASET_INFO["synthetic"]
SMALL_RESNET = ResNetConfig(depths=(1, 1, 1), widths=(4, 8, 16), stem_width=4)


def _checkpoint(path: Path, model_cfg=SMALL_RESNET, dataset="synthetic", info=SYNTH, seed=0) -> Path:
    """A checkpoint of a freshly initialised net (what it learned does not matter to these tests)."""
    cfg = RunConfig(model=model_cfg, train=TrainConfig(batch_size=32, lr=0.05), data=DataConfig(dataset=dataset),
                    seed=seed)
    torch.manual_seed(seed)
    state = build_model(model_cfg, info.shape).state_dict()
    classes = [f"class{i}" for i in range(info.num_classes)]
    save_checkpoint(path, cfg, state, metrics={"val_acc": 0.5}, n_params=count_params(model_cfg, info.shape), flops=0,
                    classes=classes, train_seconds=1.0, precision="fp32", info=info)
    return path


def _folder(root: Path, classes=("ants", "bees", "cats"), gray=False, size=16, train=8, test=3) -> str:
    """train/ and test/ class folders of small learnable pictures (stripes whose direction is the class)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for split, n in (("train", train), ("test", test)):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                wave = np.sin([yy, xx, xx + yy][label % 3] * 0.8 + rng.uniform(0, 6)) > 0
                img = (wave[..., None] * rng.uniform(80, 255, 3) + rng.normal(0, 10, (size, size, 3))).clip(0, 255)
                picture = Image.fromarray(img.astype(np.uint8))
                (picture.convert("L") if gray else picture).save(root / split / name / f"{i}.png")
    return f"folder:{root}"


# -- the groups and the rules ------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    SMALL_RESNET, ResNetConfig(block="bottleneck", depths=(2, 1), widths=(4, 8), activation="prelu"),
    PlainConfig(n_conv=4, convs_per_block=2, width=4, hidden=(16, 8), activation="prelu", dropout=0.1),
    PlainConfig(n_conv=2, width=4, hidden=(), batch_norm=False),
    MobileNetConfig(widths=(8, 8), depths=(1, 2), strides=(1, 2), expansion=2, head_width=16),
    MobileNetConfig(widths=(8,), depths=(2,), strides=(2,), expansion=2, head_width=0),
])
def test_every_parameter_is_in_exactly_one_group_and_the_head_is_last(cfg):
    model = build_model(cfg, Shape(3, 7, 16))
    gs = groups(model, cfg)
    ids = [id(p) for _, modules in gs for m in modules for p in m.parameters()]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # all of them, none twice
    name, head = gs[-1]
    assert name == "head" and [m for m in head if isinstance(m, torch.nn.Linear)][-1].out_features == 7
    assert len(gs) >= 3 and all(any(True for m in modules for _ in m.parameters()) for _, modules in gs)


def test_strategies_parse_and_count_trainable_groups():
    assert parse_freeze("none") == ("none", 0.0) and parse_freeze("last:2") == ("last", 2.0)
    assert parse_freeze("gradual") == ("gradual", 0.2) and parse_freeze("gradual:0.25") == ("gradual", 0.25)
    for bad in ("all", "last", "last:0", "last:x", "gradual:0", "gradual:1.5", "head:1", "none:"):
        with pytest.raises(ConfigError):
            parse_freeze(bad)
    assert [trainable_groups("gradual:0.25", 5, p) for p in (0, 0.24, 0.25, 0.5, 0.74, 0.75, 0.99, 1.0)] == [
        1, 1, 2, 3, 3, 4, 4, 5]
    assert trainable_groups("last:1", 5, 0.5) == 2 and trainable_groups("last:9", 5, 0) == 5
    assert trainable_groups("head", 5, 0.9) == 1 and trainable_groups("none", 5, 0) == 5


def test_gradual_unfreezes_one_group_from_the_top_every_share_and_keeps_frozen_ones_in_eval_mode():
    model = build_model(SMALL_RESNET, SYNTH.shape).train()
    freezer = Freezer(model, SMALL_RESNET, TrainConfig(freeze="gradual:0.25"))
    names = [name for name, _ in freezer.groups]
    assert names == ["stem", "stage1", "stage2", "stage3", "head"]

    def training(p: float) -> list[str]:
        freezer.at(p)
        on = [name for name, modules in freezer.groups
              if all(q.requires_grad for m in modules for q in m.parameters())]
        off = [name for name, modules in freezer.groups
               if not any(q.requires_grad for m in modules for q in m.parameters())]
        assert sorted(on + off) == sorted(names)  # a group is all in or all out
        for name, modules in freezer.groups:  # frozen: eval mode (BatchNorm statistics fixed); training: train
            assert all(sub.training == (name in on) for m in modules for sub in m.modules()), (p, name)
        return on

    assert training(0.0) == ["head"]
    assert training(0.1) == ["head"]
    assert training(0.25) == ["stage3", "head"]
    assert training(0.6) == ["stage2", "stage3", "head"]
    model.train()  # what an evaluation leaves behind: every module in train mode
    assert training(0.7) == ["stage2", "stage3", "head"]
    assert training(0.8) == ["stage1", "stage2", "stage3", "head"]
    assert training(1.0) == names


def _bn_and_weights(state: dict, keys) -> dict:
    return {k: state[k] for k in keys}


@pytest.mark.parametrize("freeze", ["head", "last:1"])
def test_frozen_parameters_and_batchnorm_statistics_do_not_move_in_training(synthetic_data, freeze):
    source = build_model(SMALL_RESNET, SYNTH.shape)
    init = {k: v.clone() for k, v in source.state_dict().items()}
    cfg = RunConfig(model=SMALL_RESNET, train=TrainConfig(batch_size=64, lr=0.1, eval_points=3, freeze=freeze,
                                                          backbone_lr_scale=0.5, ema=0.9),
                    data=DataConfig(dataset="synthetic"))
    result = train_run(cfg, synthetic_data, device="cpu", epochs=0.2, init_state=init)
    assert result.status == COMPLETE and len(result.history) == 3  # evaluations in between put train mode back
    # stem 0-2, stages 3-5, head 6-9 (pool, flatten, dropout, linear)
    frozen_prefixes = ("0.", "1.", "3.", "4.") if freeze == "last:1" else ("0.", "1.", "3.", "4.", "5.")
    after = result.state_dict
    frozen = [k for k in init if k.startswith(frozen_prefixes)]
    assert any("running_mean" in k for k in frozen) and any("num_batches_tracked" in k for k in frozen)
    for k in frozen:  # bit-identical: weights, BatchNorm running statistics and counters
        assert torch.equal(after[k], init[k]), k
    trained = [k for k in init if k not in frozen and after[k].is_floating_point()]
    assert trained and all(not torch.equal(after[k], init[k]) for k in trained if k.startswith("9."))
    if freeze == "last:1":  # the last stage's BatchNorm statistics did move
        assert not torch.equal(after["5.body.1.running_mean"], init["5.body.1.running_mean"])


def test_the_backbone_trains_at_its_lr_scale_and_the_head_at_the_lr():
    from budgetnet.recipe import make_optimizer

    model = build_model(SMALL_RESNET, SYNTH.shape)
    freezer = Freezer(model, SMALL_RESNET, TrainConfig(backbone_lr_scale=0.1))
    opt = make_optimizer(model, TrainConfig(backbone_lr_scale=0.1), head=freezer.head_params())
    head = {id(p) for p in freezer.head_params()}
    for group in opt.param_groups:
        assert group["lr_scale"] == (1.0 if all(id(p) in head for p in group["params"]) else 0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    plain = make_optimizer(model, TrainConfig(backbone_lr_scale=0.1))  # from scratch: one lr for all
    assert {g["lr_scale"] for g in plain.param_groups} == {1.0}


def test_gradual_unfreezes_on_schedule_inside_a_run(synthetic_data, monkeypatch):
    seen = []
    real = Freezer.at

    def spy(self, p):
        real(self, p)
        if not seen or seen[-1][1] != self.trainable:
            seen.append((p, self.trainable))

    monkeypatch.setattr(Freezer, "at", spy)
    init = build_model(SMALL_RESNET, SYNTH.shape).state_dict()
    cfg = RunConfig(model=SMALL_RESNET, train=TrainConfig(batch_size=64, freeze="gradual:0.3", eval_points=2),
                    data=DataConfig(dataset="synthetic"))
    assert train_run(cfg, synthetic_data, device="cpu", epochs=0.5, init_state=init).status == COMPLETE
    assert [k for _, k in seen] == [1, 2, 3, 4]  # the head, then one more group every 30% of the run
    for (p, k) in seen[1:]:
        assert 0.3 * (k - 1) <= p < 0.3 * (k - 1) + 0.1  # at the first step past each share


# -- the data and the head ---------------------------------------------------------------------------------

def test_conform_images_repeats_grayscale_takes_luminance_and_resizes():
    gray = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    rgb = conform_images(gray, 3, 8)
    assert rgb.shape == (5, 3, 8, 8) and all(torch.equal(rgb[:, c], gray[:, 0]) for c in range(3))
    red = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    red[:, 0] = 255
    assert conform_images(red, 1, 8).unique().tolist() == [76]  # 0.299 * 255, BT.601
    assert conform_images(gray, 1, 16).shape == (5, 1, 16, 16)
    assert conform_images(gray, 1, 8) is gray  # already fits: untouched
    with pytest.raises(ValueError):
        conform_images(torch.zeros(1, 2, 8, 8, dtype=torch.uint8), 3, 8)


def test_train_init_gives_a_new_head_and_repeats_grayscale_into_an_rgb_net(tmp_path, capsys):
    src = _checkpoint(tmp_path / "src.pt")
    target = _folder(tmp_path / "gray", gray=True)
    out = tmp_path / "ft.pt"
    rc = main(["train", "--init", str(src), "--dataset", target, "--epochs", "2", "--freeze", "head",
               "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "new classifier head: 3 classes" in printed and "adapted the channels: 1 -> 3 (repeated)" in printed
    ckpt, source = load_checkpoint(out), load_checkpoint(src)
    assert ckpt["input_shape"] == [3, 32, 32] and ckpt["classes"] == ["ants", "bees", "cats"]
    assert ckpt["normalization"] == source["normalization"]  # the checkpoint's statistics by default
    record = ckpt["extra"]["finetune"]
    assert record["source_sha256"] == source["sha256"] and record["strategy"] == "head" and record["new_head"]
    assert record["source_classes"] == source["classes"] and "channels" in record["adapted"]
    assert ckpt["state_dict"]["9.weight"].shape == (3, 16)  # the new head
    for k, v in source["state_dict"].items():  # everything but the head frozen: bit-identical
        if not k.startswith("9."):
            assert torch.equal(ckpt["state_dict"][k], v), k
    report = evaluate_checkpoint(out, device="cpu", latency_repeats=1)  # its test images conformed alike
    assert report["test_images"] == 9 and report["fine_tuned"] == f"fine-tuned from {src.absolute()} (head)"
    assert report["fine_tuned"] in format_report(report)
    # prune fine-tunes it on the same conformed images, every layer training
    assert main(["prune", str(out), "--amount", "0.3", "--seconds", "1", "--out", str(tmp_path / "p.pt"),
                 "--device", "cpu", "--json"]) == 0
    assert load_checkpoint(tmp_path / "p.pt")["input_shape"] == [3, 32, 32]


def test_train_init_turns_rgb_into_luminance_for_a_grayscale_net(tmp_path, capsys):
    fmnist = DATASET_INFO["fashion_mnist"]
    src = _checkpoint(tmp_path / "gray.pt", PlainConfig(n_conv=2, width=4, hidden=(16,)), "fashion_mnist", fmnist)
    target = _folder(tmp_path / "rgb", classes=[f"class{i}" for i in range(10)], train=3, test=1)
    out = tmp_path / "ft.pt"
    assert main(["train", "--init", str(src), "--dataset", target, "--epochs", "1", "--freeze", "last:1",
                 "--backbone-lr-scale", "0.1", "--out", str(out), "--device", "cpu", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "3 -> 1 (luminance" in printed and "new classifier head" not in printed  # the same classes: kept
    ckpt = load_checkpoint(out)
    assert ckpt["input_shape"] == [1, 28, 28] and ckpt["run_config"].seed == 3
    assert ckpt["run_config"].train.freeze == "last:1" and not ckpt["extra"]["finetune"]["new_head"]
    assert evaluate_checkpoint(out, device="cpu", latency_repeats=1)["test_images"] == 10


def test_normalise_with_data_uses_the_new_images_own_statistics(tmp_path):
    source = load_source(_checkpoint(tmp_path / "src.pt"))
    target = _folder(tmp_path / "gray", gray=True)
    own, _ = load_target(source, target, None, "cpu", normalise_with="data")
    kept, adapted = load_target(source, target, None, "cpu")
    assert kept.info.mean == SYNTH.mean and kept.info.shape == Shape(3, 3, 32)
    assert own.info.mean != SYNTH.mean and len(own.info.mean) == 3 and len(set(own.info.mean)) == 1
    assert adapted == {"channels": "1 -> 3 (repeated)"}  # a folder is decoded at the checkpoint's side


# -- refusals: one line, before anything trains; nothing in a file executes ----------------------------------

class _Hostile:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


def test_a_hostile_or_foreign_init_file_is_refused_in_one_line_and_nothing_in_it_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "budgetnet-checkpoint", "payload": _Hostile(str(marker))}, hostile)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Hostile(str(marker))))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    unknown = tmp_path / "unknown.pt"
    payload = torch.load(_checkpoint(tmp_path / "ok.pt"), weights_only=True)
    payload["config"] = payload["config"].replace('"family": "resnet"', '"family": "vit"')
    torch.save(payload, unknown)
    for path, said in ((hostile, "not a readable budgetnet checkpoint"), (raw, "not a readable"),
                       (foreign, "not a budgetnet checkpoint"), (unknown, "model.family='vit'")):
        for cmd in (["train", "--init", str(path), "--dataset", "synthetic", "--epochs", "1"],
                    ["search", "--init", str(path), "--dataset", "synthetic", "--hours", "0.01",
                     "--storage", f"sqlite:///{tmp_path / 's.db'}"]):
            assert main([*cmd, "--out", str(tmp_path / "out.pt"), "--device", "cpu"]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and said in err, err
    assert not marker.exists() and not (tmp_path / "out.pt").exists() and not (tmp_path / "s.db").exists()


def test_a_head_over_the_cap_and_flags_without_init_are_refused(tmp_path, capsys):
    src = _checkpoint(tmp_path / "src.pt")
    n = count_params(SMALL_RESNET, SYNTH.shape)
    base = ["train", "--init", str(src), "--dataset", "synthetic", "--epochs", "1", "--out", str(tmp_path / "o.pt")]
    assert main([*base, "--max-params", str(n - 1)]) == 2
    assert "over --max-params" in capsys.readouterr().err
    assert main(["search", "--init", str(src), "--dataset", "synthetic", "--max-params", str(n - 1), "--hours",
                 "0.01", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--out", str(tmp_path / "b.pt")]) == 2
    assert "over --max-params" in capsys.readouterr().err
    assert main([*base, "--max-flops", "1000"]) == 2  # MACs: the net's are counted before anything loads
    assert "exceed the --max-flops cap" in capsys.readouterr().err
    assert main([*base, "--freeze", "last:0"]) == 2
    assert "last:K" in capsys.readouterr().err
    assert main([*base, "--image-size", "16"]) == 2
    assert "checkpoint's side, 32 px" in capsys.readouterr().err
    cfg = tmp_path / "cfg.json"
    cfg.write_text(RunConfig(data=DataConfig(dataset="synthetic")).to_json())
    assert main(["train", "--config", str(cfg), "--freeze", "head", "--epochs", "1"]) == 2
    assert "--freeze applies to fine-tuning only" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "s.db").exists()


# -- search --init -------------------------------------------------------------------------------------------

def _search(tmp_path, src: Path, *extra, budget_s: float, slice_s: float) -> list[str]:
    return [sys.executable, "-m", "budgetnet", "search", "--init", str(src), "--dataset", "synthetic",
            "--max-params", "30k", "--hours", f"{budget_s / 3600:.5f}", "--trial-seconds", f"{slice_s:.2f}",
            "--storage", f"sqlite:///{tmp_path / 's.db'}", "--artifact-dir", str(tmp_path / "art"),
            "--out", str(tmp_path / "best.pt"), "--device", "cpu", "--json", *extra]


@pytest.mark.timing
def test_search_init_samples_the_strategy_and_writes_a_fine_tuned_best_pt(tmp_path, slice_s, capsys):
    from budgetnet.report.study import open_study, trials_frame
    from budgetnet.search.options import SearchOptions, StudyMismatch
    from budgetnet.search.progress import Reporter
    from budgetnet.search.session import run_search

    src = _checkpoint(tmp_path / "src.pt")
    opts = dict(max_params=30_000, budget_seconds=5 * slice_s, dataset="synthetic", final_fraction=0.4,
                storage=f"sqlite:///{tmp_path / 'study.db'}", out=str(tmp_path / "best.pt"), study_name="ft",
                artifact_dir=str(tmp_path / "artifacts"), trial_seconds=slice_s, device="cpu")
    summary = run_search(SearchOptions(**opts, init=str(src.absolute())), Reporter("quiet"))
    assert summary["trials"]["complete"] >= 1
    study = open_study(opts["storage"], "ft")
    assert study.user_attrs["init_sha256"] == load_checkpoint(src)["sha256"]
    first = study.trials[0]
    assert first.params["freeze"] == "gradual" and first.params["gradual_share"] == 0.1  # the warm start
    assert json.loads(first.user_attrs["config"])["model"] == json.loads(load_checkpoint(src)["config"])["model"]
    assert "params_freeze" in trials_frame(study).columns  # the report (and the dashboard) show it
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["extra"]["finetune"]["source_sha256"] == study.user_attrs["init_sha256"]
    assert ckpt["extra"]["finetune"]["strategy"] == ckpt["run_config"].train.freeze
    other = _checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(StudyMismatch, match="was started with --init"):
        run_search(SearchOptions(**opts, init=str(other.absolute())), Reporter("quiet"))
    with pytest.raises(StudyMismatch, match="was started with --init"):
        run_search(SearchOptions(**opts), Reporter("quiet"))
    assert main(["report", "--storage", opts["storage"], "--checkpoint", opts["out"], "--out", str(tmp_path / "r")]) == 0
    assert f"fine-tuned from {src.absolute()}" in capsys.readouterr().out


def _complete(db: Path) -> dict:
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        studies = storage.get_all_studies()
        return {t.number: t.value for t in storage.get_all_trials(studies[0]._study_id)
                if t.state == optuna.trial.TrialState.COMPLETE} if studies else {}
    except Exception:  # noqa: BLE001 - the file may be mid-creation
        return {}


@pytest.mark.timing
@pytest.mark.slow
def test_search_init_resumes_after_kill_9_and_refuses_another_init(tmp_path, slice_s):
    src = _checkpoint(tmp_path / "src.pt")
    cmd = _search(tmp_path, src, budget_s=8 * slice_s, slice_s=slice_s)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    end = time.time() + 60 + 10 * slice_s
    while time.time() < end and len(_complete(tmp_path / "s.db")) < 1:
        time.sleep(0.3)
    time.sleep(1.0)  # mid-trial
    proc.kill()
    proc.wait()
    before = _complete(tmp_path / "s.db")
    assert before, "no trial completed"
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120 + 8 * slice_s)
    assert again.returncode == 0, again.stderr
    events = [json.loads(line) for line in again.stdout.splitlines() if line.startswith("{")]
    assert any("resuming" in e.get("text", "") for e in events)
    after = _complete(tmp_path / "s.db")
    assert all(after[n] == v for n, v in before.items())  # no completed trial lost
    assert load_checkpoint(tmp_path / "best.pt")["extra"]["finetune"]["source"] == str(src.absolute())
    other = _checkpoint(tmp_path / "other.pt", seed=1)
    name = events[-1]["study"]
    refused = subprocess.run(_search(tmp_path, other, "--study-name", name, budget_s=8 * slice_s, slice_s=slice_s),
                             capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "was started with --init" in refused.stderr
