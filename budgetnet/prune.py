"""Shrink a trained model: L1-norm structured filter pruning (Li et al. 2017), then fine-tuning.

``torch-pruning`` does the graph work: it traces the model, groups every layer whose channels are tied to
a conv's filters (its BN, its PReLU, the next conv's or linear's inputs, depthwise convs, residual adds)
and removes the same channels from all of them, leaving a dense, smaller model. Each group is ranked by
the L1 norm of its first conv's filters, and ``amount`` of them (rounded down) go in every group. The
classifier keeps its outputs; a plain net's hidden fc layers lose neurons the same way.

One coupling the graph cannot follow: the ResNet's "option A" shortcut zero-pads a stage's channels into
the next stage's, tying them by position, and the trace sees the pad as an element-wise op of equal
widths. Groups that pass through such a pad are left whole, so a ResNet loses filters inside its blocks
and keeps the widths of its residual stream; the result stays a valid residual net.

The pruned widths go into the config (``ModelConfig.conv_widths``, and ``hidden`` for a plain net), so
the result is an ordinary checkpoint that rebuilds from the file alone; ``prune_model`` checks that the
rebuilt net computes what the pruned one does.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from budgetnet.budget import count_flops, count_macs, count_params
from budgetnet.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    recorded_info,
    save_checkpoint,
)
from budgetnet.config import TTA_VIEWS, ConfigError, ModelConfig, PlainConfig, RunConfig, Shape
from budgetnet.data import load_data, normalizer
from budgetnet.datasets.info import DatasetInfo
from budgetnet.device import memory_format, resolve_precision
from budgetnet.errors import first_line
from budgetnet.evaluate import checkpoint_test_split, inference_model, test_metrics
from budgetnet.finetune import conform_data, described
from budgetnet.latency import measure_latency
from budgetnet.models import build_model
from budgetnet.models.tta import deployed
from budgetnet.train import COMPLETE, train_run

MAX_AMOUNT = 0.95  # the most of each group's filters --max-params may take
FINETUNE_LR_SCALE = 0.1  # of the checkpoint's lr: a full peak undoes the training (Li et al.)


class PruneError(Exception):
    """What was asked cannot be done to this model (a user mistake: reported in one line)."""


def _through_pad(group) -> bool:
    """Whether a torch-pruning group passes through a zero-padding op (the ResNet option-A shortcut)."""
    return any("ConstantPadNd" in str(getattr(node.module, "_grad_fn", ""))
               for item in group for node in (item.dep.source, item.dep.target))


def _layers(model: nn.Module, kind) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def prune_model(model: nn.Module, cfg: ModelConfig, shape: Shape, amount: float) -> tuple[nn.Module, ModelConfig]:
    """A pruned copy of ``model`` (on the CPU, fp32) and the config that rebuilds it.

    Removes ``amount`` (0 <= amount < 1) of the filters of every prunable group, smallest L1 norm first.
    Raises PruneError if the pruned net cannot be described by a config (it would not rebuild)."""
    import torch_pruning as tp

    model = copy.deepcopy(model).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
    example = torch.randn(2, shape.channels, shape.image_size, shape.image_size)
    head = _layers(model, nn.Linear)[-1]
    # torch-pruning leaves a group whole rather than remove all its filters (int(c * (1 - amount)) = 0):
    # a ratio just short of (c - 1) / c for narrow layers keeps one filter, so more amount never means more
    # parameters (what ``amount_for_cap`` relies on).
    ratios = {m: max(0.0, min(amount, (m.weight.shape[0] - 1 - 1e-6) / m.weight.shape[0]))
              for m in _layers(model, (nn.Conv2d, nn.Linear)) if m is not head}
    pruner = tp.pruner.BasePruner(
        model, example,
        importance=tp.importance.MagnitudeImportance(p=1, normalizer=None, group_reduction="first"),
        pruning_ratio=amount, pruning_ratio_dict=ratios, ignored_layers=[head])
    for group in pruner.step(interactive=True):
        if not _through_pad(group):
            group.prune()
    changes: dict = {"conv_widths": tuple(m.out_channels for m in _layers(model, nn.Conv2d))}
    if isinstance(cfg, PlainConfig):
        changes["hidden"] = tuple(m.out_features for m in _layers(model, nn.Linear)[:-1])
    try:
        pruned_cfg = dataclasses.replace(cfg, **changes)
        with torch.device("meta"):
            rebuilt = build_model(pruned_cfg, shape)
        rebuilt.load_state_dict(model.state_dict(), strict=True, assign=True)
    except (ConfigError, RuntimeError) as e:
        raise PruneError(f"the pruned {cfg.family} net cannot be rebuilt from a config: "
                         f"{first_line(e, None)}") from None
    with torch.no_grad():  # same weights, same outputs: the config describes the net torch-pruning made
        same = torch.allclose(rebuilt.eval()(example), model(example), rtol=1e-4, atol=1e-5)
    if not same:
        raise PruneError(f"the pruned {cfg.family} net cannot be rebuilt from a config: its outputs differ")
    return model, pruned_cfg


def amount_for_cap(model: nn.Module, cfg: ModelConfig, shape: Shape, cap: float, count=count_params,
                   flag: str = "--max-params", unit: str = "parameters") -> float:
    """The smallest amount (in hundredths) whose pruned net has at most ``cap`` parameters (or, with
    ``count=count_macs``, multiply-accumulates per image: ``--max-flops``).

    Which filters go depends on the weights, how many does not: each try prunes a copy and counts its
    config on the meta device with the guard's own count. Raises PruneError when the net already fits or
    when even ``MAX_AMOUNT`` leaves it over."""
    n = count(cfg, shape)
    if n <= cap:
        raise PruneError(f"the model has {n:,} {unit}, already within {flag} {cap:,.0f}")

    def count_at(amount: float) -> int:
        return count(prune_model(model, cfg, shape, amount)[1], shape)

    least = count_at(MAX_AMOUNT)
    if least > cap:
        raise PruneError(f"pruning {MAX_AMOUNT:.0%} of every prunable layer's filters still leaves {least:,} "
                         f"{unit}, over {flag} {cap:,.0f}")
    lo, hi = 0, round(MAX_AMOUNT * 100)  # in hundredths: lo is over the cap, hi within it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count_at(mid / 100) <= cap else (mid, hi)
    return hi / 100


def _inference(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
    return inference_model(copy.deepcopy(model).to(device, memory_format=memory_format(device)).eval(), precision)


def measure(model: nn.Module, cfg: RunConfig, info: DatasetInfo, test, device: torch.device, precision: str,
            tta: str = "none") -> dict:
    """Params, FLOPs/image and test top-1 of a model on data ``info`` (the checkpoint's recorded input and
    normalisation), with evaluate's own functions, in ``precision`` (weights cast once, on a copy), as it
    predicts under ``tta`` (the checkpoint's; a pruned model keeps it)."""
    m = test_metrics(_inference(model, device, precision), test.images, test.labels,
                     normalizer(info, device, memory_format(device)), device, info.num_classes, tta=tta)
    return {"params": count_params(cfg.model, info.shape), "flops": count_flops(cfg.model, info.shape) * TTA_VIEWS[tta],
            "top1": m["top1"]}


def latencies(models: list[nn.Module], shape: Shape, device: torch.device, precision: str, rounds: int = 5,
              repeats: int = 20) -> list[float]:
    """Median latency (ms) at batch 1 of each model, with ``latency.measure_latency``. The models take
    turns, ``rounds`` times, so that a load that comes and goes on a shared machine falls on all of them
    alike rather than on whichever happened to be measured then."""
    models = [_inference(m, device, precision) for m in models]
    size = (shape.channels, shape.image_size, shape.image_size)
    times = [[measure_latency(m, size, device, 1, repeats=repeats)["latency_ms"] for m in models]
             for _ in range(rounds)]
    return [statistics.median(column) for column in zip(*times)]


def prune_checkpoint(path: str | Path, out: str | Path, *, amount: float | None = None,
                     max_params: float | None = None, seconds: float = 0.0, data_dir=None,
                     device: str | torch.device = "cpu", precision: str = "auto", download: bool = False,
                     log=print, max_macs: float | None = None) -> dict:
    """Prune the checkpoint at ``path`` by ``amount`` (or to ``max_params``, or to ``max_macs``
    multiply-accumulates per image), fine-tune it for ``seconds``
    (0: not at all) and write the result to ``out``. Returns the numbers before pruning, after pruning and
    after fine-tuning (measured on the model rebuilt from ``out``).

    Everything that can fail on the input fails before ``out`` is touched, which is written atomically.
    Raises CheckpointError, PruneError (and DatasetNotFound from the data)."""
    if sum(x is not None for x in (amount, max_params, max_macs)) != 1:
        raise PruneError("give exactly one of amount, max_params or max_macs")
    device = torch.device(device)
    ckpt = load_checkpoint(path)
    cfg: RunConfig = ckpt["run_config"]
    info = recorded_info(ckpt)
    shape = info.shape
    model, tta = model_from_checkpoint(ckpt), ckpt["tta"]
    t0 = time.perf_counter()
    if max_params is not None:
        amount = amount_for_cap(model, cfg.model, shape, max_params)
    elif max_macs is not None:  # a flip average runs the net twice an image
        amount = amount_for_cap(model, cfg.model, shape, max_macs / TTA_VIEWS[tta], count_macs, "--max-flops", "MACs")
    pruned, pruned_model_cfg = prune_model(model, cfg.model, shape, amount)
    prune_s = time.perf_counter() - t0
    pruned_cfg = cfg.replace(model=pruned_model_cfg)
    if count_params(pruned_model_cfg, shape) >= count_params(cfg.model, shape):
        raise PruneError(f"pruning {amount:g} of each layer's filters removes none from this {cfg.model.family} "
                         f"net; try a larger --amount")

    precision = resolve_precision(device, precision)
    test, _ = checkpoint_test_split(path, ckpt, data_dir, device, download=download)
    report = {"checkpoint": str(path), "out": str(out), "amount": amount, "prune_seconds": prune_s,
              "device": str(device), "precision": precision,
              "before": measure(model, cfg, info, test, device, precision, tta)}
    stages = {"before": model, "pruned": pruned}
    log(f"pruned {amount:.1%} of each prunable layer's filters in {prune_s:.1f} s")
    report["pruned"] = measure(pruned, pruned_cfg, info, test, device, precision, tta)
    state = {k: v.detach().clone().contiguous() for k, v in pruned.state_dict().items()}
    metrics, trained_s, trained_in = dict(ckpt["metrics"]), 0.0, ckpt.get("precision", "fp32")
    trained_on = info  # the normalisation the weights last trained with: the file's, or the fine-tuning's data
    if seconds > 0:
        data = load_data(cfg.data, data_dir, device, download=download)
        if described(ckpt["extra"]):  # a fine-tuned model: its data conformed as it was trained on it
            data = conform_data(data, info)
        # on the labels alone (a distilled model's teacher is not in its checkpoint), every layer training
        tune_cfg = pruned_cfg.replace(train=dataclasses.replace(cfg.train, lr=cfg.train.lr * FINETUNE_LR_SCALE,
                                                                distill=0.0, freeze="none", backbone_lr_scale=1.0))

        def hook(progress: float, m: dict) -> bool:
            acc = f"  val acc {m['val_acc']:.4f}" if "val_acc" in m else ""
            log(f"fine-tune {progress:>4.0%}  epoch {m['epoch']:.2f}  train loss {m['train_loss']:.4f}{acc}")
            return False

        result = train_run(tune_cfg, data, device=device, seconds=seconds, hook=hook, precision=precision,
                           init_state=state)
        if result.status != COMPLETE:
            raise PruneError(f"fine-tuning ended {result.status} ({result.reason}); nothing written")
        state, metrics, trained_s, trained_in = result.state_dict, result.metrics, result.seconds, result.precision
        trained_on = data.info
        report["finetune_seconds"] = result.seconds
    save_checkpoint(out, pruned_cfg, state, metrics=metrics, n_params=count_params(pruned_model_cfg, shape),
                    flops=count_flops(pruned_model_cfg, shape) * TTA_VIEWS[tta], classes=ckpt["classes"], tta=tta,
                    train_seconds=ckpt["train_seconds"] + trained_s, precision=trained_in,
                    extra={"phase": "prune", "pruned_from": str(path), "amount": amount,
                           "finetune_seconds": trained_s}, info=trained_on)
    rebuilt = model_from_checkpoint(load_checkpoint(out))  # the numbers after are the file's own
    last = "finetuned" if seconds > 0 else "written"
    report[last], stages[last] = measure(rebuilt, pruned_cfg, info, test, device, precision, tta), rebuilt
    deployed_stages = [deployed(m, tta) for m in stages.values()]
    for key, ms in zip(stages, latencies(deployed_stages, shape, device, precision)):
        report[key]["latency_ms"] = ms
    return report


def format_prune_report(r: dict) -> str:
    """A table of ``prune_checkpoint``'s numbers, one row per stage."""
    rows = [(name, r[key]) for key, name in (("before", "before"), ("pruned", "pruned"),
                                              ("finetuned", "fine-tuned"), ("written", "written")) if key in r]
    lines = [f"{r['checkpoint']} -> {r['out']}  (amount {r['amount']:.3f}; latency at batch 1 on {r['device']} "
             f"in {r['precision']})",
             f"  {'':<11}{'params':>11}{'MFLOPs':>10}{'latency ms':>12}{'test top-1':>12}"]
    for name, m in rows:
        lines.append(f"  {name:<11}{m['params']:>11,}{m['flops'] / 1e6:>10.2f}{m['latency_ms']:>12.3f}"
                     f"{m['top1']:>12.2%}")
    return "\n".join(lines)
