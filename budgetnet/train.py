"""One training run: a config, device-resident data and a budget (seconds or epochs) in; a result out.

The learning-rate schedule is a function of progress p in [0, 1]. With a time slice, p is the elapsed
fraction of the slice, so whatever the model's speed the run ends fully annealed exactly when its slice
ends. The run evaluates on validation at ``eval_points`` equal progress marks and calls
``hook(progress, metrics)`` there; a truthy return stops the run. This module imports neither optuna
nor ray: the search adapts hooks to its tuner.
"""

from __future__ import annotations

import copy
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
from budgetnet.config import (
    COMPILE_AUTO_MIN_S,
    COMPILE_MODES,
    COMPILE_ON_MIN_S,
    RunConfig,
    TrainConfig,
)
from budgetnet.data import DeviceData, ImageSet, normalizer, train_batches
from budgetnet.device import (
    autocast,
    first_step_is_setup,
    grad_scaler,
    memory_format,
    optimizer_step,
    prepare,
    resolve_precision,
    synchronize,
)
from budgetnet.models import build_model

Hook = Callable[[float, dict], bool]

COMPLETE, STOPPED, DIVERGED, OOM, TOO_SLOW = "complete", "stopped", "diverged", "oom", "too_slow"
EVAL_SUBSET = 2000  # validation images scored at intermediate marks (all of them at the last mark)
SYNC_EVERY = 8  # steps between host syncs (divergence check, stop poll); bounds how far the CPU runs ahead
SPEED_CHECK_AT = 0.05  # progress from which a time-sliced run with ``min_epochs`` checks its own speed
# compile="auto" tries only on these devices (its thresholds, COMPILE_AUTO_MIN_S and COMPILE_ON_MIN_S, are
# in config.py). On machine A (2-core AVX2 CPU) inductor compiled three space configs in 9.5-67 s and
# their steps then ran at 0.48-0.89x of eager (docs/benchmarks.md): a CPU run would pay up to a minute to
# learn that, so on a CPU only --compile on compiles.
COMPILE_AUTO_DEVICES = ("cuda",)
COMPILE_MEASURE_STEPS = 16  # steps timed eager, then compiled, before "auto" keeps the faster
COMPILE_MIN_SPEEDUP = 1.02  # compiled steps must time at least this much faster than eager ones to be kept


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


def fresh_compile(model: nn.Module, **options) -> nn.Module:
    """``torch.compile(model)`` with Dynamo's caches cleared first. Every run compiles a new net through its
    family's one ``forward``, and Dynamo compiles a code object at most ``recompile_limit`` (8) times in a
    process before it runs it eager with only a logged warning: a process that compiled eight trials would
    train its next ones, and its final run, uncompiled while reporting them compiled."""
    torch._dynamo.reset()
    return torch.compile(model, **options)


def compile_mode(value: bool | str | None) -> str:
    """``train_run``'s ``compile`` as one of COMPILE_MODES (True is "on", False and None are "off")."""
    if value is True or value is False or value is None:
        return "on" if value else "off"
    if value not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {value!r}")
    return value


class AutoCompile:
    """``compile="auto"``: measure, then keep whichever of eager and compiled training is faster.

    Only on ``COMPILE_AUTO_DEVICES`` (CUDA). Steps 2 to 1 + M (M = ``COMPILE_MEASURE_STEPS``) run eager
    and are timed. If the run then has at least ``COMPILE_AUTO_MIN_S`` of training left, the next step
    compiles (its time, like step 1's, is set-up: paid out of the run, left out of its rate), the M after
    it are timed, and the compiled model is kept only if it trained at least ``COMPILE_MIN_SPEEDUP`` times
    as fast; otherwise the run goes on eager.
    Every step trains: the measurement costs the run nothing but the compilation itself. The timed
    windows start and end on a device sync (``syncs``).
    """

    def __init__(self, batch_size: int, device: torch.device):
        self.bs, self.state, self.t_mark, self.end = batch_size, "eager", 0.0, 1 + COMPILE_MEASURE_STEPS
        self.info: dict = {"mode": "auto", "compiled": False}
        if device.type not in COMPILE_AUTO_DEVICES:  # recorded, but nothing to say about it (compile_note)
            self.state, self.info["eligible"] = "done", False
            self.info["reason"] = f"auto compiles on {', '.join(COMPILE_AUTO_DEVICES)} only (--compile on to force it)"

    def syncs(self, step: int) -> bool:
        """Whether step ``step`` (1-based, just run) closes a timed window: the caller syncs the device
        before reading the clock."""
        return self.state != "done" and step > 1 and (self.state == "compiling" or step == self.end)

    def after_step(self, step: int, train_time: float, left_s: float, model: nn.Module):
        """Called after every step with the run's training time so far (synced when ``syncs`` said so) and
        an estimate of the training time still to come. Returns the module the next steps train through,
        or None to keep the current one."""
        if self.state == "done" or step < 1:
            return None
        if step == 1:
            self.t_mark = train_time
        elif self.state == "eager" and step == self.end:
            self.info["eager_images_per_s"] = round(COMPILE_MEASURE_STEPS * self.bs / (train_time - self.t_mark), 1)
            if left_s < COMPILE_AUTO_MIN_S:
                self.state = "done"
                self.info["reason"] = f"{left_s:.0f} s of training left, under {COMPILE_AUTO_MIN_S:.0f} s"
                return None
            self.state, self.t_mark, self.info["compiled"] = "compiling", train_time, True
            return fresh_compile(model)
        elif self.state == "compiling":
            self.info["compile_s"] = round(train_time - self.t_mark, 2)
            self.state, self.t_mark, self.end = "timing", train_time, step + COMPILE_MEASURE_STEPS
        elif self.state == "timing" and step == self.end:
            rate = COMPILE_MEASURE_STEPS * self.bs / (train_time - self.t_mark)
            eager = self.info["eager_images_per_s"]
            self.info["compiled_images_per_s"] = round(rate, 1)
            self.state, keep = "done", rate >= eager * COMPILE_MIN_SPEEDUP
            self.info.update(compiled=keep, reason=f"compiled {rate / eager:.2f}x the eager rate")
            return None if keep else model
        return None


def compile_note(info: dict) -> str | None:
    """One line on how a run used ``torch.compile`` (its ``RunResult.compile``), or None where there is
    nothing to say: it was off, or "auto" on a device it never tries (a CPU)."""
    if not info or info.get("mode") == "off" or info.get("eligible") is False:
        return None
    if info["mode"] == "on" and info.get("compiled"):
        return f"compiled (first step {info.get('compile_s', 0.0):.1f} s)"
    if "compile_s" in info:
        kept = "kept" if info["compiled"] else "not kept, trained eager"
        why = info.get("reason", "the run ended before its compiled steps were timed")
        return f"compiled in {info['compile_s']:.1f} s ({why}); {kept}"
    return f"not compiled: {info['reason']}" if info.get("reason") else None


def compile_failure(error: BaseException) -> str:
    """The reason a run records when compiling failed and it went on eager."""
    first = str(error).splitlines()[0][:200] if str(error) else ""
    return f"compilation failed ({type(error).__name__}: {first}); trained eager"


# glibc's malloc hands blocks over 128 KiB back to the OS when they are freed (munmap, heap trimming), so
# on a CPU every training step page-faults its batch buffers in again: batch preparation ran 3x slower at
# one thread (docs/benchmarks.md). PyTorch's CPU tuning guide recommends jemalloc or tcmalloc for the same
# reason; raising glibc's two thresholds keeps freed blocks in the heap without preloading anything.
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for this setting on 64-bit
TRIM_THRESHOLD = 256 << 20


def tune_cpu_allocator() -> bool:
    """Keep freed blocks of up to 32 MiB in glibc's heap. True if applied (Linux, glibc), else False.

    Process-wide and idempotent; entry points (the CLI, the benchmarks) call it once at start-up.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, or AdamW. No weight decay on biases and norm parameters."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def prime_optimizers() -> None:
    """Pay a process's one-off cost of its first optimizer steps (torch's lazy imports and set-up: 1.4-2.2 s
    on a 2-core CPU, then nothing) before any run's clock starts. Otherwise the first run of a process
    spends it out of its own slice, and, as its schedule follows elapsed time, past its warm-up: a search
    worker's first trial, a grid study's (no speed probe pays it), a Ray actor's."""
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
        if not _is_oom(e):
            raise
        reason = str(e).splitlines()[0]
    # Outside the except blocks the traceback (and every tensor its frames held) is released.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return RunResult(OOM, reason=f"out of memory: {reason[:200]}")


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
    mode = compile_mode(compile)
    compile_info = {"mode": mode, "compiled": mode == "on"}
    if mode == "on" and seconds is not None and seconds < COMPILE_ON_MIN_S:
        mode, compile_info = "off", {"mode": "on", "compiled": False,
                                     "reason": f"a {seconds:.0f} s run is too short to compile in (a compilation "
                                               f"cannot be stopped; on from {COMPILE_ON_MIN_S:.0f} s)"}
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
                if step_model is model or _is_oom(e):
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


def _is_oom(e: BaseException) -> bool:
    """Whether ``e`` is the device running out of memory (CUDA's typed error, or the CPU allocator's)."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) or (
        "out of memory" in str(e).lower())
