"""The search space: the only place that calls ``trial.suggest_*``. A trial goes in, a RunConfig comes out.

The space is feasible by construction. Each family has one width knob, sampled as a fraction of the
widest net that still fits the parameter cap given every other sampled choice (depth, block, kernel,
hidden layer, activation, ...). That maximum is found on the meta device, so the sampler almost never
proposes an oversized model and TPE sees fixed distributions (a fraction in [0.15, 1], log scale) instead
of ranges that move with depth. The budget guard stays behind it as a safety net.

The "widest that fits" also respects a FLOP bound (``sampling_flops``): the user's ``--max-flops`` and a
cap derived from the device's speed and the trial's time slice, so a slow device (a CPU) is not handed
1M-parameter nets that cannot see even half their training split in a trial (``trial.MIN_EPOCHS_PER_TRIAL``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from typing import Any

import optuna

from budgetnet.budget import count_flops, count_params
from budgetnet.config import (
    ACTIVATIONS,
    INITS,
    ConfigError,
    DataConfig,
    MobileNetConfig,
    ModelConfig,
    PlainConfig,
    ResNetConfig,
    RunConfig,
    Shape,
    TrainConfig,
)

FAMILIES = ("resnet", "plain", "mobilenet")
MIN_WIDTH_FRAC = 0.15  # the narrowest net tried has 15% of the width (~2% of the parameters) that fits
MOBILENET_RATIOS = (1, 1.5, 2, 4, 6)  # stage widths relative to the first stage (MobileNetV2's 16..96)
MOBILENET_DEPTHS = (1, 2, 3, 3, 2)  # MobileNetV2's CIFAR stage depths, scaled by the sampled factor
LR_BATCH = 128  # the batch size the sampled learning rates are given for (scaled to the sampled batch)


def _with_width(cfg: ModelConfig, w: int) -> ModelConfig:
    """The config with its single width knob set to ``w``."""
    if isinstance(cfg, ResNetConfig):
        return dataclasses.replace(cfg, widths=(w, 2 * w, 4 * w), stem_width=w)
    if isinstance(cfg, PlainConfig):
        return dataclasses.replace(cfg, width=w)
    if isinstance(cfg, MobileNetConfig):
        widths = tuple(max(1, round(w * r)) for r in MOBILENET_RATIOS)
        return dataclasses.replace(cfg, widths=widths, stem_width=max(8, w), head_width=4 * widths[-1])
    raise TypeError(type(cfg).__name__)


FIT_POINTS = (16, 64, 256)  # widths whose exact counts fix the quadratic that guesses the bound


def _largest(count, cap: float, limit: int) -> int:
    """Largest w in [0, limit] with ``count(w) <= cap``, for a count that grows with w.

    Parameters and FLOPs are (close to) quadratic in the width knob: every conv's weights and
    multiply-adds scale with c_in * c_out, biases, norms and the head with one width. So three exact
    counts fix a quadratic whose root guesses the answer, and a few more exact counts around the guess
    (galloping out, then bisecting) confirm it. About five counts instead of a ten-step bisection; the
    answer is exact either way, because only exact counts decide.
    """
    xs = [x for x in FIT_POINTS if x <= limit]
    guess = limit
    if len(xs) == 3:
        (x1, x2, x3), (y1, y2, y3) = xs, [count(x) for x in xs]
        a = ((y3 - y1) / (x3 - x1) - (y2 - y1) / (x2 - x1)) / (x3 - x2)  # divided differences
        b = (y2 - y1) / (x2 - x1) - a * (x1 + x2)
        c = y1 - a * x1 * x1 - b * x1 - cap
        if a > 0:
            guess = (-b + math.sqrt(max(0.0, b * b - 4 * a * c))) / (2 * a)
        elif b > 0:
            guess = -c / b
    guess = min(limit, max(1, int(guess)))
    fits = lambda w: count(w) <= cap  # noqa: E731
    if fits(guess):  # gallop up to the first width that does not fit
        lo, step = guess, 1
        while lo < limit and fits(min(limit, lo + step)):
            lo, step = min(limit, lo + step), 2 * step
        hi = min(limit, lo + step) - 1 if lo < limit else limit
    else:  # gallop down to a width that fits; 0 when not even width 1 does
        hi, step = guess - 1, 1
        while True:
            lo = max(1, hi - step + 1)
            if fits(lo):
                break
            if lo == 1:
                return 0
            hi, step = lo - 1, 2 * step
    while lo < hi:  # invariant: fits(lo); everything above hi does not fit
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


@functools.lru_cache(maxsize=2048)
def max_width(cfg: ModelConfig, shape: Shape, max_params: float, max_flops: float | None = None,
              limit: int = 1024) -> int:
    """Largest width knob for which ``cfg`` fits ``max_params`` (and ``max_flops`` per image, if given);
    0 if even width 1 does not.

    Parameter counts and FLOPs grow monotonically with the width, so ``_largest`` finds it from a
    handful of exact meta-device counts (FLOPs only when the parameter bound is over the FLOP cap);
    results are cached per (config without width, shape, caps).
    """
    w = _largest(lambda x: count_params(_with_width(cfg, x), shape), max_params, limit)
    if max_flops and w > 0 and count_flops(_with_width(cfg, w), shape) > max_flops:
        w = _largest(lambda x: count_flops(_with_width(cfg, x), shape), max_flops, w)
    return w


def sampling_flops(feasible_flops: float | None, max_macs: float | None) -> float | None:
    """The FLOP bound widths are fitted under: the time-feasible cap (FLOPs) and the user's ``--max-flops``
    (multiply-accumulates, 2 FLOPs each), whichever is lower; None when neither is set."""
    bounds = [b for b in (feasible_flops, None if max_macs is None else 2 * max_macs) if b]
    return min(bounds) if bounds else None


def _fit_width(cfg: ModelConfig, shape: Shape, max_params: float, max_flops: float | None,
               frac: float) -> ModelConfig:
    # Dropout and the initialiser change no count: kept out of max_width's cache key, which a
    # continuous dropout would make miss on every sampled config.
    counted = dataclasses.replace(cfg, dropout=0.0, init="default")
    widest = max(1, max_width(counted, shape, max_params, max_flops))
    return _with_width(cfg, max(1, round(frac * widest)))


def suggest_config(trial: optuna.Trial, shape: Shape, max_params: float, data: DataConfig,
                   seed: int = 0, max_flops: float | None = None) -> RunConfig:
    """Sample an architecture and a schedule for ``trial``.

    The model fits ``max_params`` by construction, and ``max_flops`` (forward FLOPs per image) when given:
    the search derives that from the device's measured speed so that every trial can see at least half
    its training split in its time slice (see ``probe.feasible_flops``).
    """
    common = dict(
        activation=trial.suggest_categorical("activation", ACTIVATIONS),
        init=trial.suggest_categorical("init", INITS),
        dropout=trial.suggest_float("dropout", 0.0, 0.3),
    )
    family = trial.suggest_categorical("family", FAMILIES)
    if family == "resnet":
        model: ModelConfig = ResNetConfig(
            block=trial.suggest_categorical("resnet_block", ("basic", "bottleneck")),
            depths=(trial.suggest_int("resnet_depth", 1, 9),) * 3, **common)
    elif family == "plain":
        n_blocks = trial.suggest_int("plain_blocks", 2, 4)
        per_block = trial.suggest_int("plain_convs_per_block", 1, 2)
        hidden = trial.suggest_categorical("plain_hidden", (0, 128, 256, 512))
        model = PlainConfig(
            n_conv=n_blocks * per_block, convs_per_block=per_block,
            width_pattern=trial.suggest_categorical("plain_width_pattern", ("equal", "doubling")),
            kernel=trial.suggest_categorical("plain_kernel", (3, 5)),
            kernel_pattern=trial.suggest_categorical("plain_kernel_pattern", ("constant", "decreasing")),
            hidden=(hidden,) if hidden else (),
            batch_norm=trial.suggest_categorical("plain_batch_norm", (True, False)), **common)
    else:
        scale = trial.suggest_int("mobilenet_depth", 1, 3)
        model = MobileNetConfig(
            expansion=trial.suggest_categorical("mobilenet_expansion", (2, 4, 6)),
            depths=tuple(max(1, round(d * scale / 2)) for d in MOBILENET_DEPTHS), **common)
    # Log scale: parameters grow with the square of the width, so this spreads trials over model sizes.
    frac = trial.suggest_float("width_frac", MIN_WIDTH_FRAC, 1.0, log=True)
    model = _fit_width(model, shape, max_params, max_flops, frac)

    optimizer = trial.suggest_categorical("optimizer", ("sgd", "adamw"))
    batch_size = trial.suggest_categorical("batch_size", (64, 128, 256, 512))
    # The learning rate is sampled per 128 images and scaled with the batch: linearly for SGD (Goyal et al.
    # 2017), by the square root for AdamW. A good value then stays good at every batch size, so TPE learns
    # one lr instead of one per batch size, and a GPU's larger batches keep their tuned step size.
    scale = batch_size / LR_BATCH
    lr = (trial.suggest_float("sgd_lr_128", 0.01, 0.5, log=True) * scale if optimizer == "sgd"
          else trial.suggest_float("adamw_lr_128", 3e-4, 1e-2, log=True) * math.sqrt(scale))
    train = TrainConfig(
        optimizer=optimizer, lr=lr,
        momentum=trial.suggest_float("momentum", 0.8, 0.95),
        # SGD's decay is coupled (scaled by lr in the step); AdamW's is decoupled, decay * lr a step, so the
        # same number regularises ~100-1000x less there (Loshchilov & Hutter 2019): a range of its own
        weight_decay=(trial.suggest_float("weight_decay", 1e-5, 2e-3, log=True) if optimizer == "sgd"
                      else trial.suggest_float("adamw_weight_decay", 5e-3, 0.2, log=True)),
        batch_size=batch_size,
        warmup=trial.suggest_float("warmup", 0.0, 0.2),
        schedule=trial.suggest_categorical("schedule", ("onecycle", "cosine", "linear", "step")),
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.3),  # speedrun nets use 0.2-0.4
        # EMA decay per step: 0.99 averages the last ~100 steps (a short CPU slice has a few hundred),
        # 0.999 the last ~1,000 (GPU slices); evaluation and the checkpoint then use the average
        ema=trial.suggest_categorical("ema", (0.0, 0.99, 0.999)),
    )
    cutout_frac = trial.suggest_categorical("cutout_frac", (0.0, 0.25, 0.375))  # of the image side
    data = dataclasses.replace(
        data,
        crop_padding=trial.suggest_categorical("crop_padding", (0, 2, 4)),
        flip=trial.suggest_categorical("flip", (True, False)),
        cutout=int(shape.image_size * cutout_frac),
    )
    return RunConfig(model=model, train=train, data=data, seed=seed)


# The first trial of every new study (docs/search.md): a cheap net that learns quickly on any device,
# so the median pruner has a high bar at once and TPE a good region. No batch norm: it costs a small
# net's CPU step much. lr 0.05: higher ones kill its ReLUs at the one-cycle peak
# (docs/benchmarks.md, "Warm start").
WARM_START: dict[str, Any] = {
    "activation": "relu", "init": "kaiming", "dropout": 0.2, "family": "plain", "plain_blocks": 3,
    "plain_convs_per_block": 1, "plain_hidden": 512, "plain_width_pattern": "doubling", "plain_kernel": 3,
    "plain_kernel_pattern": "constant", "plain_batch_norm": False, "width_frac": 0.35, "optimizer": "sgd",
    "sgd_lr_128": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128, "warmup": 0.05,
    "schedule": "onecycle", "label_smoothing": 0.1, "ema": 0.0, "crop_padding": 0, "flip": True, "cutout_frac": 0.0,
}
WARM_MIN_WIDTH = 8  # channels of the warm start's first conv, which its hidden layer is narrowed to keep


def warm_start(shape: Shape, max_params: float, data: DataConfig, max_flops: float | None = None) -> dict[str, Any]:
    """``WARM_START``, with its hidden layer narrowed (512, 256, 128, then none) until the net fits
    ``max_params`` with a first conv of at least ``WARM_MIN_WIDTH`` channels; where none does, the widest
    that fits. The fc layer does not shrink with the width knob: under a small cap a 512-unit layer would
    leave the convolutions one or two channels wide (a net that learns far less), or be rejected, and
    the trial that should set the median pruner's bar would be lost. ``max_flops``: a FLOP bound
    (``sampling_flops``) its width fits too."""
    best, best_width = None, 0
    for hidden in (512, 256, 128, 0):
        params = {**WARM_START, "plain_hidden": hidden}
        cfg = suggest_config(optuna.trial.FixedTrial(params), shape, max_params, data, max_flops=max_flops)
        if count_params(cfg.model, shape) > max_params or (max_flops and count_flops(cfg.model, shape) > max_flops):
            continue
        if cfg.model.width >= WARM_MIN_WIDTH:
            return params
        if cfg.model.width > best_width:
            best, best_width = params, cfg.model.width
    return best if best is not None else params


# -- search --init: the architecture is the checkpoint's; the space is how to fine-tune it ----------------

FINETUNE_BATCHES = (32, 64, 128, 256)  # smaller than from scratch: fine-tuning sets are often small


def suggest_finetune_config(trial: optuna.Trial, source: RunConfig, n_groups: int, data: DataConfig,
                            shape: Shape, seed: int = 0) -> RunConfig:
    """Sample how to fine-tune ``source``'s net (of ``n_groups`` groups, head included): the freezing
    strategy with its K or SHARE, the lr and the pretrained layers' lr scale, augmentation, label smoothing
    and the batch size. The net, the optimizer and the schedule's shape are the checkpoint's."""
    kinds = ("none", "head", "last", "gradual") if n_groups > 2 else ("none", "head", "gradual")
    kind = trial.suggest_categorical("freeze", kinds)
    freeze = kind
    if kind == "last":  # K groups below the head; all of them would be "none"
        freeze = f"last:{trial.suggest_int('freeze_last_k', 1, n_groups - 2)}"
    elif kind == "gradual":
        freeze = f"gradual:{trial.suggest_float('gradual_share', 0.05, 0.5, log=True):.4g}"
    batch_size = trial.suggest_categorical("batch_size", FINETUNE_BATCHES)
    scale = batch_size / LR_BATCH  # as in suggest_config; lower ranges: the weights are trained already
    lr = (trial.suggest_float("ft_sgd_lr_128", 1e-3, 0.2, log=True) * scale if source.train.optimizer == "sgd"
          else trial.suggest_float("ft_adamw_lr_128", 5e-5, 5e-3, log=True) * math.sqrt(scale))
    train = dataclasses.replace(
        source.train, lr=lr, batch_size=batch_size, freeze=freeze, distill=0.0,
        eval_points=TrainConfig.eval_points,
        backbone_lr_scale=1.0 if kind == "head" else trial.suggest_float("backbone_lr_scale", 0.01, 1.0, log=True),
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.3))
    cutout_frac = trial.suggest_categorical("cutout_frac", (0.0, 0.25, 0.375))
    data = dataclasses.replace(data, crop_padding=trial.suggest_categorical("crop_padding", (0, 2, 4)),
                               flip=trial.suggest_categorical("flip", (True, False)),
                               cutout=int(shape.image_size * cutout_frac))
    return RunConfig(model=source.model, train=train, data=data, seed=seed)


def finetune_warm_start(source: RunConfig) -> dict[str, Any]:
    """The first trial of a ``search --init`` study: gradual unfreezing (one more group every tenth of the
    slice) with the pretrained layers at a third of the lr, the head's lr low for the optimizer, the
    checkpoint's flips, light translation and no cutout."""
    lr = {"ft_sgd_lr_128": 0.02} if source.train.optimizer == "sgd" else {"ft_adamw_lr_128": 1e-3}
    return {"freeze": "gradual", "gradual_share": 0.1, "batch_size": 64, **lr, "backbone_lr_scale": 0.3,
            "label_smoothing": 0.1, "cutout_frac": 0.0, "crop_padding": 2, "flip": source.data.flip}


# -- grids over a user-given subset (the reference reports' way) ------------------------------------

GRID_POINTS_CHECKED = 10_000  # grids up to this many points are validated point by point when loaded


def load_grid(text: str) -> tuple[dict, dict[str, list]]:
    """Parse a grid file: ``{"base": {partial RunConfig}, "grid": {"model.width": [8, 16, 32], ...}}``.

    Returns the base config dict and the grid, each value JSON-encoded so that lists (e.g. ``hidden``)
    can be grid values too. Raises ConfigError for anything malformed.
    """
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"grid file is not valid JSON: {e}") from None
    if not isinstance(spec, dict) or set(spec) - {"base", "grid"} or not isinstance(spec.get("grid"), dict):
        raise ConfigError('grid file must be {"base": {...}, "grid": {"section.field": [values], ...}}')
    base = spec.get("base", {})
    grid = spec["grid"]
    for key, values in grid.items():
        if key.count(".") != 1 or key.split(".")[0] not in ("model", "train", "data"):
            raise ConfigError(f"grid key {key!r} must look like model.width, train.lr or data.flip")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid values for {key!r} must be a non-empty list")
    encoded = {k: [json.dumps(v) for v in vs] for k, vs in grid.items()}
    # Every point is checked now, not when its trial comes (a bad later value, or a pair that does not hold
    # together, such as n_conv 3 with convs_per_block 2); past GRID_POINTS_CHECKED, each value once.
    points = math.prod(len(vs) for vs in encoded.values())
    if points <= GRID_POINTS_CHECKED:
        todo = (dict(zip(encoded, values)) for values in itertools.product(*encoded.values()))
    else:
        first = {k: vs[0] for k, vs in encoded.items()}
        todo = ({**first, k: v} for k, vs in encoded.items() for v in vs)
    for point in todo:
        try:
            grid_config(base, point)
        except ConfigError as e:
            shown = ", ".join(f"{k}={v}" for k, v in point.items())
            raise ConfigError(f"grid point {shown}: {e}") from None
    return base, encoded


def grid_config(base: dict, point: dict[str, str], seed: int = 0) -> RunConfig:
    """The RunConfig for one grid point (JSON-encoded values) on top of ``base``."""
    d = json.loads(json.dumps(base))
    d.setdefault("seed", seed)
    for key, value in point.items():
        section, name = key.split(".")
        d.setdefault(section, {})[name] = json.loads(value)
    d.setdefault("model", {}).setdefault("family", "resnet")
    return RunConfig.from_dict(d)


def suggest_grid_config(trial: optuna.Trial, base: dict, grid: dict[str, list], seed: int = 0) -> RunConfig:
    """Sample one grid point (the GridSampler picks it) and apply it to the base config."""
    point = {key: trial.suggest_categorical(key, values) for key, values in grid.items()}
    return grid_config(base, point, seed)
