"""The final race: finalists a slice cannot tell apart (``pick.finalists``) trained side by side for a share
of the final phase, the leader going on alone.

Each finalist trains one leg of ``leg_s`` seconds on the search's training split, its lr schedule set to the
whole final run it would get as the winner; each is then scored on the full validation split. The winner
goes on from where its leg stopped (``train_run(resume=)``: its weights, optimizer state and EMA) over
train+validation, so nothing is trained twice; the losers' legs are the race's cost. A leg shorter than a
trial's slice would rank finalists on less training than their slices did, so such a race is skipped.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

from budgetnet.config import RunConfig
from budgetnet.data import DeviceData
from budgetnet.search import attrs as A
from budgetnet.search.pick import RACE_SHARE, Ranked
from budgetnet.train import STOPPED, Carry, train_run

MIN_LEG_SLICES = 1.0  # a leg trains each finalist at least one trial slice


@dataclass
class Race:
    """What a race decided: the winner, its leg's carry (None: it must start again) and the figures."""

    winner: object  # a FrozenTrial
    carry: Carry | None
    figures: dict


def plan(finalists: list[Ranked], seconds: float, slice_s: float) -> tuple[list[Ranked], float] | str:
    """The finalists that race and each one's leg (seconds), or why no race runs, in a line. Fewer racers
    are tried before none: each leg must be at least ``MIN_LEG_SLICES`` slices within ``RACE_SHARE``."""
    for k in range(len(finalists), 1, -1):
        leg = RACE_SHARE * seconds / k
        if leg >= MIN_LEG_SLICES * slice_s:
            return finalists[:k], leg
    if len(finalists) < 2:
        return "no other trial's config lies within the validation noise of the leader's"
    return (f"{RACE_SHARE:.0%} of the {seconds:.0f} s final phase shared by 2 finalists is under a "
            f"{slice_s:.0f} s trial slice each: a race would tell them apart no better than the search did")


def run(racers: list[Ranked], leg_s: float, data: DeviceData, seconds: float, *, study, seed: int,
        device: str, precision: str, compile, stop: Callable[[], bool], message: Callable[[str], None]) -> Race | None:
    """One leg of ``leg_s`` per racer on ``data`` (train and validation splits), their schedules set to the
    winner's whole run (``seconds`` of final time, less the losers' legs); the best validation accuracy
    wins. The race is kept in the study (``RACE``) leg by leg. None when ``stop()`` interrupted it."""
    horizon = seconds - (len(racers) - 1) * leg_s
    figures = {"finalists": [r.trial.number for r in racers], "leg_seconds": round(leg_s, 2),
               "horizon_seconds": round(horizon, 2), "legs": {}, "state": "racing"}
    A.RACE.set(study, figures)
    message(f"final race: trials {', '.join(str(r.trial.number) for r in racers)} lie within the validation "
            f"noise of each other; {leg_s:.0f} s each on the training split, then the leader goes on")
    carries: dict[int, Carry] = {}
    for r in racers:
        cfg = RunConfig.from_json(A.CONFIG.of(r.trial)).replace(seed=seed)
        ends = time.perf_counter() + leg_s
        result = train_run(cfg, data, device=device, seconds=horizon, precision=precision, compile=compile,
                           keep=True, stop=lambda ends=ends: stop() or time.perf_counter() >= ends)
        if stop():
            return None
        leg = {"seconds": round(result.seconds, 2), "steps": result.steps}
        if result.status == STOPPED and result.carry is not None:
            carries[r.trial.number] = result.carry
            leg.update({k: round(v, 5) for k, v in result.carry.score(data.val).items()})
        else:
            leg["failed"] = result.reason or result.status
        del result  # a leg's model and optimizer live on in ``carries`` only
        figures["legs"][str(r.trial.number)] = leg
        A.RACE.set(study, figures)
        message(f"final race: trial {r.trial.number}: " + (f"{leg['val_acc']:.4f} validation accuracy after "
                f"{leg['seconds']:.0f} s" if "val_acc" in leg else f"failed ({leg['failed']})"))
    if not carries:
        figures["state"] = "failed"
        A.RACE.set(study, figures)
        return Race(racers[0].trial, None, figures)
    number = max(carries, key=lambda n: figures["legs"][str(n)]["val_acc"])
    winner = next(r.trial for r in racers if r.trial.number == number)
    carry = carries.pop(number)
    carries.clear()  # the losers' models and optimizers leave the device
    gc.collect()
    figures.update(winner=number, state="decided")
    A.RACE.set(study, figures)
    return Race(winner, carry, figures)


def resumed(study, ranked_leader: int) -> tuple[int, bool, str] | None:
    """On a resumed final phase, the race an earlier run started: the trial to train (its winner if it was
    decided, else the ranking's leader), whether the race picked it, and the line that says so. None if no
    race was run."""
    figures = A.RACE.of(study)
    if not figures or figures.get("state") in (None, "skipped"):
        return None
    if figures.get("winner") is not None:
        return figures["winner"], True, (f"the race an earlier run held picked trial {figures['winner']}; "
                                         "its config trains from the start in the time left")
    figures = {**figures, "state": "interrupted"}
    A.RACE.set(study, figures)
    return ranked_leader, False, ("the race an earlier run started was interrupted before it was decided; "
                                  f"trial {ranked_leader} (the pick's leader) trains from the start in the time left")

