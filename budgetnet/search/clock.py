"""Budget time: the clock stored in the study, and how the budget is cut into a speed probe and slices.

Every number here is a share of the budget or a bound on one, none a speed: what a device can do in a
slice is measured on the device (``probe.probe_speed``, ``train_run(min_epochs=)``). This module imports
neither torch nor optuna, so the command line can show these rules in its help without loading either.
"""

from __future__ import annotations

import math
import time

from budgetnet.search.attrs import SECONDS_USED

REPORT_STEPS = 100  # trials report on a 0..100 axis: percent of their own slice
TRIALS_PER_SEARCH = 12  # full-length trial slices per search phase; median stopping fits in more trials
MIN_SLICE_S = 10.0  # shorter trials rank models by their start-up, not their learning ...
MIN_TRIALS = 4  # ... except in a search phase too short for this many such slices (one may be lost to a
# model too slow for the device, which ends at its first step): then it is shortened
ABS_MIN_SLICE_S = 3.0  # ... down to this, never further
SLICE_GRACE = 0.1  # a trial starts only if its full slice fits before the search phase ends, give or take this share
PROBE_SHARE = 0.03  # of the budget, for the speed probe, between these bounds (seconds):
PROBE_MIN_S, PROBE_MAX_S = 1.0, 10.0
# --final-fraction auto: the search phase ends between these shares of the budget, as soon as it is past
# the first and its best value has not improved in STAGNANT_TRIALS judged trials in a row; the final
# phase gets the rest (docs/search.md, "The final phase's share")
AUTO_SEARCH_MIN, AUTO_SEARCH_MAX = 0.4, 0.75
STAGNANT_TRIALS = 3
WRITE_RESERVE_S = 3.0  # kept back at the end for the FLOP count, checkpoint write and artifact upload
CLOCK_SAVE_SHARE = 0.005  # the clock is saved to the study this often (share of the budget, 1 to 5 s):
CLOCK_SAVE_MIN_S, CLOCK_SAVE_MAX_S = 1.0, 5.0  # a kill -9 loses at most that much of the accounting


class Clock:
    """Budget time: seconds used by earlier runs of this study plus this process's elapsed time.

    ``save()`` stores the seconds used in the study; ``tick()``, called as often as one likes (every few
    training steps), saves when ``save_every`` seconds have passed, so a killed process loses at most that
    much of the accounting, in any phase.
    """

    def __init__(self, total: float, used_before: float, started: float, study=None,
                 save_every: float = CLOCK_SAVE_MIN_S):
        self.total, self.used_before, self.started = total, used_before, started
        self.study, self.save_every = study, save_every
        self._saved_at = time.perf_counter()

    @classmethod
    def from_anchor(cls, total: float, used_before: float, anchor: float, study=None,
                    save_every: float = CLOCK_SAVE_MIN_S) -> Clock:
        """The clock of a process that joins a session: ``anchor`` is the wall time (epoch seconds) at which
        the session had used ``used_before`` seconds. Every worker of a session counts the same budget
        time from it, so whichever one saves writes the session's time, not its own."""
        return cls(total, used_before, time.perf_counter() - (time.time() - anchor), study, save_every)

    def anchor(self) -> float:
        """The wall time (epoch seconds) at which this clock read ``used_before``: stored in the study, so
        that other processes count from the same instant (``from_anchor``)."""
        return time.time() - (time.perf_counter() - self.started)

    def used(self) -> float:
        return self.used_before + time.perf_counter() - self.started

    def left(self) -> float:
        return self.total - self.used()

    def save(self) -> None:
        if self.study is not None:
            SECONDS_USED.set(self.study, round(self.used(), 3))
        self._saved_at = time.perf_counter()

    def tick(self) -> bool:
        """Save if due. Returns False, so that ``stop=lambda: ... or clock.tick()`` reads naturally."""
        if time.perf_counter() - self._saved_at >= self.save_every:
            self.save()
        return False


def clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def slice_fits(used: float, slice_s: float, search_end: float, budget: float = math.inf) -> bool:
    """Whether a trial of ``slice_s`` seconds, started ``used`` seconds into the budget, ends before the
    search phase does (at ``search_end``), give or take ``SLICE_GRACE`` of a slice, and in any case
    ``WRITE_RESERVE_S`` before the ``budget`` ends (with no final phase, nothing after the search absorbs
    a late trial): the one rule for starting a trial, on every backend and in every worker."""
    return used + slice_s <= min(search_end + SLICE_GRACE * slice_s, budget - WRITE_RESERVE_S)


def trial_deadline(search_end: float, slice_s: float, budget: float = math.inf) -> float:
    """Budget seconds at which a running trial is stopped whatever its own slice says (the safety net
    behind it): ``2 * SLICE_GRACE`` of a slice past the search phase's end, never later than
    ``WRITE_RESERVE_S`` before the ``budget`` ends."""
    return min(search_end + 2 * SLICE_GRACE * slice_s, budget - WRITE_RESERVE_S)


def slice_seconds(search_end: float, used: float) -> float:
    """One trial's time slice when ``--trial-seconds`` does not give it: the search phase (ending at
    ``search_end`` seconds of budget, ``used`` of them gone) over ``TRIALS_PER_SEARCH``, at least
    ``MIN_SLICE_S``; in a search phase too short for ``MIN_TRIALS`` such slices, short enough that
    that many fit in what is left with one slice to spare (the time between trials: sampling, width
    fitting, storage writes), but at least ``ABS_MIN_SLICE_S``."""
    slice_s = max(MIN_SLICE_S, search_end / TRIALS_PER_SEARCH)
    left = search_end - used
    if left < MIN_TRIALS * slice_s:
        slice_s = max(ABS_MIN_SLICE_S, min(slice_s, left / (MIN_TRIALS + 1)))
    return slice_s
