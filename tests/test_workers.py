"""Several workers on one study: leases, the session clock, best.pt under concurrent writers, and two
local workers end to end (within budget, nothing lost, one final phase; kill -9 of one of them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

import budgetnet.search.workers as workers
from budgetnet.checkpoint import load_checkpoint
from budgetnet.config import DataConfig, RunConfig
from budgetnet.search.clock import Clock
from budgetnet.search.final import keep_if_best
from budgetnet.search.storage import make_storage
from budgetnet.train import COMPLETE, RunResult

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_live_lease_is_never_failed_and_a_lapsed_one_is(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(workers, "LEASE_INTERVAL_S", 0.05)
    monkeypatch.setattr(workers, "LEASE_TTL_S", 0.5)
    url = str(tmp_path / "s.log") if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=make_storage(url), direction="maximize")
    live, lapsed, fresh = study.ask(), study.ask(), study.ask()
    lease = workers.Lease(study._storage)
    lease.start()
    lease.hold(live._trial_id)
    study._storage.set_trial_system_attr(lapsed._trial_id, workers.LEASE_KEY, time.time() + 0.5)
    time.sleep(1.0)  # two TTLs: only a renewed lease is still good
    # ``fresh`` has no lease yet (its process is between ask and hold): judged by its start time, which
    # is a second old, against a 0.5 s TTL, so it goes too. A fresh one from a second process:
    other = optuna.load_study(study_name="s", storage=make_storage(url))
    newest = other.ask()
    assert workers.fail_orphans(other, stale_only=True) == 2
    lease.stop()
    states = {t.number: t for t in optuna.load_study(study_name="s", storage=make_storage(url)).trials}
    assert states[live.number].state == TrialState.RUNNING  # renewed by the thread: never failed
    assert states[newest.number].state == TrialState.RUNNING  # no lease yet, but only just started
    for t in (lapsed, fresh):
        failed = states[t.number]
        assert failed.state == TrialState.FAIL and failed.user_attrs["state"] == "failed"
        assert "stopped renewing its lease" in failed.user_attrs["reason"]
    assert not workers.fail_trial(study._storage, lapsed._trial_id, "again")  # already finished: no change


def test_a_lapsed_lease_is_failed_only_when_its_process_is_gone(tmp_path):
    """A lease lapses when its process stops renewing it: dead, or only suspended (Ctrl-Z on the leader,
    a laptop's sleep) or held up by a stalled database. Only a process that is gone (or a zombie, dead
    and not yet reaped) loses its trial; one alive on this machine keeps it, whatever its lease says. A
    process of another machine can only be judged by its lease."""
    import socket

    study = optuna.create_study(study_name="s", storage=make_storage(f"sqlite:///{tmp_path / 's.db'}"),
                                direction="maximize")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # gone and reaped
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    owners = {"suspended": (os.getpid(), socket.gethostname()), "dead": (ended.pid, socket.gethostname()),
              "zombie": (zombie.pid, socket.gethostname()), "elsewhere": (os.getpid(), "another-machine")}
    trials = {}
    for name, (pid, host) in owners.items():
        trials[name] = study.ask()
        for key, value in ((workers.PID_KEY, pid), (workers.HOST_KEY, host), (workers.LEASE_KEY, time.time() - 1)):
            study._storage.set_trial_system_attr(trials[name]._trial_id, key, value)
    deadline = time.time() + 30  # until the child has exited (it stays a zombie: nothing waits for it)
    while workers.alive_here(zombie.pid, socket.gethostname()) and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert workers.fail_orphans(study, stale_only=True) == 3
    finally:
        zombie.wait()
    states = {name: study._storage.get_trial(t._trial_id).state for name, t in trials.items()}
    assert states == {"suspended": TrialState.RUNNING, "dead": TrialState.FAIL, "zombie": TrialState.FAIL,
                      "elsewhere": TrialState.FAIL}


def test_a_trial_ended_by_another_worker_while_it_ran_leaves_its_worker_searching(tmp_path, synthetic_data,
                                                                                   monkeypatch):
    """Should another process fail a trial this one is running (as an orphan), the trial's next report
    cannot be written and Optuna refuses to tell it: the trial keeps the other's verdict, and this worker
    goes on with its next trial instead of ending the search with a traceback."""
    import budgetnet.search.objective as objective_mod
    from budgetnet.search.clock import Clock
    from budgetnet.search.options import SearchOptions
    from budgetnet.search.phase import Interrupt, search_phase
    from budgetnet.search.progress import Reporter
    from budgetnet.search.trial import TrialOutcome

    url = f"sqlite:///{tmp_path / 's.db'}"
    opts = SearchOptions(max_params=30_000, budget_seconds=100, dataset="synthetic", storage=url,
                                study_name="s", out=str(tmp_path / "best.pt"), device="cpu")
    study = optuna.create_study(study_name="s", storage=make_storage(url), direction="maximize")
    ran = []

    def run_trial(cfg, data, *, report, **kw):
        ran.append(1)
        if len(ran) == 1:  # another worker fails this trial as an orphan, then it reaches an evaluation mark
            running = study.get_trials(states=(TrialState.RUNNING,))[0]
            assert workers.fail_trial(study._storage, running._trial_id, "interrupted: worker 1 says so")
        report(0.1, 0.5)
        result = RunResult(COMPLETE, state_dict={"w": torch.zeros(2)}, seconds=1.0, steps=10, images_per_s=100.0)
        return TrialOutcome("complete", value=0.5 + 0.1 * len(ran), val_acc=0.5, n_params=1000, flops=1,
                            result=result)

    monkeypatch.setattr(objective_mod, "run_trial", run_trial)
    lines = __import__("io").StringIO()
    objective = objective_mod.Objective(opts, synthetic_data, Clock(100, 0, time.perf_counter(), study), 65, 3.0,
                                 Interrupt(), Reporter("json", lines), study)
    search_phase(study, objective, lambda extra=0.0: len(ran) < 3, Interrupt())
    assert len(ran) == 3
    first, *rest = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["reason"] == "interrupted: worker 1 says so"
    assert [t.state for t in rest] == [TrialState.COMPLETE] * 2
    assert "ended by another worker" in lines.getvalue()


def test_a_worker_still_running_past_the_deadline_is_killed_and_its_trial_failed(tmp_path):
    """A worker whose process hangs (a driver call that never returns, say) must not hold the leader's
    final phase past the budget: once overdue it is killed, its trial failed with the reason."""
    study = optuna.create_study(study_name="s", storage=make_storage(f"sqlite:///{tmp_path / 's.db'}"),
                                direction="maximize")
    stuck = study.ask()
    stuck.set_user_attr("worker", 1)
    pool = workers.Workers.__new__(workers.Workers)  # the leader's bookkeeping, over a process that never ends
    pool.procs, pool.ended = {1: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])}, {}
    notes, t0 = [], time.perf_counter()
    try:
        pool.wait(study, stop=lambda: False, note=notes.append, overdue=lambda: time.perf_counter() - t0 > 0.5)
    finally:
        pool.procs[1].kill()
    assert time.perf_counter() - t0 < 30 and pool.procs[1].returncode == -signal.SIGKILL
    assert any("still running past the search phase's deadline" in n for n in notes), notes
    failed = study._storage.get_trial(stuck._trial_id)
    assert failed.state == TrialState.FAIL and "killed by signal 9" in failed.user_attrs["reason"]


def test_a_worker_clock_counts_from_the_session_anchor():
    leader = Clock(100.0, 12.0, time.perf_counter() - 3.0)  # 12 s from earlier runs, 3 s of this one
    joined = Clock.from_anchor(100.0, 12.0, leader.anchor())
    assert joined.used() == pytest.approx(leader.used(), abs=0.05) and leader.used() == pytest.approx(15.0, abs=0.5)


def test_best_pt_keeps_the_best_of_concurrent_writers_and_never_replaces_a_final_model(tmp_path):
    out = str(tmp_path / "best.pt")
    cfg = RunConfig(data=DataConfig(dataset="synthetic"))
    values = [0.31, 0.77, 0.12, 0.64, 0.5, 0.7, 0.2, 0.45]

    def write(i: int) -> None:
        result = RunResult(COMPLETE, state_dict={"w": torch.full((2,), float(i))}, seconds=1.0)
        keep_if_best(out, "s", i, cfg, result, values[i], 10, 20, ["a", "b"])

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(values))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ckpt = load_checkpoint(out)
    assert ckpt["metrics"]["val_acc"] == max(values) and ckpt["extra"]["trial"] == values.index(max(values))
    assert torch.equal(ckpt["state_dict"]["w"], torch.full((2,), float(values.index(max(values)))))
    assert sorted(os.listdir(tmp_path)) == ["best.pt"]  # no temp or lock file left behind
    # a final model is never replaced by a search one, however good
    from budgetnet.checkpoint import save_checkpoint

    save_checkpoint(out, cfg, {"w": torch.zeros(2)}, metrics={}, n_params=10, flops=20, classes=["a", "b"],
                    train_seconds=1.0, precision="fp32", extra={"phase": "final", "study": "s", "trial": 1})
    assert not keep_if_best(out, "s", 9, cfg, RunResult(COMPLETE, state_dict={"w": torch.ones(2)}), 0.99, 10, 20,
                            ["a", "b"])
    assert load_checkpoint(out)["extra"]["phase"] == "final"


def _cli(tmp_path, storage: str, budget_s: float, slice_s: float, *extra) -> list[str]:
    return [sys.executable, "-m", "budgetnet", "search", "--dataset", "synthetic", "--max-params", "30k",
            "--hours", f"{budget_s / 3600:.6f}", "--trial-seconds", f"{slice_s:.2f}", "--storage", storage,
            "--artifact-dir", str(tmp_path / "art"), "--out", str(tmp_path / "best.pt"), "--device", "cpu",
            "--json", "--workers", "2", "--no-warm-start", *extra]


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _study(url: str) -> optuna.Study:
    storage = make_storage(url)
    return optuna.load_study(study_name=storage.get_all_studies()[0].study_name, storage=storage)


def _assert_one_final_phase(tmp_path, events: list[dict], study: optuna.Study) -> None:
    finals = [e for e in events if e.get("text", "").startswith("final training")]
    assert len(finals) == 1 and study.user_attrs["final_runs"] == 1 and study.user_attrs["final_done"]
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["extra"]["phase"] == "final" and ckpt["n_params"] <= 30_000
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # nothing half-written


@pytest.mark.timing
@pytest.mark.slow
def test_two_workers_on_one_study_within_budget_and_kill_9_of_one(tmp_path, slice_s):
    """The issue's two scenarios in one run (CI time): two local workers share one study under one
    budget, and a kill -9 of one of them mid-search fails its trial with the reason while the other goes
    on; nothing completed is lost, and there is one final phase and one best.pt."""
    # 48 s with 3 s slices: 70% of it for the search, where start-up (imports, data, the workers' own
    # start-up) took up to 18 s on a loaded 2-core machine, leaving a few slices after worker 1 starts
    budget = 16 * slice_s
    url = f"sqlite:///{tmp_path / 's.db'}"  # the default kind of storage, which optuna-dashboard reads
    # A grid of small nets, unpruned: grid trials are never stopped for speed, so on a loaded machine too
    # every trial that is not killed completes (no speed probe either: quicker start-up).
    (tmp_path / "grid.json").write_text(json.dumps(
        {"base": {"model": {"family": "plain", "n_conv": 2, "hidden": [16]}, "train": {"batch_size": 64}},
         "grid": {"model.width": [4, 5, 6, 7, 8, 10], "train.lr": [0.02, 0.03, 0.05, 0.07, 0.1, 0.2]}}))  # never used up
    cmd = _cli(tmp_path, url, budget, slice_s, "--sampler", "grid", "--grid", str(tmp_path / "grid.json"),
               "--pruner", "none", "--final-fraction", "0.3")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))

    def running_on_worker_1():
        try:
            return [t for t in _study(url).get_trials(states=(TrialState.RUNNING,))
                    if t.user_attrs.get("worker") == 1 and workers.PID_KEY in t.system_attrs]
        except Exception:  # noqa: BLE001 - the database may be mid-creation
            return []

    end = time.time() + 60 + budget
    while not (victims := running_on_worker_1()) and time.time() < end and proc.poll() is None:
        time.sleep(0.2)
    assert victims, "worker 1 never ran a trial"
    time.sleep(0.3 * slice_s)  # mid-trial
    os.kill(victims[0].system_attrs[workers.PID_KEY], signal.SIGKILL)
    killed_at = time.time()
    out, err = proc.communicate(timeout=120 + budget)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, err
    events = _events(out)
    summary = events[-1]
    assert summary["event"] == "summary" and summary["workers"] == 2
    # one global deadline: the command (both workers, the final phase) within the budget, the promised
    # overshoot and the start-up of two interpreters
    assert wall <= budget + max(0.01 * budget, 15.0) + 5.0
    assert summary["seconds_used"] <= budget + max(0.01 * budget, 15.0)
    study = _study(url)
    # the killed trial is failed, with the reason, at once (the leader saw its worker die)
    assert any("worker 1" in e.get("text", "") and "killed by signal 9" in e.get("text", "") for e in events)
    killed = study.trials[victims[0].number]
    assert killed.state == TrialState.FAIL and "worker 1" in killed.user_attrs["reason"]
    assert "killed by signal 9" in killed.user_attrs["reason"]
    # no live trial was failed by the other worker; none is left RUNNING
    assert [t for t in study.trials if t.state == TrialState.FAIL] == [killed]
    assert not study.get_trials(states=(TrialState.RUNNING,))
    # both searched the one study, and the other went on after the kill
    assert {t.user_attrs.get("worker") for t in study.trials} == {0, 1}
    later = [t for t in study.trials if t.datetime_start and t.datetime_start.timestamp() > killed_at]
    timeline = [(t.number, t.user_attrs.get("worker"), t.state.name, round(t.datetime_start.timestamp() - killed_at, 1))
                for t in study.trials]
    assert later and all(t.user_attrs.get("worker") == 0 for t in later), (timeline, slice_s)
    # no completed trial lost: every trial line that said complete is COMPLETE with its value
    by_number = {t.number: t for t in study.trials}
    for e in (e for e in events if e["event"] == "trial" and e["state"] == "complete"):
        assert by_number[e["number"]].state == TrialState.COMPLETE and by_number[e["number"]].value == e["val_acc"]
    _assert_one_final_phase(tmp_path, events, study)


def test_the_trial_function_knows_no_backend():
    """``search/trial.py`` and every budgetnet module it imports (``train.py`` among them) import neither
    optuna nor ray: the one trial serves any backend. Read from the sources, transitively."""
    import ast
    from pathlib import Path

    import budgetnet

    root = Path(budgetnet.__file__).parent.parent
    seen, todo, external = set(), ["budgetnet.search.trial"], set()
    while todo:
        name = todo.pop()
        path = root / (name.replace(".", "/") + ".py")
        if name in seen or not path.exists():
            if not path.exists() and (root / name.replace(".", "/") / "__init__.py").exists():
                todo.append(name + ".__init__")
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for n in names:
                (todo.append(n) if n.startswith("budgetnet") else external.add(n.split(".")[0]))
    assert {"budgetnet.train", "budgetnet.search.trial"} <= seen
    assert not external & {"optuna", "ray"}, sorted(external)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_workers_on_cuda_take_their_share_of_the_device_memory():
    # the first GPU run of --workers 2 died here: torch refuses torch.device("cuda") without an index
    from budgetnet.search.workers import split_resources

    split_resources("cuda", 4)
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(int(0.3 * total), dtype=torch.uint8, device="cuda")
    from budgetnet.device import set_memory_share

    set_memory_share("cuda", 1.0)
