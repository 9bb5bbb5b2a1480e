"""CIFAR ResNet with basic or bottleneck blocks (He et al. 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from budgetnet.config import ConfigError, ResNetConfig, Shape
from budgetnet.models import Group, register, register_groups, stem_and_stages
from budgetnet.models.layers import ConvWidths, make_activation


class Shortcut(nn.Module):
    """Identity when shapes match; otherwise "option A" (subsample + zero-pad channels, no parameters),
    or a 1x1 conv + BN projection when the block narrows (zero-padding cannot remove channels). Which one
    follows the family's own widths (``narrows``), so a pruned net keeps the shortcuts of its original."""

    def __init__(self, c_in: int, c_out: int, stride: int, narrows: bool, take: ConvWidths):
        super().__init__()
        self.stride, self.pad = stride, c_out - c_in
        self.proj = None
        if not narrows and c_out < c_in:
            raise ConfigError(f"conv_widths narrows a block from {c_in} to {c_out} channels where its shortcut "
                              "has no projection")
        if narrows:
            self.proj = nn.Sequential(*_conv_bn(c_in, take(c_out, fixed=True), 1, stride))

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

    def __init__(self, c_in: int, width: int, stride: int, act: str, narrows: bool, take: ConvWidths):
        super().__init__()
        width = take(width)
        c_out = take(width * self.expansion)
        self.body = nn.Sequential(
            *_conv_bn(c_in, width, 3, stride), make_activation(act, width), *_conv_bn(width, c_out, 3)
        )
        self.c_out = c_out
        self.shortcut = Shortcut(c_in, c_out, stride, narrows, take)
        self.act = make_activation(act, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, act: str, narrows: bool, take: ConvWidths):
        super().__init__()
        w1, w2, c_out = take(width), take(width), take(width * self.expansion)
        self.body = nn.Sequential(
            *_conv_bn(c_in, w1, 1), make_activation(act, w1),
            *_conv_bn(w1, w2, 3, stride), make_activation(act, w2),
            *_conv_bn(w2, c_out, 1),
        )
        self.c_out = c_out
        self.shortcut = Shortcut(c_in, c_out, stride, narrows, take)
        self.act = make_activation(act, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


@register("resnet")
def build_resnet(cfg: ResNetConfig, shape: Shape) -> nn.Module:
    in_channels, num_classes = shape.channels, shape.num_classes
    block = BasicBlock if cfg.block == "basic" else Bottleneck
    take = ConvWidths(cfg.conv_widths)
    c = take(cfg.stem_width)
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, c, 3, padding=1, bias=cfg.stem_bias),
        nn.BatchNorm2d(c),
        make_activation(cfg.activation, c),
    ]
    c_own = cfg.stem_width  # the width the family's own fields give here
    for stage, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            out_own = width * block.expansion
            layers.append(block(c, width, stride, cfg.activation, out_own < c_own, take))
            c, c_own = layers[-1].c_out, out_own
    take.finish()
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


@register_groups("resnet")
def resnet_groups(model: nn.Sequential, cfg: ResNetConfig) -> list[Group]:
    """The stem, one group per stage, the head (pool and classifier)."""
    layers = list(model)
    out, at = stem_and_stages(layers, cfg.depths)
    return [*out, ("head", layers[at:])]
