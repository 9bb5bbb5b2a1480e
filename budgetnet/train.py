"""One training run: a config, device-resident data and a budget (seconds or epochs) in; a result out.

The lr follows progress p in [0, 1], the elapsed share of a time slice: a run of any speed ends annealed
when its slice ends. At ``eval_points`` marks it calls ``hook(progress, metrics)``; a truthy return stops
it. No optuna nor ray here: the search adapts hooks to its tuner.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from budgetnet.budget import BudgetExceeded, check_memory
from budgetnet.compile import AutoCompile, compile_failure, compile_plan, fresh_compile
from budgetnet.config import EVAL_SUBSET, TTA_VIEWS, RunConfig
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
from budgetnet.finetune import Freezer
from budgetnet.models import build_model
from budgetnet.recipe import EMA, lr_factor, make_optimizer, training_loss
from budgetnet.score import evaluate_model
from budgetnet.speedcheck import SpeedCheck

Hook = Callable[[float, dict], bool]

COMPLETE, STOPPED, DIVERGED, OOM, TOO_SLOW = "complete", "stopped", "diverged", "oom", "too_slow"
SYNC_EVERY = 8  # steps between host syncs (divergence check, stop poll); bounds how far the CPU runs ahead


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
    speed_recheck: dict = field(default_factory=dict)  # a too-slow verdict re-checked: both rates (img/s)
    carry: Carry | None = None  # a stopped run of train_run(keep=True), to go on with resume=


def train_run(cfg: RunConfig, data: DeviceData, *, device: torch.device | str, seconds: float | None = None,
              epochs: float | None = None, hook: Hook | None = None,
              stop: Callable[[], bool] | None = None, min_epochs: float | None = None,
              precision: str = "auto", teacher: nn.Module | None = None, compile: bool | str = False,
              init_state: dict | None = None, fit_images: int = 0, autotune: bool = True, keep: bool = False,
              resume: Carry | None = None, mirror: bool = False) -> RunResult:
    """Train ``cfg`` on ``data.train`` for ``seconds`` of wall time or ``epochs`` epochs.

    ``hook(progress, metrics)`` is called at each evaluation mark; returning True stops the run.
    ``stop()`` is polled every few steps (a deadline, Ctrl-C); True stops the run at once.
    ``min_epochs`` (time slices only; ``speedcheck.py``): from 5% of the slice, the run projects its rate
    over the slice; if that covers fewer epochs, the verdict is re-checked from 10% over the steps since,
    and the run ends ``too_slow`` only if those fall short too (not worth evaluating, nor the rest of its
    slice; ``RunResult.speed_recheck`` keeps both rates). It judges the rate after step 1 (set-up) once it
    has two steps; a first evaluation due before step 2 has it judge step 1 alone on the CPU, never on
    CUDA (docs/benchmarks.md, "GPU").
    ``precision`` is "auto" (the device's best, ``budgetnet.device.resolve_precision``), fp32, bf16 or fp16.
    ``teacher`` (with ``cfg.train.distill > 0``, and only then): a trained model of the same classes whose
    outputs on each augmented batch the student also learns from (``training_loss``). It is frozen, and
    its forward passes run inside this run's time, so a time slice pays for them.
    ``compile``: "on" (or True) trains through ``torch.compile(model)``, compiled in step 1 inside the run's
    time (``first_step_s``, out of its rate); "auto" only in a long run, kept only if measured faster
    (``compile.AutoCompile``); "off" (or False) never. A failed compilation trains eager (``RunResult.compile``
    says so). Evaluation runs uncompiled, so train/eval mode and batch shapes never recompile.
    ``init_state``: start from these weights (a state dict of the model ``cfg`` builds), as fine-tuning
    does; ``cfg.train.freeze`` and ``backbone_lr_scale`` then apply (``budgetnet.finetune``).
    ``fit_images``: with no validation split, the last mark scores the model on a seeded sample of this many
    training images, unaugmented (``fit_acc``, ``fit_loss``), in the run's time: did it learn what it saw.
    ``autotune`` (CUDA): cuDNN times its algorithms for each new shape (``device.prepare``). Search trials
    and speed probes, short runs of a model not seen before, turn it off.
    ``keep``: a stopped run returns its ``carry``; ``resume=carry`` goes on with it over ``data``, its lr schedule
    now over ``seconds`` in all, counted from the carried run's start: nothing is trained twice (the race).
    ``mirror``: the last mark also scores the flip average on the validation split (``score.evaluate_model``;
    ``val_acc_flip``, ``flip_fixed``, ``flip_broke``), in the run's time; only for a config trained with flips.
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
        if resume is not None:
            run, s = _resume(resume, cfg, data, seconds, hook, stop, fit_images)
        else:
            run, s = _start(cfg, data, device, seconds=seconds, epochs=epochs, hook=hook, stop=stop,
                            min_epochs=min_epochs, precision=precision, teacher=teacher, compile=compile,
                            init_state=init_state, fit_images=fit_images, autotune=autotune)
        run.mirror = mirror and cfg.data.flip  # a net trained without mirrored images has never seen one
        return _train(run, s, keep)
    except (torch.OutOfMemoryError, RuntimeError) as e:  # the CPU allocator's is a plain RuntimeError
        if not is_oom(e):
            raise
        reason = first_line(e, 200)
    # Outside the except blocks the traceback (and every tensor its frames held) is released.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return RunResult(OOM, reason=f"out of memory: {reason}")


@dataclass
class _Run:
    """What a run trains with, built once before its loop (``_start``)."""

    cfg: RunConfig
    data: DeviceData
    device: torch.device
    seconds: float | None
    total_steps: int | None  # set by an epoch budget
    hook: Hook | None
    stop: Callable[[], bool] | None
    min_epochs: float | None
    precision: str
    fit_images: int
    model: nn.Module
    ema: EMA | None
    teacher: nn.Module | None
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    normalize: Callable
    batch: Callable
    gen: torch.Generator  # batch order and augmentation
    n: int
    bs: int
    steps_per_epoch: int
    marks: list[float]
    auto: AutoCompile | None
    compile_info: dict  # RunResult.compile, updated as the run goes
    freezer: Freezer | None  # a run from init_state: which groups train at each progress
    mirror: bool = False  # the last mark scores the flip average too (train_run's)


@dataclass
class _State:
    """A run's counters and clocks, advanced by the loop's stages."""

    t0: float  # the run's start: a slice covers set-up too
    step_model: nn.Module  # what steps train through: compiled, or the model itself
    loss_sum: torch.Tensor  # training loss since the last evaluation, summed on the device
    speed: SpeedCheck | None  # a time slice with min_epochs: its speed check
    loss_count: int = 0
    train_time: float = 0.0  # seconds in training steps, evaluations excluded
    step: int = 0
    images: int = 0
    eval_reserve: float = 0.0  # seconds the last evaluation took: the slice keeps room for the final one
    first_step_s: float = 0.0  # training time of step 1 (one-off kernel selection)
    setup_s: float = 0.0  # step 1's time, and that of a step that compiled: set-up, not the model's speed
    setup_images: int = 0
    history: list[dict] = field(default_factory=list)
    status: str = COMPLETE
    reason: str = ""
    done: bool = False

    def end(self, status: str, reason: str) -> None:
        self.status, self.reason, self.done = status, reason, True

    def steady_rate(self) -> float:
        """Training images/s; from step 2 on, without step 1 (kernel selection) or a step that compiled."""
        if self.step >= 2:
            return (self.images - self.setup_images) / max(self.train_time - self.setup_s, 1e-9)
        return self.images / max(self.train_time, 1e-9)


def _start(cfg: RunConfig, data: DeviceData, device: torch.device, *, seconds: float | None,
           epochs: float | None, hook: Hook | None, stop: Callable[[], bool] | None, min_epochs: float | None,
           precision: str, teacher: nn.Module | None, compile: bool | str, init_state: dict | None,
           fit_images: int, autotune: bool) -> tuple[_Run, _State]:
    """Builds the model, its optimizer and its batches, seeded by ``cfg.seed``; the clock starts first."""
    t0 = time.perf_counter()
    prepare(device, autotune)
    torch.manual_seed(cfg.seed)  # weight init
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    fmt = memory_format(device)
    model = build_model(cfg.model, data.info.shape).to(device, memory_format=fmt)
    if init_state is not None:
        model.load_state_dict(init_state)
    freezer = Freezer(model, cfg.model, cfg.train) if init_state is not None else None
    mode, compile_info = compile_plan(compile, seconds)
    step_model = fresh_compile(model) if mode == "on" else model  # shares model's parameters
    ema = EMA(model, cfg.train.ema) if cfg.train.ema else None
    if teacher is not None:
        teacher = teacher.to(device, memory_format=fmt).eval().requires_grad_(False)
    opt = make_optimizer(model, cfg.train, head=freezer.head_params() if freezer else None)
    scaler = grad_scaler(device, precision)
    normalize = normalizer(data.info, device, fmt)
    batch = train_batches(data.train, cfg.data, normalize)
    n = len(data.train)
    bs = min(cfg.train.batch_size, n)
    steps_per_epoch = n // bs  # drop the last partial batch: one compiled shape, unbiased BN statistics
    total_steps = max(1, round(epochs * steps_per_epoch)) if epochs is not None else None
    auto = AutoCompile(bs, device) if mode == "auto" else None
    run = _Run(cfg, data, device, seconds, total_steps, hook, stop, min_epochs, precision, fit_images, model, ema,
               teacher, opt, scaler, normalize, batch, gen, n, bs, steps_per_epoch,
               marks=[(k + 1) / cfg.train.eval_points for k in range(cfg.train.eval_points)], auto=auto,
               compile_info=auto.info if auto is not None else compile_info, freezer=freezer)
    speed = SpeedCheck(seconds, n, min_epochs) if seconds is not None and min_epochs else None
    return run, _State(t0, step_model, torch.zeros((), device=device), speed)


def _resume(carry: Carry, cfg: RunConfig, data: DeviceData, seconds: float | None, hook: Hook | None,
            stop: Callable[[], bool] | None, fit_images: int) -> tuple[_Run, _State]:
    """``carry``'s run going on over ``data`` until ``seconds`` from its start: same weights, optimizer state,
    EMA and generator; batches, evaluations and the clock anew, the clock set back by the seconds it ran."""
    if seconds is None or cfg != carry.run.cfg:
        raise ValueError("a resumed run goes on with its own config, on a time budget")
    run, old = carry.run, carry.state
    normalize = normalizer(data.info, run.device, memory_format(run.device))
    n, bs = len(data.train), min(cfg.train.batch_size, len(data.train))
    run = dataclasses.replace(run, data=data, seconds=seconds, hook=hook, stop=stop, min_epochs=None,
                              fit_images=fit_images, normalize=normalize, n=n, bs=bs, steps_per_epoch=n // bs,
                              batch=train_batches(data.train, cfg.data, normalize))
    return run, dataclasses.replace(old, t0=time.perf_counter() - carry.seconds, speed=None, history=[],
                                    loss_sum=torch.zeros((), device=run.device), loss_count=0, eval_reserve=0.0,
                                    status=COMPLETE, reason="", done=False)


def _train(run: _Run, s: _State, keep: bool = False) -> RunResult:
    """The loop: each step checks the speed, evaluates at marks, polls stop, trains and keeps the time."""
    run.model.train()
    while not s.done:
        perm = torch.randperm(run.n, device=run.device, generator=run.gen)
        for b in range(run.steps_per_epoch):
            p = _progress(run, s)
            # a slice that cannot cover min_epochs ends early
            if _too_slow(run, s, p):
                break
            # evaluate at every mark reached, unless a speed verdict awaits its re-check; the last ends the run
            if p >= run.marks[len(s.history)] and not (s.speed is not None and s.speed.verdict is not None):
                _evaluate(run, s, p)
                if s.done:
                    break
                p = _progress(run, s)
            # a deadline or Ctrl-C stops at once
            if run.stop is not None and run.stop():
                s.end(STOPPED, "stop requested")
                break
            # fine-tuning: unfreeze on schedule; frozen groups back in eval mode after an evaluation
            _unfreeze(run, p)
            # train one batch at the schedule's lr
            ts = time.perf_counter()
            loss = _step(run, s, perm[b * run.bs:(b + 1) * run.bs], p)
            if loss is None:  # the compiled step failed: this batch is skipped, the rest train eager
                continue
            # every few steps, a host sync checks the loss
            if s.step % SYNC_EVERY == 0 and not math.isfinite(loss.item()):
                s.end(DIVERGED, f"non-finite loss at step {s.step}")
                break
            # keep the step's time; step 1 and compiling are set-up
            _account_time(run, s, ts)
            # "auto" times its windows and may switch to compiled
            _auto_compile(run, s)
    return _result(run, s, keep)


def _progress(run: _Run, s: _State) -> float:
    """Steps done of an epoch budget, or the slice's elapsed share, less the room kept for evaluation."""
    if run.total_steps is not None:
        return s.step / run.total_steps
    return (time.perf_counter() - s.t0) / max(run.seconds - s.eval_reserve, 1e-3)


def _unfreeze(run: _Run, p: float) -> None:
    """Sets which groups train at progress ``p`` (``Freezer.at``); nothing for a run from scratch."""
    if run.freezer is not None:
        run.freezer.at(p)


def _wait_for_device(run: _Run, s: _State) -> None:
    """Wait for queued steps, counting the wait as training time."""
    t = time.perf_counter()
    synchronize(run.device)
    s.train_time += time.perf_counter() - t


def _too_slow(run: _Run, s: _State, p: float) -> bool:
    """The run's speed check (``speedcheck.SpeedCheck``) at progress ``p``: True once it ends the run."""
    # where step 1 is speed, not set-up, it judges alone if an evaluation comes before step 2
    first_alone = s.step == 1 and p >= run.marks[0] and not first_step_is_setup(run.device)
    if s.speed is None or not s.speed.wants(p, s.step, first_alone, eval_due=p >= run.marks[len(s.history)]):
        return False
    # On CUDA, launched steps may still be queued: judge the device, not the host.
    _wait_for_device(run, s)
    reason = s.speed.judge(s.step, s.images, s.train_time, s.steady_rate())
    if reason is None:
        return False
    s.end(TOO_SLOW, reason)
    return True


def _step(run: _Run, s: _State, idx: torch.Tensor, p: float) -> torch.Tensor | None:
    """One optimizer step on the batch ``idx`` at progress ``p``'s lr; its loss (None: compiling failed)."""
    tc = run.cfg.train
    for group in run.opt.param_groups:
        group["lr"] = tc.lr * lr_factor(tc, p) * group["lr_scale"]
    x, y = run.batch(idx, run.gen)
    try:
        with autocast(run.device, run.precision):
            soft = None
            if run.teacher is not None:
                with torch.no_grad():
                    soft = run.teacher(x)
            loss = training_loss(s.step_model(x), y, tc, soft)
        optimizer_step(loss, run.opt, run.scaler)
    except Exception as e:  # noqa: BLE001 - a compiler's failure of any kind: train on eager
        if s.step_model is run.model or is_oom(e):
            raise
        s.step_model = run.model
        run.compile_info.update(compiled=False, reason=compile_failure(e))
        if run.auto is not None:
            run.auto.state = "done"
        run.opt.zero_grad(set_to_none=True)
        return None
    if run.ema is not None:
        run.ema.update(run.model)
    s.loss_sum += loss.detach().float()
    s.loss_count += 1
    s.step += 1
    s.images += run.bs
    return loss


def _account_time(run: _Run, s: _State, ts: float) -> None:
    """Adds the step begun at ``ts`` to training time; step 1 and a compiling step count as set-up."""
    # On CUDA set-up runs after launch: wait, so later rates exclude it.
    if s.step == 1 or (run.auto is not None and run.auto.syncs(s.step)):
        synchronize(run.device)
    compiling = run.auto is not None and run.auto.state == "compiling"
    step_s = time.perf_counter() - ts
    s.train_time += step_s
    if s.step == 1 or compiling:
        s.setup_s, s.setup_images = s.setup_s + step_s, s.setup_images + run.bs
    if s.step == 1:
        s.first_step_s = s.train_time
        if s.step_model is not run.model:  # "on" compiled in step 1, and did not fail
            run.compile_info["compile_s"] = round(step_s, 2)


def _auto_compile(run: _Run, s: _State) -> None:
    """Lets ``compile="auto"`` time its windows and switch the module the next steps train through."""
    if run.auto is None or run.auto.state == "done":
        return
    left = (run.seconds - (time.perf_counter() - s.t0) if run.total_steps is None
            else (run.total_steps - s.step) * run.bs / max(s.steady_rate(), 1e-9))
    switch = run.auto.after_step(s.step, s.train_time, left, run.model)
    if switch is not None:
        s.step_model = switch


def _evaluate(run: _Run, s: _State, p: float) -> None:
    """Evaluate once, record it at every mark ``p`` reached and call the hook; may end the run."""
    te = time.perf_counter()
    if run.device.type == "cuda":  # queued training steps belong to training time, not to evaluation
        _wait_for_device(run, s)
        te = time.perf_counter()
    metrics = {"steps": s.step, "epoch": s.images / run.n, "train_loss": s.loss_sum.item() / max(s.loss_count, 1)}
    s.loss_sum, s.loss_count = torch.zeros((), device=run.device), 0
    final = p >= run.marks[-1]
    metrics.update(_score(run, final))
    s.eval_reserve = time.perf_counter() - te
    if run.data.val is not None and not final:  # the final evaluation scores more images: keep room for it
        s.eval_reserve *= len(run.data.val) / max(metrics["val_images"], 1) * TTA_VIEWS["flip" if run.mirror else "none"]
    elif run.data.val is None and not final and run.fit_images:  # room for the fit check: scoring an image
        s.eval_reserve = min(run.fit_images, run.n) / max(s.steady_rate(), 1.0)  # costs less than training on it
    metrics["seconds"] = time.perf_counter() - s.t0
    metrics["images_per_s"] = s.steady_rate()
    if not all(math.isfinite(metrics.get(k, 0.0)) for k in ("train_loss", "val_loss")):
        s.history.append({"progress": run.marks[len(s.history)], **metrics})
        return s.end(DIVERGED, "non-finite loss")
    while len(s.history) < len(run.marks) and p >= run.marks[len(s.history)]:
        # Report the mark itself, not the measured progress: every run shares one step axis.
        s.history.append({"progress": run.marks[len(s.history)], **metrics})
        if run.hook is not None and run.hook(s.history[-1]["progress"], s.history[-1]):
            return s.end(STOPPED, "stopped by hook")
    s.done = len(s.history) == len(run.marks)


def _score(run: _Run, final: bool) -> dict:
    """Validation metrics, or with no validation split the final fit check on training images."""
    data, model = run.data, run.ema.module if run.ema is not None else run.model
    if data.val is not None:
        # Until the last mark, the split's head (a random sample): full evaluations would eat a slice.
        val = data.val if final else ImageSet(data.val.images[:EVAL_SUBSET], data.val.labels[:EVAL_SUBSET])
        return {**evaluate_model(model, val, run.normalize, run.device, precision=run.precision,
                                 mirror=final and run.mirror), "val_images": len(val)}
    if final and run.fit_images:  # no validation split: how well the model fits what it trained on
        pick = torch.randperm(run.n, generator=torch.Generator().manual_seed(run.cfg.seed))[:run.fit_images]
        pick = pick.to(run.device)
        fit = evaluate_model(model, ImageSet(data.train.images[pick], data.train.labels[pick]), run.normalize,
                             run.device, precision=run.precision)
        return {"fit_acc": fit["val_acc"], "fit_loss": fit["val_loss"], "fit_images": len(pick)}
    return {}


def _result(run: _Run, s: _State, keep: bool = False) -> RunResult:
    """The run's result; its final weights (the EMA's if on) unless it diverged or was too slow."""
    final = run.ema.module if run.ema is not None else run.model
    state = None if s.status in (DIVERGED, TOO_SLOW) else {
        k: v.detach().to("cpu", copy=True).contiguous() for k, v in final.state_dict().items()}
    return RunResult(status=s.status, reason=s.reason, metrics=s.history[-1] if s.history else {},
                     history=s.history, seconds=time.perf_counter() - s.t0, steps=s.step,
                     images_per_s=s.steady_rate(), first_step_s=s.first_step_s, state_dict=state,
                     precision=run.precision, compile=dict(run.compile_info),
                     speed_recheck=s.speed.recheck if s.speed is not None else {},
                     carry=Carry(run, s, time.perf_counter() - s.t0) if keep and s.status == STOPPED else None)


@dataclass
class Carry:
    """A stopped run kept to go on (``train_run(keep=True)``, then ``resume=``)."""

    run: _Run
    state: _State
    seconds: float  # how long it had run, set-up included

    def score(self, images: ImageSet) -> dict:
        """``val_loss`` and ``val_acc`` on ``images`` of the weights it would deploy now (the EMA's when on)."""
        model = self.run.ema.module if self.run.ema is not None else self.run.model
        return evaluate_model(model, images, self.run.normalize, self.run.device, precision=self.run.precision)

