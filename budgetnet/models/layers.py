"""Shared layer choices, picked by name through one table each (the timm way)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from budgetnet.config import ConfigError

ACTIVATION_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "relu": lambda c: nn.ReLU(inplace=True),
    "leaky_relu": lambda c: nn.LeakyReLU(0.1, inplace=True),
    "prelu": lambda c: nn.PReLU(c),  # one learnable slope per channel (counts as parameters)
    "gelu": lambda c: nn.GELU(),
    "silu": lambda c: nn.SiLU(inplace=True),
    "mish": lambda c: nn.Mish(inplace=True),
}


def make_activation(name: str, channels: int) -> nn.Module:
    """An activation layer by name; ``channels`` matters only for PReLU."""
    return ACTIVATION_LAYERS[name](channels)


def _kaiming(w: torch.Tensor) -> None:
    nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")


WEIGHT_INITS: dict[str, Callable[[torch.Tensor], None] | None] = {
    "default": None,  # keep PyTorch's per-layer defaults
    "xavier": nn.init.xavier_uniform_,
    "kaiming": _kaiming,  # convs only (torchvision's ResNet init): linear layers keep PyTorch's default
    "orthogonal": nn.init.orthogonal_,
}


@torch.no_grad()
def init_weights(model: nn.Module, name: str) -> None:
    """Re-initialise weights with the named scheme; their biases to zero, BN to identity.

    Every scheme re-initialises the convs. xavier and orthogonal also take the hidden linear layers;
    kaiming leaves every linear layer at PyTorch's default (uniform within 1/sqrt(fan_in)), as torchvision's
    ResNet init does. The classifier (the last linear layer) always keeps that default. He et al.'s
    fan_out rule on a linear layer uses its output width: a 10-way classifier after 512 units started at
    std 0.45, and the warm start's plain net (no BN) stayed at chance for 10 epochs on train+validation of
    the synthetic task in 8 seeds of 8; with convs only, all 8 learned it (``tests/test_models.py``).
    Called by ``build_model`` after construction. On the meta device it is a no-op, so builders stay
    allocation-free for the budget guard.
    """
    fn = WEIGHT_INITS[name]
    if fn is None:
        return
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    for m in model.modules():
        if isinstance(m, nn.Conv2d) or (isinstance(m, nn.Linear) and m is not head and name != "kaiming"):
            if m.weight.is_meta:
                return
            fn(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ConvWidths:
    """Hands a builder the output width of each conv it makes, in the order the model holds them.

    Without a list (``ModelConfig.conv_widths`` is None) every conv gets the family's own width. With one
    (a pruned net) each conv takes the next entry; a conv whose width follows its input (depthwise, a
    shortcut projection) must find that width there. ``finish`` checks that the list is used up, so a list
    that does not fit the net is one clear error, not a silently different model.
    """

    def __init__(self, widths: tuple[int, ...] | None):
        self.widths, self.used = widths, 0

    def __call__(self, default: int, *, fixed: bool = False) -> int:
        if self.widths is None:
            return default
        if self.used >= len(self.widths):
            raise ConfigError(f"conv_widths has {len(self.widths)} entries; the net has more convs")
        width = self.widths[self.used]
        if fixed and width != default:
            raise ConfigError(f"conv_widths[{self.used}] is {width}, but that conv's width follows its input: "
                              f"{default}")
        self.used += 1
        return width

    def finish(self) -> None:
        if self.widths is not None and self.used != len(self.widths):
            raise ConfigError(f"conv_widths has {len(self.widths)} entries; the net has {self.used} convs")
