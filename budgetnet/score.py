"""The one loop that scores a model on a device-resident split: loss and top-1, in eval mode."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from budgetnet.data import ImageSet
from budgetnet.device import autocast


@torch.no_grad()
def evaluate_model(model: nn.Module, data: ImageSet, normalize, device: torch.device,
                   batch_size: int = 1024, precision: str = "fp32") -> dict:
    """Loss and top-1 accuracy of ``model`` on a device-resident split (eval mode, ``precision`` autocast),
    without cuDNN's autotuning: no budget reserves time to tune an evaluation's new batch shapes."""
    was_training, autotune = model.training, torch.backends.cudnn.benchmark
    model.eval()
    torch.backends.cudnn.benchmark = False
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    try:
        for i in range(0, len(data), batch_size):
            x = normalize(data.images[i:i + batch_size])  # in the layout the normalizer was made for
            y = data.labels[i:i + batch_size]
            with autocast(device, precision):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    finally:
        model.train(was_training)
        torch.backends.cudnn.benchmark = autotune
    n = max(len(data), 1)
    return {"val_loss": loss_sum.item() / n, "val_acc": correct.item() / n}
