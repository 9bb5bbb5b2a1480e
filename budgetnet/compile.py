"""``torch.compile`` for a run: its modes, the measured "auto" choice, and one line on what happened.

A compilation is paid out of the run's own time and left out of its rate; evaluation runs uncompiled.
"""

from __future__ import annotations

import torch
from torch import nn

from budgetnet.config import COMPILE_AUTO_MIN_S, COMPILE_MODES, COMPILE_ON_MIN_S
from budgetnet.errors import first_line

# "auto" tries only here: a CPU paid long compiles for slower steps (docs/benchmarks.md, "Compilation")
COMPILE_AUTO_DEVICES = ("cuda",)
COMPILE_MEASURE_STEPS = 16  # steps timed eager, then compiled, before "auto" keeps the faster
COMPILE_MIN_SPEEDUP = 1.02  # compiled steps must time at least this much faster than eager ones to be kept


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


def compile_plan(value: bool | str | None, seconds: float | None) -> tuple[str, dict]:
    """The mode a run trains in, and its first ``RunResult.compile`` record. "on" in a time budget under
    ``COMPILE_ON_MIN_S`` trains eager: a compilation cannot be stopped."""
    mode = compile_mode(value)
    if mode == "on" and seconds is not None and seconds < COMPILE_ON_MIN_S:
        return "off", {"mode": "on", "compiled": False,
                       "reason": f"a {seconds:.0f} s run is too short to compile in (a compilation "
                                 f"cannot be stopped; on from {COMPILE_ON_MIN_S:.0f} s)"}
    return mode, {"mode": mode, "compiled": mode == "on"}


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
    return f"compilation failed ({type(error).__name__}: {first_line(error, 200)}); trained eager"
