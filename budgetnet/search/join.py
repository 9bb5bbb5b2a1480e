"""A second command on a live study joins its session (docs/search.md, "Several commands on one study").

One study, one session, one leader: the command that opened the session. A command that finds the
study's session live (``workers.live_session``) joins it instead of resuming it. It takes everything
from the session: its budget cut and deadline, its slice, precision and probe's figures. It never fails a
live trial, never runs the final phase and never writes its ``--out``: a model of its that beats the
study's best goes to the study as an artifact of its trial (``final.keep_artifact_if_best``), from which
the leader writes ``best.pt`` wherever it runs (``final.restore_best``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from budgetnet.config import ConfigError
from budgetnet.search import attrs as A
from budgetnet.search.options import SearchOptions
from budgetnet.search.storage import fresh_study_attrs
from budgetnet.search.workers import lease_held, live_session, session_owner

JOIN_POLL_S = 0.5  # how often a joiner looks whether the leader's probe is done


class CannotJoin(ConfigError):
    """A live session this command cannot join (another backend): a user mistake, one line."""


def joiner_id() -> str:
    """This command's id among the session's commands: its machine and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def joiner_options(opts: SearchOptions, attrs: dict) -> tuple[SearchOptions, list[str]]:
    """``opts`` as the session's joiner runs them: the session's budget cut, and a seed of its own (the
    leader's seed would propose the leader's start-up points again). Also the lines that say what the
    session changed."""
    if A.SESSION_BACKEND.of(attrs, "optuna") != "optuna" or opts.backend != "optuna":
        raise CannotJoin(f"study {opts.study_name!r} is being searched by the command ({session_owner(attrs)}) "
                         f"with --backend {A.SESSION_BACKEND.of(attrs)}; only an optuna-backend session can be "
                         "joined: add workers to its Ray cluster instead (--ray-address), or wait for it to end")
    plan = A.PLAN.of(attrs) or {}
    budget = float(plan.get("budget_seconds", A.BUDGET_SECONDS.of(attrs, opts.budget_seconds)))
    joined = dataclasses.replace(opts, budget_seconds=budget,
                                 final_fraction=float(plan.get("final_fraction", opts.final_fraction)),
                                 final_auto=bool(plan.get("final_auto", opts.final_auto)),
                                 seed=opts.seed + 1000 * (1 + os.getpid() % 100_000))
    notes = []
    if not math.isclose(budget, opts.budget_seconds):
        notes.append(f"note: the session's budget ({budget:.0f} s) holds, not this command's "
                     f"({opts.budget_seconds:.0f} s)")
    return joined, notes


def shared_artifact_dir(attrs: dict, own: str) -> str:
    """Where a joiner stores its models: the leader's artifact folder when this machine can write to it (the
    same machine, or a shared filesystem), so that the leader and its dashboard find them; its own else."""
    leader = A.ARTIFACT_DIR.of(attrs)
    if leader and Path(leader).is_dir() and os.access(leader, os.W_OK | os.X_OK):
        return leader
    return own


def joining_line(study: optuna.Study, attrs: dict) -> str:
    return (f"joining study {study.study_name!r}: its session is live (leader {session_owner(attrs)}); this "
            f"command adds trials until the session's search phase ends, and its leader writes best.pt to "
            f"{A.SESSION_OUT.of(attrs, '?')}")


def wait_for_others(study: optuna.Study, until: float, clock, stop) -> None:
    """The leader's wait, at its search phase's end, for the trials other commands still run (their slices
    end by the deadline ``until``, in budget seconds): the best is picked with their results in."""
    while not stop() and clock.used() < until:
        now = time.time()
        if not any(lease_held(t, now) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
            return
        clock.tick()
        time.sleep(JOIN_POLL_S)


def joined_summary(study: optuna.Study, opts: SearchOptions, joined: str, used: float,
                   interrupted: bool) -> dict:
    """What a joiner added to the study, and where its leader writes ``best.pt``: the summary it returns."""
    attrs = fresh_study_attrs(study)
    mine = [t for t in study.get_trials(deepcopy=False) if A.JOINED.of(t) == joined]
    complete = [t for t in mine if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    live = live_session(attrs)
    return {"study": study.study_name, "joined": joined, "session": A.SESSION.of(attrs),
            "leader": session_owner(attrs), "leader_live": live, "leader_out": A.SESSION_OUT.of(attrs),
            "trials_added": len(mine), "complete_added": len(complete),
            "best_added_trial": best.number if best else None, "best_added_val_acc": best.value if best else None,
            "seconds_used": used, "budget_seconds": opts.budget_seconds, "interrupted": interrupted,
            "checkpoint": None}


def joined_line(summary: dict) -> str:
    """The joiner's closing line."""
    best = (f"; its best, trial {summary['best_added_trial']}, {summary['best_added_val_acc']:.4f} val acc"
            if summary["best_added_trial"] is not None else "")
    where = (f"its leader ({summary['leader']}) runs the final phase and writes best.pt to {summary['leader_out']}"
             if summary["leader_live"] else
             f"its leader ({summary['leader']}) is gone: run that command again to resume the final phase, which "
             f"writes best.pt")
    return (f"joined study {summary['study']!r}: this command ran {summary['trials_added']} trials "
            f"({summary['complete_added']} complete{best}); {where}")
