"""The training recipe: the optimizers, the lr schedule's shapes, an EMA of the weights, and the loss."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from budgetnet.config import TrainConfig


def lr_factor(cfg: TrainConfig, p: float) -> float:
    """Multiplier of the peak lr at progress p: linear warm-up, then the schedule's decay to ~0 at p=1."""
    p = min(max(p, 0.0), 1.0)
    warm = max(cfg.warmup, 0.25) if cfg.schedule == "onecycle" else cfg.warmup
    if p < warm:
        start = 0.04 if cfg.schedule == "onecycle" else 0.0
        return start + (1 - start) * p / warm
    q = (p - warm) / (1 - warm) if warm < 1 else 1.0
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * q))
    if cfg.schedule == "step":  # x0.1 at 50% and at 75% of the decay phase
        return 0.1 ** ((q >= 0.5) + (q >= 0.75))
    return 1.0 - q  # linear and onecycle end at 0


def make_optimizer(model: nn.Module, cfg: TrainConfig, head: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, or AdamW. No weight decay on biases and norm parameters.

    ``head`` (fine-tuning): the new classifier's parameters; every other parameter is pretrained and its
    groups carry ``lr_scale`` = ``cfg.backbone_lr_scale``, which the loop multiplies into the lr."""
    ids = {id(p) for p in head or ()}
    groups = []
    for part, scale in (([p for p in model.parameters() if id(p) not in ids], cfg.backbone_lr_scale if head else 1.0),
                        (list(head or ()), 1.0)):
        groups += [{"params": [p for p in part if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr_scale": scale},
                   {"params": [p for p in part if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": scale}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def prime_optimizers() -> None:
    """Pay a process's one-off cost of its first optimizer steps (torch's lazy imports and set-up) before
    any run's clock starts. Otherwise the first run of a process spends it out of its own slice, and, as
    its schedule follows elapsed time, past its warm-up: a search worker's first trial, a grid study's (no
    speed probe pays it), a Ray actor's."""
    for tc in (TrainConfig(optimizer="sgd"), TrainConfig(optimizer="adamw")):
        w = nn.Linear(1, 1)
        opt = make_optimizer(w, tc)
        w(torch.ones(1, 1)).sum().backward()
        opt.step()


class EMA:
    """Exponential moving average of a model's weights and float buffers, kept on the model's device.

    One foreach lerp per step over tensors paired once at the start (the optimizer and BN update the
    model's tensors in place), and a host-side update count: unlike ``torch.optim.swa_utils.AveragedModel``,
    whose update tests a device counter, it never waits for the device.

    The decay warms up: after n updates it is ``min(decay, (1 + n) / (10 + n))`` (TensorFlow's
    ``ExponentialMovingAverage`` with ``num_updates``). Without that, a 0.999 average over a slice of a few
    hundred steps stays close to the initial weights, and the trial that uses it is scored near chance.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).requires_grad_(False)
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values(), strict=True))
        self._float = [(a, m) for a, m in pairs if a.is_floating_point()]
        self._other = [(a, m) for a, m in pairs if not a.is_floating_point()]  # counters: copied

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged, current = [a for a, _ in self._float], [m for _, m in self._float]
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        if self._other:
            torch._foreach_copy_([a for a, _ in self._other], [m for _, m in self._other])
        self.updates += 1


def training_loss(logits: torch.Tensor, y: torch.Tensor, tc: TrainConfig,
                  teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with ``tc.label_smoothing``; with a teacher, knowledge distillation (Hinton et al.,
    2015): ``(1 - a) * CE + a * T^2 * KL(teacher_T || student_T)`` with ``a = tc.distill`` and both
    distributions softened by ``T = tc.distill_temperature`` (T^2 keeps the soft term's gradients on the
    scale of the hard term's)."""
    ce = F.cross_entropy(logits, y, label_smoothing=tc.label_smoothing)
    if teacher_logits is None:
        return ce
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"the teacher's outputs {tuple(teacher_logits.shape)} do not match the student's "
                         f"{tuple(logits.shape)}")
    t = tc.distill_temperature
    kd = F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    return (1 - tc.distill) * ce + tc.distill * kd
