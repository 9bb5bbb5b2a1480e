"""Several local worker processes on one study (``--workers N``): the session, leases, the workers.

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

import optuna
from optuna.trial import TrialState

LEASE_INTERVAL_S = 2.0  # a worker renews its running trial's lease this often (seconds) ...
LEASE_TTL_S = 20.0  # ... to this far ahead: ten renewals may be missed (a loaded machine, a slow database)
LEASE_KEY = "budgetnet:lease_until"  # trial system attr: wall time (epoch seconds) the lease runs to
PID_KEY = "budgetnet:pid"  # trial system attr: the process that runs the trial ...
HOST_KEY = "budgetnet:host"  # ... and the machine it runs on


def new_session(study: optuna.Study, anchor: float, used_before: float, workers: int) -> str:
    """Record a new session of this study (the leader does, once per command); returns its id."""
    session = uuid.uuid4().hex[:12]
    for key, value in (("session", session), ("session_started_at", anchor),
                       ("session_used_before", used_before), ("workers", workers)):
        study.set_user_attr(key, value)
    return session


def fail_trial(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with ``reason``; False if it finished meanwhile (another process got there)."""
    try:
        storage.set_trial_user_attr(trial_id, "reason", reason)
        storage.set_trial_user_attr(trial_id, "state", "failed")
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
    """Fail RUNNING trials that no live process runs. ``stale_only``: only those whose lease has run out
    (or, without a lease yet, that started ``LEASE_TTL_S`` ago) and whose process is not alive on this
    machine; otherwise every one (a new session: no process of it has started a trial yet).
    ``match(trial)`` narrows the choice. Returns how many."""
    now, n = time.time(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if match is not None and not match(t):
            continue
        why = reason
        if stale_only:
            lapsed = lease_lapsed(t, now)
            if lapsed is None:
                continue
            why = (f"interrupted: worker {t.user_attrs.get('worker', '?')} (pid {t.system_attrs.get(PID_KEY, '?')})"
                   f" stopped renewing its lease (it ran out {lapsed:.0f} s ago)")
        n += fail_trial(study._storage, t._trial_id, why)
    return n


def lease_lapsed(trial: optuna.trial.FrozenTrial, now: float) -> float | None:
    """Seconds since a RUNNING trial's lease ran out (with no lease yet: ``LEASE_TTL_S`` after it started)
    when its process is not alive on this machine; None while something may still run it. Trials of the
    optuna backend only: Ray's hold no lease."""
    lease = trial.system_attrs.get(LEASE_KEY)
    start = trial.datetime_start.timestamp() if trial.datetime_start else now
    limit = lease if lease is not None else start + LEASE_TTL_S
    if now <= limit or alive_here(trial.system_attrs.get(PID_KEY), trial.system_attrs.get(HOST_KEY)):
        return None
    return now - limit


class Lease(threading.Thread):
    """Renews the lease of the trial this process runs (``hold``/``release``), every ``LEASE_INTERVAL_S``,
    from a daemon thread: the training loop's host syncs and evaluations do not delay it. With ``leader``
    (a pid), calls ``on_orphaned()`` once if that process is gone (a worker then stops)."""

    def __init__(self, storage: optuna.storages.BaseStorage, leader: int | None = None,
                 on_orphaned: Callable[[], None] | None = None):
        super().__init__(daemon=True, name="budgetnet-lease")
        self.storage, self.leader, self.on_orphaned = storage, leader, on_orphaned
        self.trial_id: int | None = None
        self._done = threading.Event()

    def hold(self, trial_id: int) -> None:
        self.storage.set_trial_system_attr(trial_id, PID_KEY, os.getpid())
        self.storage.set_trial_system_attr(trial_id, HOST_KEY, socket.gethostname())
        self._renew(trial_id)
        self.trial_id = trial_id

    def release(self) -> None:
        self.trial_id = None

    def _renew(self, trial_id: int) -> None:
        try:
            self.storage.set_trial_system_attr(trial_id, LEASE_KEY, round(time.time() + LEASE_TTL_S, 3))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # it finished between the check and the write

    def run(self) -> None:
        while not self._done.wait(LEASE_INTERVAL_S):
            trial_id = self.trial_id
            if trial_id is not None:
                try:
                    self._renew(trial_id)
                except Exception:  # noqa: BLE001 - a busy database: the next renewal tries again
                    pass
            if self.leader is not None and os.getppid() != self.leader and self.on_orphaned:
                self.on_orphaned()
                self.on_orphaned = None

    def stop(self) -> None:
        self._done.set()


def wait_ready(study: optuna.Study, session: str, leader: int, stop: Callable[[], bool] = lambda: False,
               poll_s: float = 0.2) -> dict | None:
    """A worker waits (after its own start-up) until the leader has probed the device and marked the
    session ``ready``; returns the study's attrs then, or None if the leader is gone or the study belongs
    to a newer session."""
    while True:
        attrs = study._storage.get_study_user_attrs(study._study_id)
        if attrs.get("session") != session or os.getppid() != leader or stop():
            return None
        if attrs.get("ready") == session:
            return attrs
        time.sleep(poll_s)


def split_resources(device: str, workers: int) -> None:
    """Give this process its share of the machine: ``1/workers`` of the CPU threads, or on a GPU of the
    device's memory (``set_per_process_memory_fraction``: an allocation past it is an out-of-memory error,
    which the trial records as PRUNED, state out of memory)."""
    import torch

    from budgetnet.device import set_memory_share

    if workers <= 1:
        return
    if str(device).startswith("cuda"):
        set_memory_share(device, 1.0 / workers)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


class Workers:
    """The leader's worker processes (indices 1..N-1; the leader is worker 0)."""

    def __init__(self, opts, study_name: str, n: int, session: str, mode: str = "text"):
        self.procs: dict[int, subprocess.Popen] = {}
        self.ended: dict[int, str] = {}
        opts_dict = dataclasses.asdict(opts)
        for index in range(1, n):
            spec = json.dumps({"opts": opts_dict, "study": study_name, "index": index, "workers": n,
                               "leader": os.getpid(), "session": session, "mode": mode})
            # A session of its own: a terminal's Ctrl-C reaches the leader only, which forwards it once.
            self.procs[index] = subprocess.Popen([sys.executable, "-m", "budgetnet.search.workers", spec],
                                                 start_new_session=True)

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
                fail_orphans(study, stale_only=False, match=lambda t, i=index: t.user_attrs.get("worker") == i,
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


def worker_main(spec: dict) -> int:
    """A worker process: join the leader's session and search until no full slice fits."""
    from budgetnet.search import runner

    opts_dict = spec["opts"]
    if opts_dict.get("grid") is not None:
        opts_dict["grid"] = tuple(opts_dict["grid"])
    opts = runner.SearchOptions(**opts_dict)
    return runner.run_worker(opts, spec["study"], spec["index"], spec["workers"], spec["leader"],
                             spec["session"], spec["mode"])


if __name__ == "__main__":
    from budgetnet.device import tune_cpu_allocator

    tune_cpu_allocator()
    try:
        sys.exit(worker_main(json.loads(sys.argv[1])))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the worker could install its handler
        sys.exit(130)
