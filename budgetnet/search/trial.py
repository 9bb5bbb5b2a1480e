"""One search trial, backend-free: config → guard → time slice → reports → result.

``run_trial`` knows neither Optuna nor Ray. A backend adapter samples the config (``search/space.py``),
gives the trial three callables (``set_attr`` records a number or a string against the trial,
``report(progress, val_acc)`` records an evaluation and answers whether to stop, ``fits()`` says whether
a full slice still fits in the search phase) and turns the returned ``TrialOutcome`` into its own terms
(Optuna: a value, or ``TrialPruned`` with the reason). The guard runs here, before any training, so no
model over a cap (parameters, MACs, latency) ever reaches training on any backend.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from budgetnet.budget import BudgetExceeded, check_flops, check_params
from budgetnet.config import RunConfig
from budgetnet.data import DeviceData
from budgetnet.device import first_step_is_setup
from budgetnet.latency import config_latency, thread_label
from budgetnet.search import attrs as A
from budgetnet.search.attrs import State, of_run
from budgetnet.search.pick import estimate
from budgetnet.train import COMPLETE, STOPPED, RunResult, train_run

MIN_EPOCHS_PER_TRIAL = 0.5  # a sampled model must see half its training split per slice (speed check)


@dataclass(frozen=True)
class Caps:
    """What a trial must fit: parameters, multiply-accumulates per image (``--max-flops``; None: no cap), and
    the batch-1 latency measured on ``latency_device`` with ``latency_threads`` (None: not measured)."""

    max_params: float
    max_macs: float | None = None
    max_latency_ms: float | None = None
    latency_device: str = "cpu"
    latency_threads: int = 1

    @classmethod
    def of(cls, opts) -> Caps:
        """The caps of a search's options (``SearchOptions``)."""
        return cls(opts.max_params, opts.max_flops, opts.max_latency_ms, opts.latency_device, opts.latency_threads)


@dataclass
class TrialOutcome:
    """How a trial ended. ``state``: complete, rejected (guard), stopped (no slice left, Ctrl-C, deadline),
    pruned (below the median), too slow, diverged or out of memory. ``value`` is set when complete.
    ``constraints``: by cap (``params``, ``macs``, ``latency_ms``), how far over it the trial is (<= 0 is
    feasible), as far as the guard got; empty before it ran."""

    state: str
    reason: str = ""
    value: float | None = None
    n_params: int | None = None
    flops: int | None = None
    constraints: dict[str, float] = field(default_factory=dict)
    progress: float | None = None  # the last evaluation mark reached (share of the slice)
    val_acc: float | None = None
    result: RunResult | None = None
    latency_ms: float | None = None


def guard(cfg: RunConfig, shape, caps: Caps, set_attr: Callable[[str, object], None]) -> TrialOutcome:
    """The budget guard, before any training: a ``rejected`` outcome with the numbers, or a ``stopped`` one
    (not trained yet) that carries ``n_params``, ``flops``, the latency and the constraints. Parameters and
    MACs are counted on the meta device, exactly, before anything is allocated; then, under a latency cap
    only, the model is built for real on the latency device and timed (``latency.config_latency``, about a
    second). ``family``, ``config``, ``n_params``, ``flops``, ``latency_ms`` and ``guard_seconds`` go through
    ``set_attr``. ``run_trial`` starts with it; the Ray backend also runs it in the driver, so that a
    rejected config never becomes a Ray trial."""
    t0 = time.perf_counter()
    set_attr(A.FAMILY, cfg.model.family)
    set_attr(A.CONFIG, cfg.to_json(indent=None))
    out = TrialOutcome(State.STOPPED)
    try:
        out.n_params = check_params(cfg.model, shape, caps.max_params)
        out.constraints["params"] = float(out.n_params - caps.max_params)
        out.flops = check_flops(cfg.model, shape, caps.max_macs)
        if caps.max_macs is not None:
            out.constraints["macs"] = float(out.flops // 2 - caps.max_macs)
    except BudgetExceeded as e:
        key = "params" if e.what == "parameters" else "macs"
        out.state, out.reason, out.constraints[key] = State.REJECTED, str(e), float(e.value - e.cap)
        if key == "params":
            out.n_params = int(e.value)
        else:
            out.flops = 2 * int(e.value)
    set_attr(A.N_PARAMS, out.n_params)
    if out.flops is not None:
        set_attr(A.FLOPS, out.flops)
    if out.state != State.REJECTED and caps.max_latency_ms is not None:
        m = config_latency(cfg.model, shape, caps.latency_device, caps.latency_threads)
        out.latency_ms = m["latency_ms"]
        set_attr(A.LATENCY_MS, round(m["latency_ms"], 4))
        out.constraints["latency_ms"] = m["latency_ms"] - caps.max_latency_ms
        if m["latency_ms"] > caps.max_latency_ms:
            out.state = State.REJECTED
            out.reason = (f"latency {m['latency_ms']:.3f} ms at batch 1 on {m['device']} "
                          f"({thread_label(m['threads'])}, median of {m['repeats']}) exceeds the "
                          f"--max-latency-ms cap of {caps.max_latency_ms:g} ms")
    set_attr(A.GUARD_SECONDS, round(time.perf_counter() - t0, 4))
    return out


def run_trial(cfg: RunConfig, data: DeviceData, *, caps: Caps, slice_s: float, device: str,
              precision: str, set_attr: Callable[[str, object], None],
              report: Callable[[float, float], bool], fits: Callable[[], bool], stop: Callable[[], bool],
              sampled: bool = True, interrupted: Callable[[], bool] = lambda: False,
              compile: str = "off", init_state: dict | None = None,
              final: tuple[float, int] | None = None, mirror: bool = False) -> TrialOutcome:
    """Guard ``cfg`` against ``caps`` (``guard``), then train it for one full ``slice_s``.

    ``fits()`` is asked after the guard: a trial whose full slice no longer fits is not started (that time
    goes to the final phase). ``stop()`` is polled while training (deadline, Ctrl-C, a lost leader).
    ``sampled`` trials must show ``MIN_EPOCHS_PER_TRIAL`` of their data in the slice (the run measures its
    own speed and ends too slow otherwise); grid points (the user's own) are never stopped for speed.
    ``compile``: ``train_run``'s; with "auto" only a slice long enough to repay compiling tries it.
    ``init_state``: the weights a fine-tuning trial starts from (``train_run``'s).
    ``final``: the final phase's planned seconds and images: a complete trial's ``estimate`` there.
    ``mirror``: a complete trial trained with flips also scores its flip average (``flip``; ``--tta auto``).
    The user attrs ``family``, ``config``, ``n_params``, ``flops``, ``seconds``, ``images_per_s`` and
    ``epochs``, ``steps`` go through ``set_attr``; the adapter records ``state`` and ``reason`` from the outcome.
    """
    out = guard(cfg, data.info.shape, caps, set_attr)
    if out.state == State.REJECTED:
        return out
    if not fits():
        out.reason = "no full slice left in the search phase"
        return out

    def hook(progress: float, metrics: dict) -> bool:
        out.progress, out.val_acc = progress, metrics["val_acc"]
        return report(progress, metrics["val_acc"])

    result = train_run(cfg, data, device=device, seconds=slice_s, hook=hook, stop=stop,
                       min_epochs=MIN_EPOCHS_PER_TRIAL if sampled else None, precision=precision,
                       compile=compile, autotune=False, init_state=init_state, mirror=mirror)  # a slice of a new model cannot repay cuDNN's algorithm search
    out.result = result
    set_attr(A.SECONDS, round(result.seconds, 2))
    set_attr(A.IMAGES_PER_S, round(result.images_per_s, 1))
    set_attr(A.EPOCHS, round(result.metrics.get("epoch", 0.0), 2))
    set_attr(A.STEPS, result.steps)
    curve = [[round(h["epoch"], 4), round(h["val_acc"], 5), h["val_images"]]
             for h in result.history if "val_acc" in h and "val_images" in h]
    set_attr(A.CURVE, curve)
    if result.speed_recheck:
        set_attr(A.SPEED_RECHECK, result.speed_recheck)
    if of_run(result.status) is not None:  # ended without a result worth ranking: PRUNED, with the run's reason
        out.state, out.reason = of_run(result.status), result.reason
    elif result.status == STOPPED and result.reason == "stopped by hook":
        out.state, out.reason = State.PRUNED, f"below the median at {out.progress:.0%}"
    elif result.status == STOPPED:
        out.reason = "interrupted" if interrupted() else "search budget exhausted"
    else:
        assert result.status == COMPLETE
        out.state, out.value = State.COMPLETE, result.metrics["val_acc"]
        if final is not None:  # shown beside the value while the search runs; the pick recomputes it
            epochs = result.images_per_s * final[0] / max(final[1], 1)
            set_attr(A.ESTIMATE, estimate(curve, out.value, epochs).as_attr())
        if "val_acc_flip" in result.metrics:
            set_attr(A.FLIP, {k: result.metrics[k] for k in ("val_acc", "val_acc_flip", "flip_fixed", "flip_broke")})
        out.val_acc = out.value
    return out


def measure_rate(cfg: RunConfig, data: DeviceData, *, device, seconds: float, precision: str = "auto",
                 stop: Callable[[], bool] | None = None) -> float | None:
    """Training images/s of ``cfg`` on this device (after step 1), trained for at most ``seconds`` (set-up
    included), with no evaluation and no cuDNN autotuning, as trials train. None with no step (CUDA: two)."""
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, eval_points=1))
    result = train_run(cfg, DeviceData(data.info, data.classes, data.train, None), device=device, seconds=seconds,
                       stop=stop, precision=precision, autotune=False)
    # Where step 1 is set-up (CUDA), a run of one step has no rate of its own: its figure would be set-up.
    min_steps = 2 if first_step_is_setup(torch.device(device)) else 1
    if result.status not in (COMPLETE, STOPPED) or result.steps < min_steps or not result.images_per_s > 0:
        return None
    return result.images_per_s
