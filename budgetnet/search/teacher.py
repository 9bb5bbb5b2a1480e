"""The final phase's teacher (``--teacher auto|PATH``): a model of no parameter cap whose outputs the final
≤cap model also learns from (knowledge distillation, ``recipe.training_loss``).

- ``--teacher PATH``: a checkpoint of the same data (``load_teacher``), checked before the search starts.
- ``--teacher auto``: a teacher trained inside the budget, on train+validation, in the final phase's own
  time. ``plan_teacher`` decides from measured speeds (the best trial's, and a few seconds of each
  candidate teacher's) whether teacher and student both fit:
  it picks the largest net of ``TEACHERS`` (at least ``TEACHER_MIN_SIZE`` times the student's parameters)
  that trains ``TEACHER_MIN_EPOCHS`` epochs in ``TEACHER_SHARE`` of the final time, while the student,
  paying for the teacher's forward pass on each of its batches, still trains ``STUDENT_MIN_EPOCHS`` (and
  at least the epochs its trial saw) in the rest. Otherwise there is no teacher, and one line says why.
  On a CPU that is the usual answer; on a GPU a 2.8M-parameter ResNet sees tens of epochs in minutes.

A candidate's speed is measured, not scaled from FLOPs: on a GPU a small student is bound by kernel
launches, so a net 50x its FLOPs trains far less than 50x slower. The teacher's run then checks its own
speed again (``min_epochs``) and ends early, handing its time back to the student, if it runs slower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from budgetnet.budget import count_flops, count_params
from budgetnet.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    recorded_info,
    save_checkpoint,
)
from budgetnet.config import EVAL_SUBSET, ModelConfig, ResNetConfig, RunConfig, Shape, TrainConfig
from budgetnet.data import DeviceData
from budgetnet.models import build_model
from budgetnet.search import attrs as A
from budgetnet.search.clock import clamp
from budgetnet.search.trial import measure_rate
from budgetnet.train import COMPLETE, train_run

# Candidate teachers, largest first: CIFAR ResNets of 2 basic blocks per stage (ResNet-14 layout) at 6x,
# 4x and 2x the ResNet-20 widths (6.2M, 2.8M and 0.7M parameters at 100 classes, 32 px).
TEACHERS: tuple[ModelConfig, ...] = (
    ResNetConfig(depths=(2, 2, 2), widths=(96, 192, 384), stem_width=96, init="kaiming"),
    ResNetConfig(depths=(2, 2, 2), widths=(64, 128, 256), stem_width=64, init="kaiming"),
    ResNetConfig(depths=(2, 2, 2), widths=(32, 64, 128), stem_width=32, init="kaiming"),
)
# The teacher's schedule: SGD with Nesterov momentum at lr 0.2 per 256 images, one-cycle, label smoothing.
TEACHER_TRAIN = TrainConfig(optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=5e-4, batch_size=256,
                            label_smoothing=0.1, schedule="onecycle", warmup=0.15)
TEACHER_SHARE = 0.4  # of the final phase's time, for training the teacher
TEACHER_MIN_EPOCHS = 15.0  # a teacher trained for fewer epochs is not worth the student's lost time
TEACHER_MIN_SIZE = 2.0  # a teacher has at least this many times the student's parameters
STUDENT_MIN_EPOCHS = 15.0  # the distilled student's epochs in the rest of the final phase (and >= its trial's)
TEACHER_PROBE_S = (1.0, 5.0, 0.02)  # a candidate's speed measurement: 2% of the final phase, 1 to 5 s
FORWARD_SHARE = 1 / 3  # a forward pass costs about a third of a training step (forward + backward)
DISTILL_WEIGHT = 0.5  # share of the teacher's softened outputs in the student's loss


def load_teacher(path: str, dataset: str, shape: Shape, device) -> torch.nn.Module:
    """The model of checkpoint ``path``, for distilling into a study's final model on ``dataset`` (input and
    classes ``shape``). Raises CheckpointError for a file that is not a checkpoint, or whose model was
    trained on other data or takes other inputs; the command checks this before its search starts."""
    ckpt = load_checkpoint(path)
    if ckpt["dataset"] != dataset:
        raise CheckpointError(f"--teacher {path} was trained on {ckpt['dataset']}, not {dataset}")
    if recorded_info(ckpt).shape != shape:
        raise CheckpointError(f"--teacher {path} takes {recorded_info(ckpt).shape}, the data is {shape}")
    return model_from_checkpoint(ckpt, device)


@dataclass
class TeacherPlan:
    model: ModelConfig
    seconds: float  # the teacher's share of the final phase
    n_params: int
    epochs: float  # estimated, at the measured speed
    student_epochs: float  # estimated, for the distilled student in the rest


def plan_teacher(best: optuna.trial.FrozenTrial, seconds: float, images: int, shape: Shape,
                 measure: Callable[[ModelConfig], float | None],
                 teachers: tuple[ModelConfig, ...] | None = None) -> TeacherPlan | str:
    """The teacher to train in a final phase of ``seconds`` on ``images`` training images, or why none.

    ``measure(model)`` trains a candidate for a few seconds and returns its images/s (``TEACHER_PROBE_S``,
    charged to the budget like everything else). It is asked only for candidates that could fit: no
    teacher trains faster than the student did, so a device on which even the student's speed would not
    give a teacher its epochs gets no teacher without any measurement (a CPU, usually).
    """
    rate = float(A.IMAGES_PER_S.of(best, 0.0))
    s_params = A.N_PARAMS.of(best, 0)
    trial_epochs = float(A.EPOCHS.of(best, 0.0))
    if not (rate > 0 and seconds > 0):
        return "the best trial recorded no speed"
    need_student = max(STUDENT_MIN_EPOCHS, trial_epochs)

    def verdict(t_rate: float, n_params: int) -> tuple[bool, float, float, str]:
        epochs = t_rate * TEACHER_SHARE * seconds / images
        # The student pays for one teacher forward pass per image: about a third of a teacher step.
        student_rate = 1 / (1 / rate + FORWARD_SHARE / t_rate)
        student_epochs = student_rate * (1 - TEACHER_SHARE) * seconds / images
        why = (f"at {t_rate:,.0f} images/s a {n_params / 1e6:.1f}M-parameter teacher would train {epochs:.1f} "
               f"epochs in {TEACHER_SHARE:.0%} of the {seconds:.0f} s final phase (needs {TEACHER_MIN_EPOCHS:g}) "
               f"and the student {student_epochs:.1f} in the rest (needs {need_student:.1f})")
        return epochs >= TEACHER_MIN_EPOCHS and student_epochs >= need_student, epochs, student_epochs, why

    candidates = [(m, count_params(m, shape)) for m in teachers or TEACHERS]
    candidates = [(m, n) for m, n in candidates if n >= TEACHER_MIN_SIZE * s_params]
    if not candidates:
        return f"no candidate net has {TEACHER_MIN_SIZE:g}x the student's {s_params:,} parameters"
    fits, _, _, why = verdict(rate, candidates[-1][1])  # the smallest candidate, at the student's own speed
    if not fits:
        return why + " even at the student's own speed"
    for model, n_params in candidates:
        t_rate = measure(model)
        if not t_rate:
            why = f"the {n_params / 1e6:.1f}M-parameter teacher finished no step in its speed measurement"
            continue
        fits, epochs, student_epochs, why = verdict(t_rate, n_params)
        if fits:
            return TeacherPlan(model, TEACHER_SHARE * seconds, n_params, epochs, student_epochs)
    return why


def train_teacher(plan: TeacherPlan, student: RunConfig, data: DeviceData, *, device, precision: str,
                  stop, min_fit: float, save_to: Path | None = None) -> tuple[torch.nn.Module | None, str]:
    """Train ``plan``'s teacher on ``data`` (train+validation) with the student's augmentation, for
    ``plan.seconds``. Returns the frozen model, or None and why it is not used (too slow after all, stopped,
    or fitting its training images below ``min_fit``, the best trial's validation accuracy). A teacher that
    is used is also written to ``save_to``, so that a final phase resumed after an interruption reuses it
    (``reuse_teacher``) instead of paying for it twice."""
    cfg = RunConfig(model=plan.model, train=TEACHER_TRAIN, data=student.data, seed=student.seed)
    result = train_run(cfg, data, device=device, seconds=plan.seconds, precision=precision, stop=stop,
                       min_epochs=TEACHER_MIN_EPOCHS / 2, fit_images=EVAL_SUBSET)  # the estimate may be 2x off
    epochs = result.metrics.get("epoch", 0.0)
    if result.status != COMPLETE:
        return None, f"its run ended {result.status} ({result.reason})"
    fit = result.metrics.get("fit_acc", 0.0)
    if fit < min_fit:  # a teacher must fit its training images at least as well as the trial scored unseen
        return None, (f"after {epochs:.1f} epochs it fits {fit:.1%} of its training images, below the trial's "
                      f"{min_fit:.1%}")
    model = build_model(plan.model, data.info.shape)
    model.load_state_dict(result.state_dict)
    if save_to is not None:
        with contextlib.suppress(OSError):  # only a resume would miss it: it trains a teacher again
            save_checkpoint(save_to, cfg, result.state_dict, metrics={"fit_acc": fit, "epoch": epochs},
                            n_params=plan.n_params, flops=count_flops(plan.model, data.info.shape),
                            classes=data.classes, train_seconds=result.seconds, precision=result.precision,
                            info=data.info, extra={"phase": "teacher"})
    return frozen(model, device), (
        f"{plan.n_params:,} params, {epochs:.1f} epochs in {result.seconds:.0f} s, fits {fit:.1%} of its "
        f"training images")


def frozen(model: torch.nn.Module, device) -> torch.nn.Module:
    return model.to(device).eval().requires_grad_(False)


def reuse_teacher(path: str | None, dataset: str, data: DeviceData, device) -> tuple[torch.nn.Module | None, str]:
    """The teacher an interrupted final phase of this study trained and wrote to ``path`` (study attr
    ``teacher_checkpoint``), for the resumed phase; None (and why) when there is none or it does not load."""
    if not path:
        return None, "no teacher was written before"
    try:
        model = load_teacher(path, dataset, data.info.shape, device)
    except CheckpointError as e:
        return None, str(e)
    n_params = sum(p.numel() for p in model.parameters())
    return frozen(model, device), f"teacher: the one trained before the interruption ({n_params:,} params, {path})"


def auto_teacher(best: optuna.trial.FrozenTrial, student: RunConfig, data: DeviceData, *, left: Callable[[], float],
                 device, precision: str, stop: Callable[[], bool], message: Callable[[str], None],
                 save_to: Path | None = None) -> tuple[torch.nn.Module | None, str]:
    """``--teacher auto`` in a final phase with ``left()`` seconds to go: plan (``plan_teacher``, measuring
    candidates for ``TEACHER_PROBE_S``), train the teacher for ``TEACHER_SHARE`` of what is then left (and
    write it to ``save_to``), and return it (or None) with one line on what happened, which is also printed
    through ``message``."""
    lo, hi, share = TEACHER_PROBE_S
    probe_s = clamp(share * left(), lo, hi)

    def measure(model: ModelConfig) -> float | None:
        return measure_rate(RunConfig(model=model, train=TEACHER_TRAIN, data=student.data), data, device=device,
                            seconds=probe_s, precision=precision, stop=stop)

    plan = plan_teacher(best, left(), len(data.train), data.info.shape, measure)
    if isinstance(plan, str):
        note = f"no teacher: {plan}"
        message(f"--teacher auto: {note}")
        return None, note
    plan.seconds = TEACHER_SHARE * left()  # what is left after the speed measurements
    message(f"--teacher auto: training a {plan.n_params:,}-parameter teacher for {plan.seconds:.0f} s "
            f"(about {plan.epochs:.0f} epochs), then the student")
    teacher, note = train_teacher(plan, student, data, device=device, precision=precision, stop=stop,
                                  min_fit=best.value, save_to=save_to)
    note = f"teacher: {note}" if teacher is not None else f"teacher not used: {note}"
    message(f"--teacher auto: {note}")
    return teacher, note
