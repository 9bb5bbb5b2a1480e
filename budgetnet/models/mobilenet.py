"""Inverted-residual (depthwise-separable) net in the MobileNetV2 style, with CIFAR strides."""

from __future__ import annotations

import torch
from torch import nn

from budgetnet.config import ConfigError, MobileNetConfig, Shape
from budgetnet.models import Group, register, register_groups, stem_and_stages
from budgetnet.models.layers import ConvWidths, make_activation


class InvertedResidual(nn.Module):
    """``c_in``/``c_out`` are the block's widths; ``residual`` whether it adds its input (decided from the
    family's own widths, so that a pruned net keeps the connections of the net it came from)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int, kernel: int, act: str,
                 residual: bool, take: ConvWidths):
        super().__init__()
        hidden = take(c_in * expansion) if expansion != 1 else c_in
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), make_activation(act, hidden)]
        layers += [
            nn.Conv2d(hidden, take(hidden, fixed=True), kernel, stride, padding=kernel // 2, groups=hidden,
                      bias=False),
            nn.BatchNorm2d(hidden),
            make_activation(act, hidden),
        ]
        self.c_out = c_out = take(c_out)
        layers += [nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]  # linear bottleneck: no act
        self.body = nn.Sequential(*layers)
        if residual and c_in != c_out:
            raise ConfigError(f"conv_widths gives a residual block {c_in} input and {c_out} output channels")
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


@register("mobilenet")
def build_mobilenet(cfg: MobileNetConfig, shape: Shape) -> nn.Module:
    in_channels, num_classes = shape.channels, shape.num_classes
    take = ConvWidths(cfg.conv_widths)
    c = take(cfg.stem_width)
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, c, 3, padding=1, bias=False),
        nn.BatchNorm2d(c),
        make_activation(cfg.activation, c),
    ]
    c_own = cfg.stem_width  # the width the family's own fields give here
    for stage, (width, depth, stride) in enumerate(zip(cfg.widths, cfg.depths, cfg.strides)):
        expansion = 1 if stage == 0 else cfg.expansion
        for i in range(depth):
            s = stride if i == 0 else 1
            layers.append(InvertedResidual(c, width, s, expansion, cfg.kernel, cfg.activation,
                                           s == 1 and c_own == width, take))
            c, c_own = layers[-1].c_out, width
    if cfg.head_width:
        head = take(cfg.head_width)
        layers += [nn.Conv2d(c, head, 1, bias=False), nn.BatchNorm2d(head), make_activation(cfg.activation, head)]
        c = head
    take.finish()
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


@register_groups("mobilenet")
def mobilenet_groups(model: nn.Sequential, cfg: MobileNetConfig) -> list[Group]:
    """The stem, one group per stage, the last 1x1 conv (when there is one), the head (pool and classifier)."""
    layers = list(model)
    out, at = stem_and_stages(layers, cfg.depths)
    if cfg.head_width:
        out.append(("features", layers[at:at + 3]))
        at += 3
    return [*out, ("head", layers[at:])]
