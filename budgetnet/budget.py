"""The budget guard: exact parameter and FLOP counts on the meta device, before anything is allocated.

``check_params`` is the cheap gate (a meta build, a few ms); ``count_flops`` runs a meta forward pass
under ``torch.utils.flop_counter`` (tens of ms). Neither touches real memory, so an oversized config is
rejected before it costs a byte of GPU memory or a second of training.

Staged families (a ``depths`` field: the ResNets and the inverted-residual net) are counted by depth
additivity, so the cost does not grow with depth: every block of a stage after its first has the same
input and output width, stride 1 and the same resolution, so each adds the same parameters and FLOPs.
The count of ``depths=(d1, d2, d3)`` is then the count of the all-ones net plus, per stage, ``d - 1``
times what a second block adds there: one meta build of the all-ones net and one per stage deeper than
1, each exact, used wherever they hold fewer blocks than the net itself. A plain net with equal widths
and a constant kernel is counted the same way over ``convs_per_block``.
``tests/test_models.py`` checks it against real builds.
"""

from __future__ import annotations

import dataclasses
import functools
import gc

import torch
from torch.utils.flop_counter import FlopCounterMode

from budgetnet.config import ModelConfig, PlainConfig, Shape
from budgetnet.models import build_model


class BudgetExceeded(Exception):
    """A config is over a cap. Carries the numbers so a search can record them."""

    def __init__(self, what: str, value: float, cap: float):
        self.what, self.value, self.cap = what, value, cap
        super().__init__(f"{what} {value:,.0f} exceed the cap of {cap:,.0f}")


def _meta_model(cfg: ModelConfig, shape: Shape) -> torch.nn.Module:
    # A build creates thousands of small objects; with the collector on, one of them may trigger a full
    # collection of a large process (an Optuna study, a loaded dataset) and stall the count 100+ ms.
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.device("meta"):
            return build_model(cfg, shape)
    finally:
        if enabled:
            gc.enable()


def _repeats(cfg: ModelConfig):
    """(depths, rebuild) for a config made of repeated identical layers, else None.

    Staged families repeat blocks per stage (``depths``). A plain net with equal widths and a constant
    kernel repeats identical convs within each of its blocks (``convs_per_block``)."""
    if getattr(cfg, "depths", None):
        return cfg.depths, lambda d: dataclasses.replace(cfg, depths=d)
    if isinstance(cfg, PlainConfig) and cfg.width_pattern == "equal" and cfg.kernel_pattern == "constant":
        blocks = cfg.n_conv // cfg.convs_per_block
        return (cfg.convs_per_block,), lambda d: dataclasses.replace(cfg, convs_per_block=d[0],
                                                                     n_conv=d[0] * blocks)
    return None


def _by_depth(count, cfg: ModelConfig, shape: Shape) -> int:
    """``count(cfg, shape)`` from shallow builds for nets of repeated layers (see the module docstring);
    a direct build for everything else, and wherever the shallow builds would hold as many blocks as the
    net itself (ResNet-20, the 5-stage inverted-residual net)."""
    rep = _repeats(cfg)
    if rep is None:
        return count(cfg, shape)
    depths, rebuild = rep
    deep = sum(d > 1 for d in depths)
    if len(depths) + deep * (len(depths) + 1) >= sum(depths):  # shallow builds would not build fewer blocks
        return count(cfg, shape)
    ones = (1,) * len(depths)
    base = count(rebuild(ones), shape)
    total = base
    for i, d in enumerate(depths):
        if d > 1:
            two = ones[:i] + (2,) + ones[i + 1:]
            total += (d - 1) * (count(rebuild(two), shape) - base)
    return total


@functools.lru_cache(maxsize=4096)
def _params_built(cfg: ModelConfig, shape: Shape) -> int:
    return sum(p.numel() for p in _meta_model(cfg, shape).parameters() if p.requires_grad)


@functools.lru_cache(maxsize=1024)
def _flops_built(cfg: ModelConfig, shape: Shape) -> int:
    model = _meta_model(cfg, shape).eval()
    x = torch.empty(1, shape.channels, shape.image_size, shape.image_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


@functools.lru_cache(maxsize=4096)
def count_params(cfg: ModelConfig, shape: Shape) -> int:
    """Exact number of trainable parameters, from meta-device builds (no memory allocated)."""
    return _by_depth(_params_built, cfg, shape)


@functools.lru_cache(maxsize=1024)
def count_flops(cfg: ModelConfig, shape: Shape) -> int:
    """Forward FLOPs for one image (2 per multiply-add), counted on the meta device."""
    return _by_depth(_flops_built, cfg, shape)


def clear_caches() -> None:
    """Forget every cached count (benchmarks and tests that time or watch a cold count)."""
    for fn in (count_params, count_flops, _params_built, _flops_built):
        fn.cache_clear()


def check_params(cfg: ModelConfig, shape: Shape, max_params: float) -> int:
    """Return the parameter count, or raise :class:`BudgetExceeded` if it is over ``max_params``."""
    n = count_params(cfg, shape)
    if n > max_params:
        raise BudgetExceeded("parameters", n, max_params)
    return n
