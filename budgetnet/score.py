"""The one loop that scores a model on a device-resident split: loss and top-1, in eval mode."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from budgetnet.data import ImageSet
from budgetnet.device import autocast


@torch.no_grad()
def evaluate_model(model: nn.Module, data: ImageSet, normalize, device: torch.device,
                   batch_size: int = 1024, precision: str = "fp32", mirror: bool = False) -> dict:
    """Loss and top-1 accuracy of ``model`` on a device-resident split (eval mode, ``precision`` autocast),
    without cuDNN's autotuning: no budget reserves time to tune an evaluation's new batch shapes.
    ``mirror``: also the top-1 of the flip average (``models.tta``), ``val_acc_flip``, with the images it
    gets right that the single view gets wrong (``flip_fixed``) and the reverse (``flip_broke``)."""
    was_training, autotune = model.training, torch.backends.cudnn.benchmark
    model.eval()
    torch.backends.cudnn.benchmark = False
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    flip = torch.zeros(3, device=device, dtype=torch.long)  # right, fixed, broke
    try:
        for i in range(0, len(data), batch_size):
            x = normalize(data.images[i:i + batch_size])  # in the layout the normalizer was made for
            y = data.labels[i:i + batch_size]
            with autocast(device, precision):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            right = logits.argmax(1) == y
            correct += right.sum()
            if mirror:
                with autocast(device, precision):
                    mirrored = model(x.flip(3))
                both = (logits.float() + mirrored.float()).argmax(1) == y
                flip += torch.stack([both.sum(), (both & ~right).sum(), (right & ~both).sum()])
    finally:
        model.train(was_training)
        torch.backends.cudnn.benchmark = autotune
    n = max(len(data), 1)
    out = {"val_loss": loss_sum.item() / n, "val_acc": correct.item() / n}
    if mirror:
        right, fixed, broke = flip.tolist()
        out.update(val_acc_flip=right / n, flip_fixed=fixed, flip_broke=broke)
    return out
