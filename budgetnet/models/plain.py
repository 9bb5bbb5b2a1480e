"""Plain ConvNet: ``[(conv -> [bn] -> act) x P -> pool] x (N/P) -> (fc -> act) x M -> fc``."""

from __future__ import annotations

from torch import nn

from budgetnet.config import PlainConfig, Shape
from budgetnet.models import register
from budgetnet.models.layers import make_activation


@register("plain")
def build_plain(cfg: PlainConfig, shape: Shape) -> nn.Module:
    in_channels, num_classes = shape.channels, shape.num_classes
    pool = nn.MaxPool2d if cfg.pool == "max" else nn.AvgPool2d
    layers: list[nn.Module] = []
    c, size = in_channels, shape.image_size
    for i, (width, k) in enumerate(zip(cfg.layer_widths(), cfg.layer_kernels())):
        layers.append(nn.Conv2d(c, width, k, padding=k // 2, bias=cfg.conv_bias))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(make_activation(cfg.activation, width))
        c = width
        if (i + 1) % cfg.convs_per_block == 0 and size >= 2:  # the spatial size is known analytically
            layers.append(pool(2, 2))
            size //= 2
    layers.append(nn.Flatten())
    features = c * size * size
    for h in cfg.hidden:
        layers.append(nn.Linear(features, h))
        layers.append(make_activation(cfg.activation, h))
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        features = h
    if cfg.dropout and not cfg.hidden:
        layers.append(nn.Dropout(cfg.dropout))
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)
