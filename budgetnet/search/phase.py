"""The search phase's loop, the same in the leader and in every worker: trials while a full slice fits.

Also its two stops: ``Interrupt`` (Ctrl-C, SIGTERM) and ``search_fits`` (no full slice left, or with
``--final-fraction auto`` a best value that has stopped improving).
"""

from __future__ import annotations

import signal
import threading

import optuna
from optuna.trial import TrialState

from budgetnet.search.attrs import SEARCH_ENDED, STATE, State
from budgetnet.search.clock import AUTO_SEARCH_MIN, STAGNANT_TRIALS, Clock
from budgetnet.search.options import SearchOptions, plan_budget
from budgetnet.search.progress import Reporter


class Interrupt:
    """First Ctrl-C (or SIGTERM): stop gracefully, keep best-so-far. Second Ctrl-C: stop at once.
    Each signal is passed on to ``forward`` (the leader's ``Workers``, in sessions of their own)."""

    def __init__(self):
        self.event = threading.Event()
        self.forward = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.forward is not None:
            self.forward.signal(signum)
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def trials_since_best(study: optuna.Study) -> int | None:
    """Judged trials, in trial order, since the best complete one (a tie does not beat it); None before any
    complete trial. Judged: complete, or pruned (found worse than the median of its peers, let alone the
    best). Optuna's ``BestValueStagnationEvaluator`` counts complete trials only, which a median pruner
    makes rare (docs/benchmarks.md, "Final share"). Too slow, diverged, rejected or interrupted trials say
    nothing of the space's best and are not counted."""
    best, since = None, 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.state == TrialState.COMPLETE and (best is None or t.value > best):
            best, since = t.value, 0
        elif t.state == TrialState.COMPLETE or STATE.of(t) == State.PRUNED:
            since += 1
    return None if best is None else since


def search_fits(opts: SearchOptions, study: optuna.Study, clock: Clock, slice_s: float,
                reporter: Reporter | None = None):
    """``fits(extra=0)``: whether another trial starts, in the leader and in every worker. Its full slice
    must fit before the search phase ends (``Plan.fits``). With ``final_auto`` the phase also ends, once
    past ``AUTO_SEARCH_MIN`` of the budget, when the best value has not improved in ``STAGNANT_TRIALS``
    judged trials in a row (``trials_since_best``); the final phase gets the rest."""
    plan = plan_budget(opts).with_slice(slice_s)

    def stagnant() -> bool:
        if SEARCH_ENDED in study.user_attrs:  # another worker (or an earlier run) decided
            return True
        if not opts.final_auto or clock.used() < AUTO_SEARCH_MIN * opts.budget_seconds:
            return False
        if (trials_since_best(study) or 0) < STAGNANT_TRIALS:  # (never before a complete trial)
            return False
        share = 1 - clock.used() / opts.budget_seconds
        SEARCH_ENDED.set(study, round(clock.used(), 1))
        if reporter is not None:
            reporter.message(f"search ends at {clock.used():.0f} s: its best value has not improved in "
                             f"{STAGNANT_TRIALS} judged trials (complete, or pruned below the median); the "
                             f"final phase gets {share:.0%} of the budget")
        return True

    def fits(extra: float = 0.0) -> bool:
        return plan.fits(clock.used() + extra) and not stagnant()

    return fits


def search_phase(study: optuna.Study, objective, fits, interrupt: Interrupt) -> None:
    """Run ``objective``'s trials until no full slice fits or a stop."""
    def enough_time(study: optuna.Study, _trial=None) -> None:
        # Start a trial only if its full slice fits; the rest goes to the final phase.
        if interrupt.event.is_set() or not fits():
            study.stop()

    while fits() and not interrupt.event.is_set():
        try:
            study.optimize(objective, callbacks=[enough_time], catch=(Exception,), gc_after_trial=False)
            return
        except ValueError:  # Optuna's "Cannot tell a FAIL trial": one it ran was ended by another process
            if objective.lost is None:
                raise
            objective.lost = None  # that trial is recorded (failed, with the other's reason): go on
