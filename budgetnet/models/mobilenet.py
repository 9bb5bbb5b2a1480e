"""Inverted-residual (depthwise-separable) net in the MobileNetV2 style, with CIFAR strides."""

from __future__ import annotations

import torch
from torch import nn

from budgetnet.config import MobileNetConfig, Shape
from budgetnet.models import register
from budgetnet.models.layers import make_activation


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int, kernel: int, act: str):
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), make_activation(act, hidden)]
        layers += [
            nn.Conv2d(hidden, hidden, kernel, stride, padding=kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            make_activation(act, hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),  # linear bottleneck: no activation after projection
            nn.BatchNorm2d(c_out),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


@register("mobilenet")
def build_mobilenet(cfg: MobileNetConfig, shape: Shape) -> nn.Module:
    in_channels, num_classes = shape.channels, shape.num_classes
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, cfg.stem_width, 3, padding=1, bias=False),
        nn.BatchNorm2d(cfg.stem_width),
        make_activation(cfg.activation, cfg.stem_width),
    ]
    c = cfg.stem_width
    for stage, (width, depth, stride) in enumerate(zip(cfg.widths, cfg.depths, cfg.strides)):
        expansion = 1 if stage == 0 else cfg.expansion
        for i in range(depth):
            layers.append(InvertedResidual(c, width, stride if i == 0 else 1, expansion, cfg.kernel, cfg.activation))
            c = width
    if cfg.head_width:
        layers += [nn.Conv2d(c, cfg.head_width, 1, bias=False), nn.BatchNorm2d(cfg.head_width),
                   make_activation(cfg.activation, cfg.head_width)]
        c = cfg.head_width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)
