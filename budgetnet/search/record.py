"""How a trial's outcome is recorded, the same on every backend: the study, its progress row, the clock."""

from __future__ import annotations

from collections.abc import Callable

from optuna.trial import TrialState

from budgetnet.search.attrs import REASON, STATE, State
from budgetnet.search.clock import Clock
from budgetnet.search.progress import Reporter


def optuna_state(state: str) -> TrialState:
    """Optuna's state a trial of budgetnet's ``state`` is told with: all but two are PRUNED."""
    return {State.COMPLETE: TrialState.COMPLETE, State.FAILED: TrialState.FAIL}.get(state, TrialState.PRUNED)


def new_row(number: int, **known) -> dict:
    """A trial's progress row (``Reporter.trial``), with nothing known yet but ``known``."""
    return {"number": number, "family": None, "n_params": None, "flops": None, "progress": None,
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
