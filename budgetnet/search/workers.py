"""Several local worker processes on one study (``--workers N``): the session, leases, the processes.

Rules (docs/search.md, "Several workers"):
- **One session per command.** The command's process is the leader. At start it records the session in
  the study (``session``, ``session_started_at``: the wall time at which the session had used
  ``session_used_before`` seconds of budget). Every worker counts budget time from that anchor
  (``Clock.from_anchor``), so there is one global deadline and ``seconds_used`` is the session's time
  whichever process saves it; a resume starts a new session from the last saved ``seconds_used``.
- **Leases.** While a process trains a trial, a daemon thread renews the trial's lease (a system attr:
  a wall time ``LEASE_TTL_S`` ahead) every ``LEASE_INTERVAL_S``. Before each trial every worker fails
  the RUNNING trials whose lease has run out and whose process is gone; a live worker's trial is never
  failed by another, even when its lease lapsed because the process was suspended (Ctrl-Z, a laptop's
  sleep) or the database stalled. The leader also fails a dead worker's trial as soon as it sees the
  process end, with its exit status.
- **One leader.** Only the leader probes, writes the session, waits for every worker, and runs the final
  phase and its ``best.pt`` write; workers end when no full slice fits, or when their leader is gone.
- **Resources.** Each process gets ``1/N`` of the CPU threads, or of the GPU's memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from budgetnet.device import set_memory_share
from budgetnet.search import attrs as A
from budgetnet.search.attrs import HOST_KEY, LEASE_KEY, PID_KEY, State
from budgetnet.search.storage import fresh_study_attrs, storage_of, trial_id

LEASE_INTERVAL_S = 2.0  # a worker renews its running trial's lease this often (seconds) ...
LEASE_TTL_S = 20.0  # ... to this far ahead: ten renewals may be missed (a loaded machine, a slow database)
SWEEP_EVERY = 2  # renewals between two looks for orphaned trials (a joiner's or worker's killed process)


def new_session(study: optuna.Study, anchor: float, used_before: float, opts) -> str:
    """Record a new session of this study, led by this process, with its lease and its budget cut (the
    leader does, once per command, while it holds ``storage.exclusive``); returns its id."""
    session = uuid.uuid4().hex[:12]
    plan = {"budget_seconds": opts.budget_seconds, "final_fraction": opts.final_fraction,
            "final_auto": opts.final_auto}
    for attr, value in ((A.SESSION, session), (A.SESSION_STARTED_AT, anchor),
                        (A.SESSION_USED_BEFORE, used_before), (A.WORKERS, opts.workers),
                        (A.SESSION_PID, os.getpid()), (A.SESSION_HOST, socket.gethostname()),
                        (A.SESSION_OUT, str(Path(opts.out).absolute())), (A.SESSION_BACKEND, opts.backend),
                        (A.PLAN, plan), (A.SESSION_LEASE, round(time.time() + LEASE_TTL_S, 3))):
        attr.set(study, value)
    return session


def live_session(attrs: dict, now: float | None = None) -> bool:
    """Whether the study (its ``attrs``) has a live session: its lease renewed within ``LEASE_TTL_S`` by a
    leader that is alive where this machine can see it (a leader on another machine: its lease alone)."""
    lease = A.SESSION_LEASE.of(attrs)
    if lease is None or (time.time() if now is None else now) > lease:
        return False
    pid, host = A.SESSION_PID.of(attrs), A.SESSION_HOST.of(attrs)
    return host != socket.gethostname() or alive_here(pid, host)


def session_owner(attrs: dict) -> str:
    """The session's leader, as said to the user: pid and machine."""
    return f"pid {A.SESSION_PID.of(attrs, '?')} on {A.SESSION_HOST.of(attrs, '?')}"


def fail_trial(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with ``reason``; False if it finished meanwhile (another process got there)."""
    try:
        A.REASON.set_in(storage, trial_id, reason)
        A.STATE.set_in(storage, trial_id, State.FAILED)
        return storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def alive_here(pid: int | None, host: str | None) -> bool:
    """Whether process ``pid`` of machine ``host`` is alive, as far as this machine can tell: False for
    another machine's process (only its lease speaks for it), a process that is gone, or a zombie (dead,
    not yet reaped by its parent)."""
    if pid is None or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def fail_orphans(study: optuna.Study, *, stale_only: bool, match: Callable | None = None,
                 reason: str = "interrupted: its process ended") -> int:
    """Fail RUNNING trials that no live process runs. ``stale_only``: only those whose process is seen dead
    on this machine, or whose lease has run out (without a lease yet: ``LEASE_TTL_S`` after it started)
    and whose process is not alive here. Otherwise every one but those a live lease holds (a new session:
    a joining command of the last one may still run its trial). ``match(trial)`` narrows the choice.
    Returns how many."""
    now, n = time.time(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if match is not None and not match(t):
            continue
        why = reason
        if stale_only:
            why = orphaned(t, now)
            if why is None:
                continue
        elif lease_held(t, now):
            continue
        n += fail_trial(storage_of(study), trial_id(t), why)
    return n


def _runner(trial: optuna.trial.FrozenTrial) -> str:
    joined = A.JOINED.of(trial)
    return f"worker {A.WORKER.of(trial, '?')}" + (f" of the command {joined}" if joined else "")


def orphaned(trial: optuna.trial.FrozenTrial, now: float) -> str | None:
    """Why no process runs a RUNNING trial any more (its process seen dead here, or its lease run out and
    its process not alive here), or None while one may still run it."""
    pid, host = PID_KEY.of(trial), HOST_KEY.of(trial)
    if pid is not None and host == socket.gethostname() and not alive_here(pid, host):
        return f"interrupted: {_runner(trial)} (pid {pid}) ended"
    lapsed = lease_lapsed(trial, now)
    if lapsed is None:
        return None
    return (f"interrupted: {_runner(trial)} (pid {PID_KEY.of(trial, '?')}) stopped renewing its lease "
            f"(it ran out {lapsed:.0f} s ago)")


def lease_held(trial: optuna.trial.FrozenTrial, now: float) -> bool:
    """Whether a live process may hold a RUNNING trial: its lease not run out, and its process alive here or
    on another machine."""
    lease, pid, host = LEASE_KEY.of(trial), PID_KEY.of(trial), HOST_KEY.of(trial)
    return lease is not None and now <= lease and (host != socket.gethostname() or alive_here(pid, host))


def lease_lapsed(trial: optuna.trial.FrozenTrial, now: float) -> float | None:
    """Seconds since a RUNNING trial's lease ran out (with no lease yet: ``LEASE_TTL_S`` after it started)
    when its process is not alive on this machine; None while something may still run it. Trials of the
    optuna backend only: Ray's hold no lease."""
    lease = LEASE_KEY.of(trial)
    start = trial.datetime_start.timestamp() if trial.datetime_start else now
    limit = lease if lease is not None else start + LEASE_TTL_S
    if now <= limit or alive_here(PID_KEY.of(trial), HOST_KEY.of(trial)):
        return None
    return now - limit


class Lease(threading.Thread):
    """Renews the lease of the trial this process runs (``hold``/``release``), every ``LEASE_INTERVAL_S``,
    from a daemon thread: the training loop's host syncs and evaluations do not delay it. With ``leader``
    (a pid), calls ``on_orphaned()`` once if that process is gone (a worker then stops). With ``study``, it
    also fails the study's orphaned trials every ``SWEEP_EVERY`` renewals (a killed joiner's trial goes
    within one lease, whatever this process is busy with), and with ``session`` (its id: the leader's) it
    renews the session's lease while that session is still the study's."""

    def __init__(self, storage: optuna.storages.BaseStorage, leader: int | None = None,
                 on_orphaned: Callable[[], None] | None = None, study: optuna.Study | None = None,
                 session: str | None = None):
        super().__init__(daemon=True, name="budgetnet-lease")
        self.storage, self.leader, self.on_orphaned = storage, leader, on_orphaned
        self.study, self.session = study, session
        self.trial_id: int | None = None
        self._done = threading.Event()

    def hold(self, trial_id: int) -> None:
        PID_KEY.set_in(self.storage, trial_id, os.getpid())
        HOST_KEY.set_in(self.storage, trial_id, socket.gethostname())
        self._renew(trial_id)
        self.trial_id = trial_id

    def release(self) -> None:
        self.trial_id = None

    def _renew(self, trial_id: int) -> None:
        try:
            LEASE_KEY.set_in(self.storage, trial_id, round(time.time() + LEASE_TTL_S, 3))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # it finished between the check and the write

    def run(self) -> None:
        beats = 0
        while not self._done.wait(LEASE_INTERVAL_S):
            beats += 1
            try:  # a busy database: the next beat tries again
                if (trial_id := self.trial_id) is not None:
                    self._renew(trial_id)
                if self.session is not None:
                    self.renew_session()
                if self.study is not None and beats % SWEEP_EVERY == 0:
                    fail_orphans(self.study, stale_only=True)
            except Exception:  # noqa: BLE001
                pass
            if self.leader is not None and os.getppid() != self.leader and self.on_orphaned:
                self.on_orphaned()
                self.on_orphaned = None

    def renew_session(self) -> None:
        """Push the session's lease ``LEASE_TTL_S`` ahead, unless a newer session owns the study."""
        attrs = fresh_study_attrs(self.study)
        if A.SESSION.of(attrs) == self.session:
            A.SESSION_LEASE.set(self.study, round(time.time() + LEASE_TTL_S, 3))

    def stop(self, release: bool = False) -> None:
        """Stop renewing; ``release``: end the session's lease now (the command is over), so that the next
        command leads at once instead of waiting for it to run out."""
        self._done.set()
        if release and self.session is not None:
            try:
                if A.SESSION.of(fresh_study_attrs(self.study)) == self.session:
                    A.SESSION_LEASE.set(self.study, 0.0)
            except Exception:  # noqa: BLE001 - an unreachable database: the lease runs out on its own
                pass


def wait_ready(study: optuna.Study, session: str, gone: Callable[[dict], bool],
               stop: Callable[[], bool] = lambda: False, poll_s: float = 0.2) -> dict | None:
    """A worker or a joining command waits (after its own start-up) until the leader has probed the device
    and marked the session ``ready``; returns the study's attrs then, or None if ``gone(attrs)`` (the
    leader is), the study belongs to a newer session, or a stop."""
    while True:
        attrs = fresh_study_attrs(study)
        if A.SESSION.of(attrs) != session or gone(attrs) or stop():
            return None
        if A.READY.of(attrs) == session:
            return attrs
        time.sleep(poll_s)


def split_resources(device: str, workers: int) -> None:
    """Give this process its share of the machine: ``1/workers`` of the CPU threads, or on a GPU of the
    device's memory (``set_per_process_memory_fraction``: an allocation past it is an out-of-memory error,
    which the trial records as PRUNED, state out of memory)."""
    if workers <= 1:
        return
    if str(device).startswith("cuda"):
        set_memory_share(device, 1.0 / workers)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


def _ran_on(trial: optuna.trial.FrozenTrial, index: int, pid: int, joined: str | None) -> bool:
    """Whether ``trial`` is (or was to be) run by worker ``index`` (process ``pid``) of this command
    (``joined``: its id when it joined another's session)."""
    if PID_KEY.of(trial) is not None:
        return PID_KEY.of(trial) == pid and HOST_KEY.of(trial) == socket.gethostname()
    return A.WORKER.of(trial) == index and A.JOINED.of(trial) == joined


class Workers:
    """A command's worker processes (indices 1..N-1; the command's own process is worker 0). ``joined``:
    the command's id when it joined another command's session (its workers' trials say so)."""

    joined: str | None = None

    def __init__(self, opts, study_name: str, n: int, session: str, mode: str = "text", joined: str | None = None):
        self.procs: dict[int, subprocess.Popen] = {}
        self.ended: dict[int, str] = {}
        self.joined = joined
        opts_dict = dataclasses.asdict(opts)
        for index in range(1, n):
            spec = json.dumps({"opts": opts_dict, "study": study_name, "index": index, "workers": n,
                               "leader": os.getpid(), "session": session, "mode": mode, "joined": joined})
            # A session of its own: a terminal's Ctrl-C reaches the leader only, which forwards it once.
            # the spec on stdin, not argv: a --storage password must not show in another user's ps
            proc = subprocess.Popen([sys.executable, "-m", "budgetnet.search.worker"], stdin=subprocess.PIPE,
                                    text=True, start_new_session=True)
            proc.stdin.write(spec)
            proc.stdin.close()
            self.procs[index] = proc

    def signal(self, signum: int) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    def reap(self, study: optuna.Study) -> list[str]:
        """Note workers that have ended; fail the trial a dead one left RUNNING, at once, with its exit."""
        notes = []
        for index, p in self.procs.items():
            if index in self.ended or p.poll() is None:
                continue
            how = (f"was killed by signal {-p.returncode}" if p.returncode < 0
                   else f"exited with status {p.returncode}")
            self.ended[index] = how
            if p.returncode != 0:
                fail_orphans(study, stale_only=False, match=lambda t, i=index, pid=p.pid: _ran_on(t, i, pid, self.joined),
                             reason=f"interrupted: worker {index} (pid {p.pid}) {how}")
                notes.append(f"worker {index} (pid {p.pid}) {how}; the search goes on")
        return notes

    def wait(self, study: optuna.Study, stop: Callable[[], bool], note: Callable[[str], None],
             overdue: Callable[[], bool] = lambda: False) -> None:
        """Wait for every worker to end (they stop when no full slice fits), forwarding a stop once. A worker
        still running once ``overdue()`` (its trials stop themselves well before) is stuck: it is killed,
        and its trial failed, so that it cannot hold the final phase past the budget."""
        forwarded = killed = False
        while len(self.ended) < len(self.procs):
            if stop() and not forwarded:
                self.signal(signal.SIGINT)
                forwarded = True
            if not killed and overdue():
                for index, p in self.procs.items():
                    if index not in self.ended and p.poll() is None:
                        note(f"worker {index} (pid {p.pid}) is still running past the search phase's deadline; "
                             "killing it")
                self.signal(signal.SIGKILL)
                killed = True
            for line in self.reap(study):
                if not forwarded:  # after a stop, an exit status is the stop's, not news
                    note(line)
            time.sleep(0.2)
