"""Test-time augmentation: the model a checkpoint deploys, which may average its net over views."""

from __future__ import annotations

import torch
from torch import nn

from budgetnet.config import TTAS


class FlipAverage(nn.Module):
    """The mean of ``net``'s logits over each image and its horizontal mirror, in one graph that the ONNX and
    TorchScript exporters write whole."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x) + self.net(x.flip(3))) / 2


def deployed(net: nn.Module, tta: str) -> nn.Module:
    """``net`` as it predicts under ``tta`` (one of ``TTAS``): itself, or its flip average."""
    if tta not in TTAS:
        raise ValueError(f"tta={tta!r} is not one of {', '.join(TTAS)}")
    return FlipAverage(net).train(net.training) if tta == "flip" else net
