"""How a trial's outcome is recorded, the same on every backend: the study, its progress row, the clock."""

from __future__ import annotations

from collections.abc import Callable

from optuna.trial import TrialState

from budgetnet.search.attrs import GUARD_SECONDS, LATENCY_MS, REASON, STATE, State
from budgetnet.search.clock import Clock
from budgetnet.search.progress import Reporter


def optuna_state(state: str) -> TrialState:
    """Optuna's state a trial of budgetnet's ``state`` is told with: all but two are PRUNED."""
    return {State.COMPLETE: TrialState.COMPLETE, State.FAILED: TrialState.FAIL}.get(state, TrialState.PRUNED)


def new_row(number: int, **known) -> dict:
    """A trial's progress row (``Reporter.trial``), with nothing known yet but ``known``."""
    return {"number": number, "family": None, "n_params": None, "flops": None, "latency_ms": None, "progress": None,
            "val_acc": None, "seconds": 0.0, **known}


def failure_reason(e: BaseException) -> str:
    """The reason recorded for a trial that raised: a bug or a broken config, in one line."""
    return f"{type(e).__name__}: {e}"[:300]


def record(trial, row: dict, state: str, reason: str, clock: Clock, reporter: Reporter, *,
           write: bool = True, tell: Callable[[], None] | None = None) -> None:
    """Record how ``trial`` ended: ``state`` and, unless complete, ``reason`` in the study (``write``:
    False for a trial another process has ended) and in ``row``; then ``tell()`` the study if the backend
    does it here, save the clock and print the row."""
    row["state"] = state
    if state != State.COMPLETE:
        row["reason"] = reason
    if write:
        if state != State.COMPLETE:
            REASON.set(trial, reason)
        STATE.set(trial, state)
    if tell is not None:
        tell()
    clock.save()
    reporter.trial(row, clock.used(), clock.total)


def guard_overhead(trials: list, budget_seconds: float | None) -> dict:
    """What the guard cost a study (``best.json``'s and the report's ``guard``): its seconds over every trial
    (meta counts; the latency builds and forwards under a latency cap), their share of the budget, and the
    trials whose latency it measured."""
    seconds = sum(GUARD_SECONDS.of(t, 0.0) for t in trials)
    return {"seconds": round(seconds, 3),
            "share_of_budget": round(seconds / budget_seconds, 5) if budget_seconds else None,
            "trials_latency_measured": sum(LATENCY_MS in t.user_attrs for t in trials)}
