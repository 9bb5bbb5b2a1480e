"""Model families, registered by name. Every builder is meta-safe: it allocates nothing and never looks at
data, so ``budget.count_params`` can build any config on the ``meta`` device first.

    build_model(config, Shape(channels=3, num_classes=100, image_size=32))
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from budgetnet.config import ModelConfig, Shape
from budgetnet.models.layers import init_weights

Builder = Callable[..., nn.Module]
Group = tuple[str, list[nn.Module]]  # a name and the modules it holds
_REGISTRY: dict[str, Builder] = {}
_GROUPS: dict[str, Callable[[nn.Module, ModelConfig], list[Group]]] = {}


def register(family: str) -> Callable[[Builder], Builder]:
    """Register ``fn(config, shape) -> nn.Module`` under ``family``."""

    def deco(fn: Builder) -> Builder:
        _REGISTRY[family] = fn
        return fn

    return deco


def register_groups(family: str):
    """Register ``fn(model, config) -> [(name, modules), ...]``, the family's trainable groups."""

    def deco(fn):
        _GROUPS[family] = fn
        return fn

    return deco


def groups(model: nn.Module, config: ModelConfig) -> list[Group]:
    """The trainable groups of a model its family built, in forward order, the classifier last (named
    ``head``): the stem, each stage (or conv block, or hidden fc layer), then the head. What fine-tuning
    freezes and unfreezes (``budgetnet.finetune``); every parameter belongs to exactly one group."""
    return _GROUPS[config.family](model, config)


def stem_and_stages(layers: list[nn.Module], depths: tuple[int, ...], stem: int = 3) -> tuple[list[Group], int]:
    """A staged net's first groups: its ``stem`` layers, then one group per stage of ``depths`` blocks;
    with the index of the first layer after them."""
    out, at = [("stem", layers[:stem])], stem
    for i, depth in enumerate(depths):
        out.append((f"stage{i + 1}", layers[at:at + depth]))
        at += depth
    return out, at


def families() -> list[str]:
    return sorted(_REGISTRY)


def build_model(config: ModelConfig, shape: Shape) -> nn.Module:
    """Build the model a config describes, on the current default device, with its initialiser applied."""
    model = _REGISTRY[config.family](config, shape)
    init_weights(model, config.init)
    return model


# Importing the family modules registers them.
from budgetnet.models import mobilenet, plain, resnet  # noqa: E402,F401
