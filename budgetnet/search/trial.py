"""One search trial, backend-free: config → guard → time slice → reports → result.

``run_trial`` knows neither Optuna nor Ray. A backend adapter samples the config (``search/space.py``),
gives the trial three callables (``set_attr`` records a number or a string against the trial,
``report(progress, val_acc)`` records an evaluation and answers whether to stop, ``fits()`` says whether
a full slice still fits in the search phase) and turns the returned ``TrialOutcome`` into its own terms
(Optuna: a value, or ``TrialPruned`` with the reason). The guard runs here, before anything is allocated,
so no oversized model ever reaches training on any backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from budgetnet.budget import BudgetExceeded, check_params, count_flops
from budgetnet.config import RunConfig
from budgetnet.data import DeviceData
from budgetnet.search import attrs as A
from budgetnet.search.attrs import State, of_run
from budgetnet.train import COMPLETE, STOPPED, RunResult, train_run

MIN_EPOCHS_PER_TRIAL = 0.5  # a sampled model must see half its training split per slice (speed check)


@dataclass
class TrialOutcome:
    """How a trial ended. ``state``: complete, rejected (guard), stopped (no slice left, Ctrl-C, deadline),
    pruned (below the median), too slow, diverged or out of memory. ``value`` is set when complete.
    ``constraint`` is parameters over the cap (<= 0 is feasible), None before the guard ran."""

    state: str
    reason: str = ""
    value: float | None = None
    n_params: int | None = None
    flops: int | None = None
    constraint: float | None = None
    progress: float | None = None  # the last evaluation mark reached (share of the slice)
    val_acc: float | None = None
    result: RunResult | None = None


def guard(cfg: RunConfig, shape, max_params: float, set_attr: Callable[[str, object], None]) -> TrialOutcome:
    """The budget guard, on the meta device, before anything is allocated: a ``rejected`` outcome with the
    numbers, or a ``stopped`` one (not trained yet) that carries ``n_params``, ``flops`` and the constraint.
    ``family``, ``config``, ``n_params`` and ``flops`` go through ``set_attr``. ``run_trial`` starts with it;
    the Ray backend also runs it in the driver, so that a rejected config never becomes a Ray trial."""
    set_attr(A.FAMILY, cfg.model.family)
    set_attr(A.CONFIG, cfg.to_json(indent=None))
    try:
        n_params = check_params(cfg.model, shape, max_params)
    except BudgetExceeded as e:
        set_attr(A.N_PARAMS, int(e.value))
        return TrialOutcome(State.REJECTED, str(e), n_params=int(e.value), constraint=float(e.value - max_params))
    flops = count_flops(cfg.model, shape)
    set_attr(A.N_PARAMS, n_params)
    set_attr(A.FLOPS, flops)
    return TrialOutcome(State.STOPPED, n_params=n_params, flops=flops, constraint=float(n_params - max_params))


def run_trial(cfg: RunConfig, data: DeviceData, *, max_params: float, slice_s: float, device: str,
              precision: str, set_attr: Callable[[str, object], None],
              report: Callable[[float, float], bool], fits: Callable[[], bool], stop: Callable[[], bool],
              sampled: bool = True, interrupted: Callable[[], bool] = lambda: False,
              compile: str = "off", init_state: dict | None = None) -> TrialOutcome:
    """Guard ``cfg`` against ``max_params`` on the meta device, then train it for one full ``slice_s``.

    ``fits()`` is asked after the guard: a trial whose full slice no longer fits is not started (that time
    goes to the final phase). ``stop()`` is polled while training (deadline, Ctrl-C, a lost leader).
    ``sampled`` trials must show ``MIN_EPOCHS_PER_TRIAL`` of their data in the slice (the run measures its
    own speed and ends too slow otherwise); grid points (the user's own) are never stopped for speed.
    ``compile``: ``train_run``'s; with "auto" only a slice long enough to repay compiling tries it.
    ``init_state``: the weights a fine-tuning trial starts from (``train_run``'s).
    The user attrs ``family``, ``config``, ``n_params``, ``flops``, ``seconds``, ``images_per_s`` and
    ``epochs``, ``steps`` go through ``set_attr``; the adapter records ``state`` and ``reason`` from the outcome.
    """
    out = guard(cfg, data.info.shape, max_params, set_attr)
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
                       compile=compile, autotune=False, init_state=init_state)  # a slice of a new model cannot repay cuDNN's algorithm search
    out.result = result
    set_attr(A.SECONDS, round(result.seconds, 2))
    set_attr(A.IMAGES_PER_S, round(result.images_per_s, 1))
    set_attr(A.EPOCHS, round(result.metrics.get("epoch", 0.0), 2))
    set_attr(A.STEPS, result.steps)
    if of_run(result.status) is not None:  # ended without a result worth ranking: PRUNED, with the run's reason
        out.state, out.reason = of_run(result.status), result.reason
    elif result.status == STOPPED and result.reason == "stopped by hook":
        out.state, out.reason = State.PRUNED, f"below the median at {out.progress:.0%}"
    elif result.status == STOPPED:
        out.reason = "interrupted" if interrupted() else "search budget exhausted"
    else:
        assert result.status == COMPLETE
        out.state, out.value = State.COMPLETE, result.metrics["val_acc"]
        out.val_acc = out.value
    return out
