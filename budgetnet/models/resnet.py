"""CIFAR ResNet with basic or bottleneck blocks (He et al. 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from budgetnet.config import ResNetConfig, Shape
from budgetnet.models import register
from budgetnet.models.layers import make_activation


class Shortcut(nn.Module):
    """Identity when shapes match; otherwise "option A" (subsample + zero-pad channels, no parameters),
    or a 1x1 conv + BN projection when the block narrows (zero-padding cannot remove channels)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, c_out - c_in
        self.proj = None
        if c_out < c_in:
            self.proj = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            return self.proj(x)
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad > 0:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, act: str):
        super().__init__()
        c_out = width
        self.body = nn.Sequential(
            *_conv_bn(c_in, width, 3, stride), make_activation(act, width), *_conv_bn(width, c_out, 3)
        )
        self.shortcut = Shortcut(c_in, c_out, stride)
        self.act = make_activation(act, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, act: str):
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(
            *_conv_bn(c_in, width, 1), make_activation(act, width),
            *_conv_bn(width, width, 3, stride), make_activation(act, width),
            *_conv_bn(width, c_out, 1),
        )
        self.shortcut = Shortcut(c_in, c_out, stride)
        self.act = make_activation(act, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


@register("resnet")
def build_resnet(cfg: ResNetConfig, shape: Shape) -> nn.Module:
    in_channels, num_classes = shape.channels, shape.num_classes
    block = BasicBlock if cfg.block == "basic" else Bottleneck
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, cfg.stem_width, 3, padding=1, bias=cfg.stem_bias),
        nn.BatchNorm2d(cfg.stem_width),
        make_activation(cfg.activation, cfg.stem_width),
    ]
    c = cfg.stem_width
    for stage, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(block(c, width, stride, cfg.activation))
            c = width * block.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)
