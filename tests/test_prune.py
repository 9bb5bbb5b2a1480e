"""``budgetnet prune``: L1 filter pruning shrinks every family into a dense net that rebuilds from its file."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from budgetnet.budget import count_flops, count_macs, count_params
from budgetnet.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from budgetnet.cli import main
from budgetnet.config import (
    ConfigError,
    DataConfig,
    MobileNetConfig,
    PlainConfig,
    ResNetConfig,
    RunConfig,
    TrainConfig,
)
from budgetnet.datasets.info import DATASET_INFO
from budgetnet.evaluate import evaluate_checkpoint
from budgetnet.models import build_model
from budgetnet.prune import PruneError, amount_for_cap, prune_model
from budgetnet.train import train_run

SHAPE = DATASET_INFO["synthetic"].shape  # 3 x 32 x 32, 10 classes
CONFIGS = {
    "plain": PlainConfig(n_conv=2, width=8, hidden=(24,), activation="prelu"),
    # identity, zero-padded and projected (narrowing) shortcuts
    "resnet": ResNetConfig(depths=(2, 1, 1), widths=(8, 16, 8), stem_width=8),
    "resnet-bottleneck": ResNetConfig(block="bottleneck", depths=(2, 1), widths=(4, 8), stem_width=8),
    "mobilenet": MobileNetConfig(stem_width=8, widths=(8, 16, 16), depths=(1, 2, 1), strides=(1, 2, 1),
                                 expansion=3, head_width=24),
}


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """One checkpoint per family (seeded, untrained weights: L1 ranking needs weights, not accuracy)."""
    root = tmp_path_factory.mktemp("prune")
    out = {}
    for name, model_cfg in CONFIGS.items():
        cfg = RunConfig(model=model_cfg, train=TrainConfig(batch_size=32, eval_points=1),
                        data=DataConfig(dataset="synthetic"))
        torch.manual_seed(0)
        model = build_model(model_cfg, SHAPE)
        out[name] = save_checkpoint(root / f"{name}.pt", cfg, model.state_dict(), metrics={},
                                    n_params=count_params(model_cfg, SHAPE), flops=count_flops(model_cfg, SHAPE),
                                    classes=[f"class{i}" for i in range(10)], train_seconds=1.0, precision="fp32")
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_family_shrinks_into_a_dense_net_that_rebuilds_from_its_file(name, checkpoints, tmp_path):
    ckpt = load_checkpoint(checkpoints[name])
    cfg = ckpt["run_config"]
    model = model_from_checkpoint(ckpt)
    pruned, pruned_cfg = prune_model(model, cfg.model, SHAPE, 0.5)
    n_before, n_after = count_params(cfg.model, SHAPE), count_params(pruned_cfg, SHAPE)
    assert n_after < n_before and count_flops(pruned_cfg, SHAPE) < count_flops(cfg.model, SHAPE)
    assert n_after == sum(p.numel() for p in pruned.parameters())  # dense: the tensors themselves shrank
    assert pruned_cfg.conv_widths == tuple(c.out_channels for c in _convs(pruned))
    widths_before = [c.out_channels for c in _convs(model)]
    assert any(a < b for a, b in zip(pruned_cfg.conv_widths, widths_before))

    path = save_checkpoint(tmp_path / "pruned.pt", cfg.replace(model=pruned_cfg), pruned.state_dict(), metrics={},
                           n_params=n_after, flops=count_flops(pruned_cfg, SHAPE), classes=ckpt["classes"],
                           train_seconds=1.0, precision="fp32")
    torch.load(path, weights_only=True)
    back = load_checkpoint(path)
    assert back["run_config"].model == pruned_cfg  # the widths survive the strict JSON round trip
    rebuilt = model_from_checkpoint(back)
    x = torch.randn(3, *((SHAPE.channels,) + (SHAPE.image_size,) * 2))
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), pruned(x), atol=1e-5)
    if name.startswith("resnet"):
        # Every block keeps its kind of shortcut. A zero-padded one ties two stages' channels by position,
        # which the dependency graph cannot follow: the channels on both sides of it keep their widths.
        def blocks(m):
            return [(b.c_out, "proj" if b.shortcut.proj is not None else b.shortcut.pad)
                    for b in m.modules() if hasattr(b, "shortcut")]

        kept, was = blocks(rebuilt), blocks(model)
        assert [k for _, k in kept] == [k for _, k in was]
        assert [c for c, k in kept if k not in (0, "proj")] == [c for c, k in was if k not in (0, "proj")]
        assert "proj" in [k for _, k in was] or name == "resnet-bottleneck"


def test_guard_counts_a_pruned_deep_net_like_its_real_build(checkpoints):
    """A deep net is counted from shallow builds unless it carries conv_widths: then it is built whole."""
    cfg = ResNetConfig(depths=(4, 4), widths=(8, 16), stem_width=8)
    torch.manual_seed(0)
    pruned, pruned_cfg = prune_model(build_model(cfg, SHAPE), cfg, SHAPE, 0.3)
    assert count_params(pruned_cfg, SHAPE) == sum(p.numel() for p in pruned.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        pruned.eval()(torch.randn(1, SHAPE.channels, SHAPE.image_size, SHAPE.image_size))
    assert count_flops(pruned_cfg, SHAPE) == counter.get_total_flops()


def test_conv_widths_that_do_not_fit_the_net_are_config_errors():
    mobile = CONFIGS["mobilenet"]
    convs = _convs(build_model(mobile, SHAPE))
    n = len(convs)
    own = [c.out_channels for c in convs]
    assert count_params(dataclasses.replace(mobile, conv_widths=tuple(own)), SHAPE) == count_params(mobile, SHAPE)
    depthwise = next(i for i, c in enumerate(convs) if c.groups > 1)
    bad_dw = tuple(w + (i == depthwise) for i, w in enumerate(own))  # a depthwise conv keeps its input's width
    for widths, says in [((4,) * (n - 1), "more convs"), ((4,) * (n + 1), f"the net has {n} convs"),
                         (bad_dw, "follows its input")]:
        with pytest.raises(ConfigError, match=says):
            count_params(dataclasses.replace(mobile, conv_widths=widths), SHAPE)
    resnet = ResNetConfig(depths=(1, 1), widths=(8, 16), stem_width=8)  # the second block zero-pads 8 -> 16
    with pytest.raises(ConfigError, match="narrows a block from 8 to 4 channels"):
        count_params(dataclasses.replace(resnet, conv_widths=(8, 8, 8, 8, 4)), SHAPE)
    with pytest.raises(ConfigError, match="conv_widths has 3 entries for 2"):
        dataclasses.replace(CONFIGS["plain"], conv_widths=(4, 4, 4))
    with pytest.raises(ConfigError, match="positive"):
        RunConfig.from_json('{"model": {"family": "plain", "n_conv": 2, "conv_widths": [4, 0]}}')


@pytest.mark.parametrize("count, flag", [(count_params, "--max-params"), (count_macs, "--max-flops")])
def test_max_params_or_max_flops_picks_the_least_amount_that_fits(checkpoints, count, flag):
    cfg = CONFIGS["plain"]
    model = model_from_checkpoint(load_checkpoint(checkpoints["plain"]))
    cap = count(cfg, SHAPE) // 2
    amount = amount_for_cap(model, cfg, SHAPE, cap, count, flag)
    assert count(prune_model(model, cfg, SHAPE, amount)[1], SHAPE) <= cap
    assert count(prune_model(model, cfg, SHAPE, round(amount - 0.01, 2))[1], SHAPE) > cap
    with pytest.raises(PruneError, match=f"already within {flag}"):
        amount_for_cap(model, cfg, SHAPE, count(cfg, SHAPE), count, flag)


def test_fine_tuning_starts_from_the_given_weights(synthetic_data):
    cfg = RunConfig(model=CONFIGS["plain"], train=TrainConfig(batch_size=64, lr=1e-9, warmup=0.0, eval_points=1),
                    data=DataConfig(dataset="synthetic"))
    torch.manual_seed(1)
    start = build_model(cfg.model, SHAPE).state_dict()
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg.model, SHAPE).state_dict()  # what the run starts from without init_state
    result = train_run(cfg, synthetic_data, device="cpu", epochs=0.05, init_state=start)
    for key in ("0.weight", "4.weight"):  # both convs: at lr 1e-9 the weights stay where they started
        assert torch.allclose(result.state_dict[key], start[key], atol=1e-6)
        assert not torch.allclose(result.state_dict[key], fresh[key], atol=1e-3)


def test_prune_command_fine_tunes_writes_a_checkpoint_evaluate_reads(checkpoints, tmp_path, capsys):
    out = tmp_path / "pruned.pt"
    assert main(["prune", str(checkpoints["plain"]), "--amount", "0.3", "--seconds", "1.5", "--out", str(out),
                 "--device", "cpu", "--precision", "fp32"]) == 0
    table = capsys.readouterr().out
    assert "before" in table and "pruned" in table and "fine-tuned" in table
    raw = torch.load(out, weights_only=True)
    assert raw["extra"]["phase"] == "prune" and raw["extra"]["amount"] == 0.3
    assert raw["extra"]["finetune_seconds"] > 0
    before = load_checkpoint(checkpoints["plain"])
    assert raw["n_params"] < before["n_params"] and raw["flops"] < before["flops"]
    report = evaluate_checkpoint(out, device="cpu", latency_repeats=1, precision="fp32")
    assert report["n_params_match"] and report["n_params"] == raw["n_params"]
    # The file holds the pruned net, fine-tuned: the widths of pruning the original the same way, and
    # weights that training moved away from where pruning left them.
    pruned, pruned_cfg = prune_model(model_from_checkpoint(before), before["run_config"].model, SHAPE, 0.3)
    assert load_checkpoint(out)["run_config"].model == pruned_cfg
    tuned = model_from_checkpoint(load_checkpoint(out)).state_dict()
    first = pruned.state_dict()["0.weight"]
    assert tuned["0.weight"].shape == first.shape != before["state_dict"]["0.weight"].shape
    assert not torch.allclose(tuned["0.weight"], first)


def test_a_pruned_file_records_the_normalisation_its_weights_trained_with(checkpoints, tmp_path, monkeypatch):
    """Without fine-tuning, the pruned weights are the original's: the file keeps the original's recorded
    input and normalisation (a folder dataset's images may have changed since, and scanning it again
    could re-decode it), not the dataset's of today."""
    import budgetnet.checkpoint as bc

    raw = torch.load(checkpoints["plain"], weights_only=True)
    raw["normalization"] = {"mean": [0.25] * SHAPE.channels, "std": [0.5] * SHAPE.channels}  # as trained then
    source = tmp_path / "trained.pt"
    torch.save(raw, source)

    def no_lookup(*a, **k):
        raise AssertionError("the dataset was looked up again")

    monkeypatch.setattr(bc, "dataset_info", no_lookup)
    out = tmp_path / "pruned.pt"
    assert main(["prune", str(source), "--amount", "0.3", "--seconds", "0", "--out", str(out), "--device", "cpu"]) == 0
    assert torch.load(out, weights_only=True)["normalization"] == raw["normalization"]


def test_a_distilled_model_fine_tunes_on_its_labels(checkpoints, tmp_path):
    """A search that distilled writes train.distill > 0 into best.pt; its teacher is not in the file, and
    fine-tuning it had raised a ValueError (after pruning and measuring)."""
    import dataclasses

    held = load_checkpoint(checkpoints["plain"])
    cfg = held["run_config"]
    distilled = cfg.replace(train=dataclasses.replace(cfg.train, distill=0.5))
    source = save_checkpoint(tmp_path / "distilled.pt", distilled, held["state_dict"], metrics={},
                             n_params=held["n_params"], flops=held["flops"], classes=held["classes"],
                             train_seconds=1.0, precision="fp32")
    out = tmp_path / "pruned.pt"
    assert main(["prune", str(source), "--amount", "0.3", "--seconds", "1", "--out", str(out), "--device", "cpu",
                 "--precision", "fp32"]) == 0
    assert torch.load(out, weights_only=True)["extra"]["finetune_seconds"] > 0


@pytest.mark.parametrize("args, says", [
    (["--amount", "1.5"], "between 0 and 1"),
    (["--amount", "0.3", "--max-params", "1000"], "not allowed with"),
    (["--max-params", "1e9"], "already within"),
    (["--max-params", "10"], "still leaves"),
])
def test_bad_prune_input_is_one_line_exit_2_and_leaves_out_alone(args, says, checkpoints, tmp_path, capsys):
    out = tmp_path / "out.pt"
    out.write_bytes(b"something already here")
    code = main(["prune", str(checkpoints["plain"]), *args, "--seconds", "0", "--out", str(out),
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("budgetnet: error:") and says in err[0], err
    assert out.read_bytes() == b"something already here"


def test_a_file_prune_cannot_handle_is_one_line_exit_2(checkpoints, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    out = tmp_path / "out.pt"
    assert main(["prune", str(junk), "--amount", "0.3", "--out", str(out), "--device", "cpu"]) == 2
    assert "not a readable budgetnet checkpoint" in capsys.readouterr().err
    assert not out.exists()
    raw = torch.load(checkpoints["mobilenet"], weights_only=True)
    bad = raw["config"].replace('"conv_widths": null', '"conv_widths": [4, 4]')  # a hand-edited file
    assert bad != raw["config"]
    torch.save({**raw, "config": bad}, junk)
    assert main(["prune", str(junk), "--amount", "0.3", "--out", str(out), "--device", "cpu"]) == 2
    assert "checkpoint config is invalid (conv_widths has 2 entries" in capsys.readouterr().err
    assert not out.exists()
    original = checkpoints["plain"].read_bytes()
    assert main(["prune", str(checkpoints["plain"]), "--amount", "0.3", "--out", str(checkpoints["plain"]),
                 "--device", "cpu"]) == 2
    assert "is the checkpoint being pruned" in capsys.readouterr().err
    assert checkpoints["plain"].read_bytes() == original
