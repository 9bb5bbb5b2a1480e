"""The final pick: which complete trial's config the final phase trains (``--pick``).

A trial is scored at the end of one slice; the final phase trains its config for several slices. So each
complete trial also gets an estimate of its validation accuracy at the epochs the final phase can give it
(``estimate``), from its own curve; ``rank`` orders trials by the observed value or by that estimate, and
``finalists`` are the ranked trials that lie within the validation noise of the leader: the configs a
race (``search/race.py``) tells apart. ``tta`` decides whether the final model predicts as a flip average
(``--tta``), from the picked trial's paired score on validation. No torch here: this is arithmetic on
stored curves and counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from budgetnet.config import EVAL_SUBSET
from budgetnet.search import attrs as A
from budgetnet.search.clock import REPORT_STEPS

PICKS = ("observed", "estimate", "race", "estimate+race")
FIT_FROM = 0.5  # the fit reads the curve from this share of the trial's epochs on
EXPONENTS = (0.25, 0.5, 1.0, 2.0)  # acc(e) = a - b * e^-c: c from this grid, a and b by least squares
NOISE_FACTOR = 2.0  # the spread a fit must explain, in multiples of the points' own noise, to count at all
MAX_ERROR_CUT = 0.5  # an estimate claims at most this share of the observed error as gain
Z_NOISE = 2.0  # finalists: within this many standard errors of the difference from the leader
MAX_FINALISTS = 3
RACE_SHARE = 0.3  # of the final phase's time, every leg of a race together (search/race.py)
KEEP_ESTIMATES = 10  # the pick keeps this many leading estimates in the study
# flip averaging stays off where the images it breaks exceed those it fixes by this many standard errors
# (one-sided, 5%)
Z_FLIP = 1.645


@dataclass(frozen=True)
class Estimate:
    """A trial's validation accuracy estimated at ``final_epochs``: ``value`` = observed + ``weight`` x
    ``gain``, bounded. ``gain``: what the fitted curve adds from the trial's epochs to the final's."""

    value: float
    observed: float
    epochs: float
    final_epochs: float
    gain: float = 0.0
    weight: float = 0.0
    exponent: float | None = None
    points: int = 0

    def as_attr(self) -> dict:
        return {"value": round(self.value, 5), "observed": round(self.observed, 5), "epochs": round(self.epochs, 3),
                "final_epochs": round(self.final_epochs, 3), "gain": round(self.gain, 5),
                "weight": round(self.weight, 3), "exponent": self.exponent, "points": self.points}


def standard_error(acc: float, images: int) -> float:
    """The standard error of an accuracy measured on ``images`` images (binomial), never below one image's."""
    n = max(images, 1)
    return max(math.sqrt(max(acc * (1 - acc), 0.0) / n), 1.0 / n)


def _fit(points: list[tuple[float, float, float]], c: float) -> tuple[float, float, float]:
    """Weighted least squares of acc = a - b * e^-c over (epoch, acc, weight) points: (a, b, weighted SSE)."""
    sw = sum(w for _, _, w in points)
    xs = [(e ** -c, y, w) for e, y, w in points]
    mx = sum(w * x for x, _, w in xs) / sw
    my = sum(w * y for _, y, w in xs) / sw
    sxx = sum(w * (x - mx) ** 2 for x, _, w in xs)
    slope = sum(w * (x - mx) * (y - my) for x, y, w in xs) / sxx if sxx > 0 else 0.0
    a = my - slope * mx
    sse = sum(w * (y - (a + slope * x)) ** 2 for x, y, w in xs)
    return a, -slope, sse


def estimate(curve: list, observed: float, final_epochs: float) -> Estimate:
    """``observed`` (the trial's value) carried to ``final_epochs`` along the trial's ``curve`` ([epoch,
    val_acc, images] at each mark). The last half of the curve is fitted with acc = a - b e^-c, each point
    weighted by its binomial noise; the fitted gain from the trial's last epoch to ``final_epochs`` is
    shrunk by the share of the curve's spread the fit explains beyond that noise (none for a flat or
    noisy curve, or a falling one), and bounded by ``MAX_ERROR_CUT`` of the observed error."""
    curve = [p for p in curve if p[0] > 0 and math.isfinite(p[1])]
    epochs = curve[-1][0] if curve else 0.0
    plain = Estimate(observed, observed, epochs, final_epochs)
    tail = [p for p in curve if p[0] >= FIT_FROM * epochs]
    if len(tail) < 4 or final_epochs <= epochs:
        return plain
    points = [(e, y, 1.0 / standard_error(y, int(n)) ** 2) for e, y, n in tail]
    best = min(((c, *_fit(points, c)) for c in EXPONENTS), key=lambda f: f[3])
    c, a, b, sse = best
    sw = sum(w for _, _, w in points)
    mean = sum(w * y for _, y, w in points) / sw
    sst = sum(w * (y - mean) ** 2 for _, y, w in points)
    n = len(points)
    # In these weights a point's noise has variance 1: a spread per point under NOISE_FACTOR times that
    # (or the fit's residual spread, if larger) counts for nothing.
    weight = max(0.0, 1.0 - NOISE_FACTOR * max(sse / (n - 2), 1.0) / max(sst / (n - 1), 1e-12)) if b > 0 else 0.0
    gain = b * (epochs ** -c - final_epochs ** -c) if b > 0 else 0.0
    value = observed + min(weight * gain, MAX_ERROR_CUT * (1.0 - observed))
    return Estimate(value, observed, epochs, final_epochs, gain, weight, c, n)


def curve_of(trial) -> list:
    """The trial's stored curve, or one rebuilt from its intermediate values (epochs in proportion)."""
    stored = A.CURVE.of(trial)
    if stored:
        return stored
    epochs = float(A.EPOCHS.of(trial, 0.0))
    return [[epochs * step / REPORT_STEPS, value, EVAL_SUBSET]
            for step, value in sorted(trial.intermediate_values.items())]


def final_epochs(trial, seconds: float, images: int) -> float:
    """Epochs ``seconds`` of final training give the trial's config over ``images`` images, at its own rate."""
    return float(A.IMAGES_PER_S.of(trial, 0.0)) * max(seconds, 0.0) / max(images, 1)


@dataclass(frozen=True)
class Ranked:
    trial: object  # an optuna FrozenTrial
    value: float  # what it is ranked by
    se: float  # the standard error of its observed value


def rank(trials: list, values: dict[int, float] | None = None) -> list[Ranked]:
    """Complete ``trials`` best first, by ``values`` (a trial's number to its estimate) or, without them, by
    their observed value; ties go to the observed value, then to the earlier trial."""
    ranked = []
    for t in trials:
        curve = curve_of(t)
        n = int(curve[-1][2]) if curve else EVAL_SUBSET
        ranked.append(Ranked(t, t.value if values is None else values[t.number], standard_error(t.value, n)))
    return sorted(ranked, key=lambda r: (r.value, r.trial.value, -r.trial.number), reverse=True)


def estimates(trials: list, seconds: float, images: int) -> dict[int, Estimate]:
    """Every complete trial's estimate at ``seconds`` of final training over ``images`` images."""
    return {t.number: estimate(curve_of(t), t.value, final_epochs(t, seconds, images)) for t in trials}


def finalists(ranked: list[Ranked]) -> list[Ranked]:
    """The leader and the next configs (distinct ones) within ``Z_NOISE`` standard errors of the difference
    of their values from the leader's, up to ``MAX_FINALISTS``: those a slice cannot tell apart."""
    if not ranked:
        return []
    lead, out, seen = ranked[0], [ranked[0]], {A.CONFIG.of(ranked[0].trial)}
    for r in ranked[1:]:
        if len(out) == MAX_FINALISTS:
            break
        if A.CONFIG.of(r.trial) in seen:
            continue
        if lead.value - r.value <= Z_NOISE * math.hypot(lead.se, r.se):
            out.append(r)
            seen.add(A.CONFIG.of(r.trial))
    return out


@dataclass
class Choice:
    """What ``choose`` decided: the trial whose config the final phase trains, and why."""

    trial: object
    by: str  # observed, estimate, race (once run)
    asked: str
    finalists: list  # Ranked, for a race; one or none: no race
    observed_best: int
    estimate_best: int | None
    estimates: dict = field(default_factory=dict)  # trial number -> Estimate.as_attr(), the leading ones
    seconds: float = 0.0  # the final phase's time it was picked for

    @classmethod
    def of(cls, trial) -> Choice:
        """``trial`` picked by its observed value, with no race: what ``--pick observed`` makes of the best."""
        return cls(trial, "observed", "observed", [], trial.number, None)

    def as_attr(self) -> dict:
        return {"asked": self.asked, "by": self.by, "trial": self.trial.number, "observed_best": self.observed_best,
                "estimate_best": self.estimate_best, "final_seconds": round(self.seconds, 2),
                "estimates": {str(n): e for n, e in self.estimates.items()},
                "finalists": [{"trial": r.trial.number, "value": round(r.value, 5), "se": round(r.se, 5)}
                              for r in self.finalists]}


def choose(trials: list, asked: str, seconds: float, images: int) -> tuple[Choice, dict[int, Estimate]]:
    """The pick for ``--pick asked`` among complete ``trials``, for ``seconds`` of final training over
    ``images`` images, and every trial's estimate (computed whatever is asked: the caller keeps them)."""
    est = estimates(trials, seconds, images)
    observed = rank(trials)
    by_estimate = rank(trials, {n: e.value for n, e in est.items()})
    by = "estimate" if asked.startswith("estimate") else "observed"
    ranked = by_estimate if by == "estimate" else observed
    return Choice(ranked[0].trial, by, asked, finalists(ranked) if asked.endswith("race") else [],
                  observed[0].trial.number, by_estimate[0].trial.number, seconds=seconds), est


def tta(asked: str, flip: dict | None, over_cap: str | None = None) -> tuple[str, str]:
    """The final model's test-time augmentation, and why, in a clause. ``asked``: ``--tta``. ``flip``: the
    picked trial's ``A.FLIP`` (its slice model on the whole validation split, one view against the flip
    average of the same images). ``over_cap``: why two views would break a cap, if they would.

    ``auto`` turns it on for a config trained with flips unless the slice model's validation shows it
    hurts: unless the images it breaks exceed those it fixes by more than ``Z_FLIP`` standard errors of
    that difference (McNemar's test, one-sided, on the images where the two views disagree). The burden
    of proof is on harm, not on gain: a slice model's gain understates the final model's
    (docs/benchmarks.md, "The final pick"). Views that never disagree gain nothing for twice the cost."""
    if asked == "none":
        return "none", "--tta none"
    if over_cap:
        return "none", f"two views would break {over_cap}"
    if asked == "flip":
        return "flip", "--tta flip"
    if not flip:
        return "none", "the picked trial has no flip score (a config trained without mirrored images)"
    fixed, broke = int(flip["flip_fixed"]), int(flip["flip_broke"])
    plain, both = flip["val_acc"], flip["val_acc_flip"]
    said = (f"on the validation split the flip average fixed {fixed} images and broke {broke} "
            f"({plain:.2%} -> {both:.2%})")
    if fixed + broke == 0:
        return "none", "its two views agree on every validation image"
    if broke - fixed > Z_FLIP * math.sqrt(fixed + broke):
        return "none", said + ": it hurts, beyond the noise"
    return "flip", said
