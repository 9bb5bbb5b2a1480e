"""Plain ConvNet: ``[(conv -> [bn] -> act) x P -> pool] x (N/P) -> (fc -> act) x M -> fc``.

With max pooling and a monotone activation, each block's last activation runs after its pool (below)."""

from __future__ import annotations

from torch import nn

from budgetnet.config import PlainConfig, Shape
from budgetnet.models import Group, register, register_groups
from budgetnet.models.layers import make_activation

MONOTONE = ("relu", "leaky_relu")  # non-decreasing and parameter-free: max(f(a), f(b)) = f(max(a, b))


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
        act = make_activation(cfg.activation, width)
        c = width
        if (i + 1) % cfg.convs_per_block == 0 and size >= 2:  # the spatial size is known analytically
            # A monotone activation commutes with max pooling, so it runs after the pool, on a quarter of
            # the values: the same function and gradients, and the same parameter names (it has none).
            layers.extend((pool(2, 2), act) if cfg.pool == "max" and cfg.activation in MONOTONE else (act, pool(2, 2)))
            size //= 2
        else:
            layers.append(act)
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


@register_groups("plain")
def plain_groups(model: nn.Sequential, cfg: PlainConfig) -> list[Group]:
    """One group per conv block (the convs between two pools), one per hidden fc layer, the head."""
    out: list[Group] = []
    convs = fcs = 0
    for m in model:
        if isinstance(m, nn.Conv2d):
            if convs % cfg.convs_per_block == 0:
                out.append((f"block{convs // cfg.convs_per_block + 1}", []))
            convs += 1
        elif isinstance(m, nn.Linear):
            fcs += 1
            out.append((f"fc{fcs}", []))
        out[-1][1].append(m)
    out[-1] = ("head", out[-1][1])
    return out
