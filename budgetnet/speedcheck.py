"""Whether a time-sliced run can show its data ``min_epochs`` epochs in its slice (``train_run``'s speed
check): judged once from ``SPEED_CHECK_AT`` of the slice, and a verdict against the run re-checked once,
from ``RECHECK_AT``, over the steps taken since. A run slowed for a moment (another process busy) keeps its
slice; only one still too slow then ends. Arithmetic on the run's counters only: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPEED_CHECK_AT = 0.05  # progress from which a time-sliced run with ``min_epochs`` checks its own speed
RECHECK_AT = 0.10  # a verdict against it is re-checked from here (before the first of ten marks) ...
RECHECK_STEPS = 2  # ... over at least this many steps since the verdict (one when an evaluation is due)


@dataclass
class SpeedCheck:
    """One run's check: ``wants`` says when to look (the caller then waits for queued device work), and
    ``judge`` looks: the reason to end the run too slow, or None."""

    seconds: float  # the slice
    images: int  # one epoch's training images
    min_epochs: float
    pending: bool = True  # the first look is still to come
    verdict: tuple[int, int, float, float] | None = None  # against the run: step, images, train time, rate
    recheck: dict = field(default_factory=dict)  # once re-checked: the rate at the verdict and since (img/s)

    def wants(self, p: float, step: int, first_alone: bool, eval_due: bool) -> bool:
        """Whether to judge now, at progress ``p`` after ``step`` steps. ``first_alone``: step 1 may be judged
        alone (an evaluation comes before step 2, and step 1 is speed, not set-up)."""
        if self.verdict is not None:
            return p >= RECHECK_AT and step - self.verdict[0] >= (1 if eval_due else RECHECK_STEPS)
        return self.pending and p >= SPEED_CHECK_AT and (step >= 2 or first_alone)

    def judge(self, step: int, images: int, train_time: float, steady_rate: float) -> str | None:
        """The first look records a verdict when ``steady_rate`` cannot cover the slice; the second judges the
        steps since it alone, and returns the reason to end the run if they cannot either."""
        if self.verdict is None:
            self.pending = False
            if self._projected(steady_rate) < self.min_epochs:
                self.verdict = (step, images, train_time, steady_rate)
            return None
        _, was_images, was_time, first = self.verdict
        self.verdict = None
        rate = (images - was_images) / max(train_time - was_time, 1e-9)
        self.recheck = {"first_images_per_s": round(first, 1), "recheck_images_per_s": round(rate, 1)}
        projected = self._projected(rate)
        if projected >= self.min_epochs:
            return None
        return (f"{projected:.2f} epochs projected in the {self.seconds:.0f} s slice at {rate:,.0f} img/s, "
                f"re-checked ({first:,.0f} img/s at first); needs {self.min_epochs:g}")

    def _projected(self, rate: float) -> float:
        return rate * self.seconds / self.images
