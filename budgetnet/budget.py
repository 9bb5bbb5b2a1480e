"""The budget guard: exact parameter and FLOP counts on the meta device, before anything is allocated.

``check_params`` is the cheap gate (a meta build, a few ms); ``count_flops`` runs a meta forward pass
under ``torch.utils.flop_counter`` (tens of ms). Neither touches real memory, so an oversized config is
rejected before it costs a byte of GPU memory or a second of training.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from budgetnet.config import ModelConfig, Shape
from budgetnet.models import build_model


class BudgetExceeded(Exception):
    """A config is over a cap. Carries the numbers so a search can record them."""

    def __init__(self, what: str, value: float, cap: float):
        self.what, self.value, self.cap = what, value, cap
        super().__init__(f"{what} {value:,.0f} exceed the cap of {cap:,.0f}")


def _meta_model(cfg: ModelConfig, shape: Shape) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(cfg, shape)


@functools.lru_cache(maxsize=4096)
def count_params(cfg: ModelConfig, shape: Shape) -> int:
    """Exact number of trainable parameters, from a meta-device build (no memory allocated)."""
    return sum(p.numel() for p in _meta_model(cfg, shape).parameters() if p.requires_grad)


@functools.lru_cache(maxsize=1024)
def count_flops(cfg: ModelConfig, shape: Shape) -> int:
    """Forward FLOPs for one image (2 per multiply-add), counted on the meta device."""
    model = _meta_model(cfg, shape).eval()
    x = torch.empty(1, shape.channels, shape.image_size, shape.image_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def check_params(cfg: ModelConfig, shape: Shape, max_params: float) -> int:
    """Return the parameter count, or raise :class:`BudgetExceeded` if it is over ``max_params``."""
    n = count_params(cfg, shape)
    if n > max_params:
        raise BudgetExceeded("parameters", n, max_params)
    return n
