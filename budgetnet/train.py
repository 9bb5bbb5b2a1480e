"""One training run: a config, device-resident data and a budget (seconds or epochs) in; a result out.

The learning-rate schedule is a function of progress p in [0, 1]. With a time slice, p is the elapsed
fraction of the slice, so whatever the model's speed the run ends fully annealed exactly when its slice
ends. The run evaluates on validation at ``eval_points`` equal progress marks and calls
``hook(progress, metrics)`` there; a truthy return stops the run. This module imports neither optuna
nor ray: the search adapts hooks to its tuner.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from budgetnet.budget import BudgetExceeded, check_memory
from budgetnet.compile import AutoCompile, compile_failure, compile_plan, fresh_compile
from budgetnet.config import RunConfig
from budgetnet.data import DeviceData, ImageSet, normalizer, train_batches
from budgetnet.device import (
    autocast,
    first_step_is_setup,
    grad_scaler,
    is_oom,
    memory_format,
    optimizer_step,
    prepare,
    resolve_precision,
    synchronize,
)
from budgetnet.errors import first_line
from budgetnet.models import build_model
from budgetnet.recipe import EMA, lr_factor, make_optimizer, training_loss

Hook = Callable[[float, dict], bool]

COMPLETE, STOPPED, DIVERGED, OOM, TOO_SLOW = "complete", "stopped", "diverged", "oom", "too_slow"
EVAL_SUBSET = 2000  # validation images scored at intermediate marks (all of them at the last mark)
SYNC_EVERY = 8  # steps between host syncs (divergence check, stop poll); bounds how far the CPU runs ahead
SPEED_CHECK_AT = 0.05  # progress from which a time-sliced run with ``min_epochs`` checks its own speed


@dataclass
class RunResult:
    """What a run produced. ``status`` is one of complete, stopped, diverged, oom, too_slow."""

    status: str
    reason: str = ""
    metrics: dict = field(default_factory=dict)  # last evaluation (val_acc, val_loss, train_loss, ...)
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    seconds: float = 0.0  # wall time of the whole run, evaluations included
    steps: int = 0
    images_per_s: float = 0.0  # training throughput after step 1 (one-off kernel set-up), evaluations excluded
    first_step_s: float = 0.0  # wall time of step 1: kernel selection, and compilation when compiled
    state_dict: dict | None = None  # final weights (the EMA weights when EMA is on), on the CPU
    precision: str = "fp32"  # what the run trained in: fp32, bf16 or fp16 (autocast)
    compile: dict = field(default_factory=dict)  # mode, compiled, and (auto) compile_s, both rates, reason


@torch.no_grad()
def evaluate_model(model: nn.Module, data: ImageSet, normalize, device: torch.device,
                   batch_size: int = 1024, precision: str = "fp32") -> dict:
    """Loss and top-1 accuracy of ``model`` on a device-resident split (eval mode, ``precision`` autocast).

    Without cuDNN's autotuning, whatever the run set: an evaluation's batch shapes (1024, a split's
    remainder) are new to a run, and timing algorithms for them would cost seconds that no slice or
    budget reserves for the last evaluation."""
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


def train_run(cfg: RunConfig, data: DeviceData, *, device: torch.device | str, seconds: float | None = None,
              epochs: float | None = None, hook: Hook | None = None,
              stop: Callable[[], bool] | None = None, min_epochs: float | None = None,
              precision: str = "auto", teacher: nn.Module | None = None, compile: bool | str = False,
              init_state: dict | None = None, fit_images: int = 0, autotune: bool = True) -> RunResult:
    """Train ``cfg`` on ``data.train`` for ``seconds`` of wall time or ``epochs`` epochs.

    ``hook(progress, metrics)`` is called at each evaluation mark; returning True stops the run.
    ``stop()`` is polled every few steps (a deadline, Ctrl-C); True stops the run at once.
    ``min_epochs`` (time slices only): from ``SPEED_CHECK_AT`` of the slice, the run projects its training
    rate over the slice and ends ``too_slow`` if that covers fewer epochs. It judges the rate after the
    first step (which pays one-off kernel set-up) once it has two steps. On the CPU, where a first step
    costs about what the next ones do, it judges the first step's own rate when the first evaluation is due
    before a second step; on CUDA never (the first step loads and selects kernels: 1.6-13 s on an H100,
    which judged as the model's speed ended good trials at 13-338 img/s). A model that cannot see its
    data in the time it has is not worth evaluating, nor the rest of its slice.
    ``precision`` is "auto" (the device's best, ``budgetnet.device.resolve_precision``), fp32, bf16 or fp16.
    ``teacher`` (with ``cfg.train.distill > 0``, and only then): a trained model of the same classes whose
    outputs on each augmented batch the student also learns from (``training_loss``). It is frozen, and
    its forward passes run inside this run's time, so a time slice pays for them.
    ``compile``: "on" (or True) trains through ``torch.compile(model)``. Compilation happens in step 1,
    inside the run's time (a time slice pays for it, and ``first_step_s`` says what it cost); the rate is
    measured after it. "auto" compiles after timing some eager steps, only in a long run, and keeps the
    compiled model only if it measures faster (``AutoCompile``); "off" (or False) never compiles. A
    compilation that fails leaves the run on eager, with the reason. ``RunResult.compile`` says what
    happened. Evaluation runs the same weights uncompiled, so train/eval mode and batch shapes never
    recompile.
    ``init_state``: start from these weights (a state dict of the model ``cfg`` builds) instead of a fresh
    initialisation, as fine-tuning a pruned model does.
    ``fit_images``: with no validation split (train+validation), the last mark scores the model on a seeded
    sample of this many training images, unaugmented (``fit_acc``, ``fit_loss``), inside the run's time:
    a check that the run learned what it was shown, where no held-out image is left to tell.
    ``autotune`` (CUDA): cuDNN times its algorithms for each new shape (``device.prepare``). Search trials
    and speed probes, short runs of a model not seen before, turn it off.
    Divergence and out-of-memory end the run with a typed status instead of an exception.
    """
    if (seconds is None) == (epochs is None):
        raise ValueError("give exactly one of seconds or epochs")
    if (teacher is None) != (cfg.train.distill == 0):
        raise ValueError("a teacher and train.distill > 0 go together")
    budget = seconds if seconds is not None else epochs
    if not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"a run needs a positive, finite budget, got {'seconds' if seconds is not None else 'epochs'}"
                         f"={budget}")
    device = torch.device(device)
    precision = resolve_precision(device, precision)
    try:  # a model whose weights and optimizer state alone cannot fit is refused before any allocation
        check_memory(cfg.model, cfg.train, data.info.shape, device)
    except BudgetExceeded as e:
        return RunResult(OOM, reason=f"out of memory: {e}")
    try:
        return _train(cfg, data, device, seconds, epochs, hook, stop, min_epochs, precision, teacher, compile,
                      init_state, fit_images, autotune)
    except (torch.OutOfMemoryError, RuntimeError) as e:  # the CPU allocator's is a plain RuntimeError
        if not is_oom(e):
            raise
        reason = first_line(e, 200)
    # Outside the except blocks the traceback (and every tensor its frames held) is released.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return RunResult(OOM, reason=f"out of memory: {reason}")


def measure_rate(cfg: RunConfig, data: DeviceData, *, device, seconds: float, precision: str = "auto",
                 stop: Callable[[], bool] | None = None) -> float | None:
    """Training images/s of ``cfg`` on this device (after its first step), measured by training it for at
    most ``seconds`` of wall time, set-up included, with no evaluation and, as search trials train, without
    cuDNN's autotuning. None if it finished no step, or on CUDA only its first (set-up, not speed)."""
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, eval_points=1))
    result = train_run(cfg, DeviceData(data.info, data.classes, data.train, None), device=device, seconds=seconds,
                       stop=stop, precision=precision, autotune=False)
    # Where step 1 is set-up (CUDA), a run of one step has no rate of its own: its figure would be set-up.
    min_steps = 2 if first_step_is_setup(torch.device(device)) else 1
    if result.status not in (COMPLETE, STOPPED) or result.steps < min_steps or not result.images_per_s > 0:
        return None
    return result.images_per_s


def _train(cfg: RunConfig, data: DeviceData, device: torch.device, seconds: float | None,
           epochs: float | None, hook: Hook | None, stop: Callable[[], bool] | None,
           min_epochs: float | None, precision: str, teacher: nn.Module | None, compile: bool | str,
           init_state: dict | None, fit_images: int, autotune: bool) -> RunResult:
    t0 = time.perf_counter()  # the slice covers setup too (the first optimizer build in a process takes ~2 s)
    tc = cfg.train
    prepare(device, autotune)
    torch.manual_seed(cfg.seed)  # weight init
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # batch order and augmentation
    fmt = memory_format(device)
    model = build_model(cfg.model, data.info.shape).to(device, memory_format=fmt)
    if init_state is not None:
        model.load_state_dict(init_state)
    mode, compile_info = compile_plan(compile, seconds)
    step_model = fresh_compile(model) if mode == "on" else model  # shares model's parameters
    ema = EMA(model, tc.ema) if tc.ema else None
    if teacher is not None:
        teacher = teacher.to(device, memory_format=fmt).eval().requires_grad_(False)
    opt = make_optimizer(model, tc)
    scaler = grad_scaler(device, precision)
    normalize = normalizer(data.info, device, fmt)
    train = data.train
    batch = train_batches(train, cfg.data, normalize)
    n = len(train)
    bs = min(tc.batch_size, n)
    steps_per_epoch = n // bs  # drop the last partial batch: one compiled shape, unbiased BN statistics
    total_steps = max(1, round(epochs * steps_per_epoch)) if epochs is not None else None
    auto = AutoCompile(bs, device) if mode == "auto" else None
    compile_info = auto.info if auto is not None else compile_info

    history: list[dict] = []
    marks = [(k + 1) / tc.eval_points for k in range(tc.eval_points)]
    eval_reserve = 0.0  # seconds the last evaluation took: the slice keeps room for the final one
    train_time = 0.0
    step = images = 0
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    status, reason = COMPLETE, ""
    speed_check = seconds is not None and bool(min_epochs)
    first_step_s = 0.0  # training time of step 1 (one-off kernel selection), left out of the speed check
    setup_s = 0.0  # step 1's time, and that of a step that compiled: set-up, not the model's speed
    setup_images = 0
    first_is_speed = not first_step_is_setup(device)  # whether step 1 alone may judge the speed

    def steady_rate() -> float:
        """Images per second of training after step 1 (its one-off kernel selection is not the speed), and
        without the step that compiled, if one did."""
        if step >= 2:
            return (images - setup_images) / max(train_time - setup_s, 1e-9)
        return images / max(train_time, 1e-9)

    def progress() -> float:
        if total_steps is not None:
            return step / total_steps
        return (time.perf_counter() - t0) / max(seconds - eval_reserve, 1e-3)

    def run_eval(p: float) -> str | None:
        """Evaluate once and record it for every mark reached; returns a final status or None."""
        nonlocal eval_reserve, loss_sum, loss_count, train_time
        te = time.perf_counter()
        if device.type == "cuda":  # queued training steps belong to training time, not to evaluation
            synchronize(device)
            train_time += time.perf_counter() - te
            te = time.perf_counter()
        metrics = {"steps": step, "epoch": images / n, "train_loss": loss_sum.item() / max(loss_count, 1)}
        loss_sum, loss_count = torch.zeros((), device=device), 0
        final = p >= marks[-1]
        val = data.val
        if val is not None:
            # Intermediate marks score a fixed subset (the split is random, so its head is a random
            # sample): on slow devices full evaluations would eat the slice. The last mark scores all.
            val = data.val if final else ImageSet(data.val.images[:EVAL_SUBSET], data.val.labels[:EVAL_SUBSET])
            metrics.update(evaluate_model(ema.module if ema is not None else model, val, normalize, device,
                                          precision=precision))
            metrics["val_images"] = len(val)
        elif final and fit_images:  # no validation split: how well the model fits what it trained on
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:fit_images].to(device)
            fit = evaluate_model(ema.module if ema is not None else model,
                                 ImageSet(train.images[pick], train.labels[pick]), normalize, device,
                                 precision=precision)
            metrics.update(fit_acc=fit["val_acc"], fit_loss=fit["val_loss"], fit_images=len(pick))
        eval_reserve = time.perf_counter() - te
        if val is not None and not final:  # the final evaluation scores more images: keep room for it
            eval_reserve *= len(data.val) / max(len(val), 1)
        elif val is None and not final and fit_images:  # room for the fit check: scoring an image costs
            eval_reserve = min(fit_images, n) / max(steady_rate(), 1.0)  # less than training on it
        metrics["seconds"] = time.perf_counter() - t0
        metrics["images_per_s"] = steady_rate()
        if not all(math.isfinite(metrics.get(k, 0.0)) for k in ("train_loss", "val_loss")):
            history.append({"progress": marks[len(history)], **metrics})
            return DIVERGED
        while len(history) < len(marks) and p >= marks[len(history)]:
            # Report the mark itself, not the measured progress: every run shares one step axis.
            history.append({"progress": marks[len(history)], **metrics})
            if hook is not None and hook(history[-1]["progress"], history[-1]):
                return STOPPED
        return None

    model.train()
    done = False
    while not done:
        perm = torch.randperm(n, device=device, generator=gen)
        for b in range(steps_per_epoch):
            p = progress()
            first_alone = step == 1 and p >= marks[0] and first_is_speed  # eval due before a step 2
            if speed_check and p >= SPEED_CHECK_AT and (step >= 2 or first_alone):
                speed_check = False
                # On CUDA the steps since step 1's sync may still be queued: their launch time alone would
                # judge how fast the host issues kernels, not how fast the device trains.
                tw = time.perf_counter()
                synchronize(device)
                train_time += time.perf_counter() - tw
                rate = steady_rate()
                projected = rate * seconds / n
                if projected < min_epochs:
                    status, done = TOO_SLOW, True
                    reason = (f"{projected:.2f} epochs projected in the {seconds:.0f} s slice at {rate:,.0f} "
                              f"img/s; needs {min_epochs:g}")
                    break
            if p >= marks[len(history)]:
                ended = run_eval(p)
                if ended is not None:
                    status = ended
                    reason = "non-finite loss" if ended == DIVERGED else "stopped by hook"
                if ended is not None or len(history) == len(marks):
                    done = True
                    break
                p = progress()
            if stop is not None and stop():
                status, reason, done = STOPPED, "stop requested", True
                break
            ts = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = tc.lr * lr_factor(tc, p)
            idx = perm[b * bs:(b + 1) * bs]
            x, y = batch(idx, gen)
            try:
                with autocast(device, precision):
                    soft = None
                    if teacher is not None:
                        with torch.no_grad():
                            soft = teacher(x)
                    loss = training_loss(step_model(x), y, tc, soft)
                optimizer_step(loss, opt, scaler)
            except Exception as e:  # noqa: BLE001 - a compiler's failure of any kind: train on eager
                if step_model is model or is_oom(e):
                    raise
                step_model = model
                compile_info.update(compiled=False, reason=compile_failure(e))
                if auto is not None:
                    auto.state = "done"
                opt.zero_grad(set_to_none=True)
                continue
            if ema is not None:
                ema.update(model)
            loss_sum += loss.detach().float()
            loss_count += 1
            step += 1
            images += bs
            if step % SYNC_EVERY == 0 and not math.isfinite(loss.item()):  # .item() syncs the device
                status, reason, done = DIVERGED, f"non-finite loss at step {step}", True
                break
            # On CUDA a step's kernel selection (or compilation) runs after its launch: the first step, and
            # the ends of auto-compile's timed windows, wait for the device, so that the rates after them (the
            # speed check, the probe, the compile decision) exclude it.
            if step == 1 or (auto is not None and auto.syncs(step)):
                synchronize(device)
            compiling = auto is not None and auto.state == "compiling"
            step_s = time.perf_counter() - ts
            train_time += step_s
            if step == 1 or compiling:
                setup_s, setup_images = setup_s + step_s, setup_images + bs
            if step == 1:
                first_step_s = train_time
                if mode == "on" and compile_info["compiled"]:  # not after a failed compilation
                    compile_info["compile_s"] = round(step_s, 2)
            if auto is not None and auto.state != "done":
                left = (seconds - (time.perf_counter() - t0) if total_steps is None
                        else (total_steps - step) * bs / max(steady_rate(), 1e-9))
                switch = auto.after_step(step, train_time, left, model)
                if switch is not None:
                    step_model = switch

    final = ema.module if ema is not None else model
    state = None
    if status not in (DIVERGED, TOO_SLOW):
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in final.state_dict().items()}
    return RunResult(
        status=status, reason=reason, metrics=history[-1] if history else {}, history=history,
        seconds=time.perf_counter() - t0, steps=step,
        images_per_s=steady_rate(), first_step_s=first_step_s, state_dict=state, precision=precision,
        compile=dict(compile_info),
    )
