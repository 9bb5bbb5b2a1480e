"""Several commands on one study (issue "One study, many commands"): a command that finds the study's session
live joins it. Two or three real ``budgetnet search`` processes, each in its own working folder with its own
``--out`` and ``--artifact-dir`` (as separate machines would have), on PostgreSQL, SQLite and a journal
file; and the parts (who leads, the artifact, the restore) on their own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import optuna
import pytest
import torch
from optuna.trial import TrialState

import budgetnet.search.workers as workers
from budgetnet.checkpoint import load_checkpoint
from budgetnet.config import DataConfig, RunConfig
from budgetnet.search import attrs as A
from budgetnet.search.final import keep_artifact_if_best, restore_best
from budgetnet.search.progress import Reporter
from budgetnet.search.storage import make_storage, stored_study_attrs
from budgetnet.train import COMPLETE, RunResult

optuna.logging.set_verbosity(optuna.logging.WARNING)
OVERSHOOT_S = 15.0  # the budget's promised overshoot at these budgets (docs/search.md): max(1%, 15 s)
START_UP_S = 10.0  # interpreters, imports and data of a command on a loaded 2-core machine


@pytest.fixture(params=["postgres", "sqlite", "journal"])
def storage_url(request, tmp_path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 's.db'}" if request.param == "sqlite" else str(tmp_path / "s.log")


def _grid(tmp_path) -> str:
    """Small nets, never used up, unpruned: every trial not killed completes, even on a loaded machine."""
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(
        {"base": {"model": {"family": "plain", "n_conv": 2, "hidden": [16]}, "train": {"batch_size": 64}},
         "grid": {"model.width": [4, 5, 6, 7, 8, 10], "train.lr": [0.02, 0.03, 0.05, 0.07, 0.1, 0.2]}}))
    return str(path)


def _start(folder, url: str, study: str, budget_s: float, slice_s: float, grid: str,
           final_fraction: float = 0.3) -> subprocess.Popen:
    """One ``budgetnet search`` in its own working folder, as on its own machine."""
    folder.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "budgetnet", "search", "--dataset", "synthetic", "--max-params", "30k",
           "--hours", f"{budget_s / 3600:.6f}", "--trial-seconds", f"{slice_s:.2f}", "--storage", url,
           "--study-name", study, "--out", "best.pt", "--device", "cpu", "--json", "--no-warm-start",
           "--sampler", "grid", "--grid", grid, "--pruner", "none", "--final-fraction", str(final_fraction)]
    return subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(url))


def _wait_for(what, timeout_s: float, proc: subprocess.Popen | None = None):
    end = time.time() + timeout_s
    while time.time() < end and (proc is None or proc.poll() is None):
        try:
            found = what()
        except Exception:  # noqa: BLE001 - the study may be mid-creation
            found = None
        if found:
            return found
        time.sleep(0.2)
    return None


def _session_ready(url: str, name: str):
    attrs = stored_study_attrs(url, name)
    return attrs if attrs and A.READY.of(attrs) and A.READY.of(attrs) == A.SESSION.of(attrs) else None


def _running_of(url: str, name: str, pid: int) -> list:
    return [t for t in _study(url, name).get_trials(states=(TrialState.RUNNING,))
            if workers.PID_KEY.of(t) == pid]


def _finish(proc: subprocess.Popen, timeout_s: float) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    assert "Traceback" not in err, err
    return out, err


@pytest.mark.timing
@pytest.mark.slow
def test_joined_commands_share_one_budget_and_one_final_phase_and_a_killed_joiner_loses_only_its_trial(
        tmp_path, storage_url, slice_s):
    """Leader, a joiner and a joiner killed with SIGKILL mid-trial, each from its own folder: one budget for
    all, one final phase and one best.pt (the leader's), nothing RUNNING left, no traceback; the killed
    joiner's trial is failed with the reason within one lease while the others go on."""
    budget = 12 * slice_s
    name, grid = f"twin-{uuid.uuid4().hex[:6]}", _grid(tmp_path)
    t0 = time.perf_counter()
    leader = _start(tmp_path / "a", storage_url, name, budget, slice_s, grid)
    assert _wait_for(lambda: _session_ready(storage_url, name), 60, leader), leader.communicate()
    joiner = _start(tmp_path / "b", storage_url, name, budget, slice_s, grid)
    victim = _start(tmp_path / "c", storage_url, name, budget, slice_s, grid)
    running = _wait_for(lambda: [t for t in _running_of(storage_url, name, victim.pid) if A.JOINED in t.user_attrs],
                        60 + budget, victim)
    assert running, "the joiner to be killed never ran a trial"
    assert running[0].user_attrs[A.JOINED] == f"{socket.gethostname()}:{victim.pid}"
    time.sleep(0.3 * slice_s)  # mid-trial
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    victim.communicate()
    out_j, _ = _finish(joiner, 60 + budget)
    out_l, _ = _finish(leader, 60 + budget)
    wall = time.perf_counter() - t0
    assert leader.returncode == 0 and joiner.returncode == 0
    # one budget for all: the leader's clock, and the wall time of every command together
    summary = _events(out_l)[-1]
    assert summary["event"] == "summary" and summary["seconds_used"] <= budget + OVERSHOOT_S
    assert wall <= budget + OVERSHOOT_S + START_UP_S
    joined = _events(out_j)[-1]
    assert joined["event"] == "joined" and joined["trials_added"] >= 1 and joined["leader_live"]
    assert joined["leader_out"] == str((tmp_path / "a" / "best.pt").absolute())
    # one final phase, one best.pt: the leader's, a final model
    study = _study(storage_url, name)
    assert study.user_attrs["final_runs"] == 1 and study.user_attrs["final_done"]
    assert not any(e.get("text", "").startswith("final training") for e in _events(out_j))
    assert load_checkpoint(tmp_path / "a" / "best.pt")["extra"]["phase"] == "final"
    assert not (tmp_path / "b" / "best.pt").exists() and not (tmp_path / "c" / "best.pt").exists()
    # the killed joiner's trial failed with the reason within one lease; none left RUNNING, none else failed
    killed = study.trials[running[0].number]
    assert killed.state == TrialState.FAIL and f"pid {victim.pid}" in killed.user_attrs["reason"]
    assert killed.datetime_complete.timestamp() - killed_at <= workers.LEASE_TTL_S
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert [t.number for t in study.trials if t.state == TrialState.FAIL] == [killed.number]
    # both live commands searched the one study, and went on after the kill
    by = {t.user_attrs.get(A.JOINED) for t in study.trials}
    assert None in by and f"{socket.gethostname()}:{joiner.pid}" in by
    assert any(t.datetime_start.timestamp() > killed_at for t in study.trials if t.state == TrialState.COMPLETE)
    # every study-best model is an artifact in the leader's folder, which the joiners reach here
    folders = {t.user_attrs[A.MODEL_ARTIFACT]["dir"] for t in study.trials if A.MODEL_ARTIFACT in t.user_attrs}
    assert folders == {str((tmp_path / "a" / "studies" / "artifacts").absolute())}


@pytest.mark.timing
@pytest.mark.slow
def test_a_killed_leader_leaves_its_joiner_to_the_deadline_and_its_command_run_again_runs_the_final_phase(
        tmp_path, postgres_url, slice_s):
    """kill -9 of the leader: the joiner searches on to the session's deadline and ends saying the leader is
    gone; the leader's command run again resumes the study (past its search phase) into the final phase."""
    # half the budget for the final phase: a resumed process trains it cold (its first steps pay torch's
    # one-off costs), and a few seconds would not fit its data
    budget, url, final = 12 * slice_s, postgres_url, 0.5
    name, grid = f"lead-{uuid.uuid4().hex[:6]}", _grid(tmp_path)
    leader = _start(tmp_path / "a", url, name, budget, slice_s, grid, final)
    attrs = _wait_for(lambda: _session_ready(url, name), 60, leader)
    assert attrs, leader.communicate()
    anchor = A.SESSION_STARTED_AT.of(attrs)
    joiner = _start(tmp_path / "b", url, name, budget, slice_s, grid, final)
    assert _wait_for(lambda: _running_of(url, name, leader.pid), 60 + budget, leader), "the leader never ran a trial"
    assert _wait_for(lambda: [t for t in _study(url, name).trials if t.user_attrs.get(A.JOINED)], 60 + budget,
                     joiner), "the joiner never started a trial"
    leader.send_signal(signal.SIGKILL)
    leader.communicate()
    out_j, _ = _finish(joiner, 60 + budget)
    ended = time.time()
    assert joiner.returncode == 0
    joined = _events(out_j)[-1]
    assert joined["event"] == "joined" and not joined["leader_live"] and "is gone" in joined["text"]
    # it stopped at the session's deadline: its last trial ended by the search phase's end, give or take
    assert ended - anchor <= (1 - final) * budget + slice_s + START_UP_S
    assert not _study(url, name).get_trials(states=(TrialState.RUNNING,))  # the leader's trial: failed
    rerun = _start(tmp_path / "a", url, name, budget, slice_s, grid, final)
    out_r, _ = _finish(rerun, 60 + budget)
    assert rerun.returncode == 0
    events = _events(out_r)
    assert any(e.get("text", "").startswith("resuming study") for e in events)
    assert events[-1]["seconds_used"] <= budget + OVERSHOOT_S, out_r
    study = _study(url, name)
    assert study.user_attrs["final_runs"] == 1 and any(e.get("text", "").startswith("final training:") for e in events)
    held, phase = load_checkpoint(tmp_path / "a" / "best.pt"), events[-1]["checkpoint_phase"]
    assert phase == ("final" if study.user_attrs.get("final_done") else "search") == held["extra"]["phase"], out_r
    if phase == "search":  # a final run that failed its check (a tiny net's unlucky seed) keeps the best trial's
        assert held["extra"]["trial"] == events[-1]["best_trial"]  # model: here, restored from its artifact


def test_of_two_commands_started_at_once_one_leads_and_the_other_joins(tmp_path):
    """The session is claimed under ``storage.exclusive``: of two commands that open the same new study at the
    same moment, exactly one opens a session and the other finds it live."""
    import dataclasses

    from budgetnet.search.options import SearchOptions

    url = f"sqlite:///{tmp_path / 's.db'}"
    make_storage(url)  # the database file exists before either opens the study
    opts = SearchOptions(max_params=30_000, budget_seconds=60, dataset="synthetic", storage=url, study_name="s",
                         out=str(tmp_path / "best.pt"), device="cpu", precision="fp32")
    # a slow storage: a second between reading the session and writing one, where the other command reads
    script = ("import json, sys, time; import budgetnet.search.session as S;"
              "from budgetnet.search.options import SearchOptions; from budgetnet.search.progress import Reporter;"
              "live = S.live_session; S.live_session = lambda attrs: (time.sleep(1.0), live(attrs))[1];"
              "opts = SearchOptions(**json.loads(sys.argv[1])); time.sleep(max(0, float(sys.argv[2]) - time.time()));"
              "s = S.open_session(opts, Reporter('quiet'), time.perf_counter()); print('joined' if s.joined else 'led');"
              "time.sleep(1.0)")
    start_at = time.time() + 6  # both past their imports
    procs = [subprocess.Popen([sys.executable, "-c", script, json.dumps(dataclasses.asdict(opts)), str(start_at)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    roles = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert roles == ["joined", "led"], [p.stderr.read() for p in procs]


def test_a_session_is_live_only_while_its_lease_runs_and_its_leader_is_alive():
    host = socket.gethostname()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    now = time.time()
    live = {A.SESSION_LEASE: now + 5, A.SESSION_PID: os.getpid(), A.SESSION_HOST: host}
    assert workers.live_session(live)
    assert not workers.live_session({**live, A.SESSION_LEASE: now - 1})  # lapsed
    assert not workers.live_session({**live, A.SESSION_PID: ended.pid})  # its leader is gone
    assert workers.live_session({**live, A.SESSION_PID: ended.pid, A.SESSION_HOST: "another-machine"})  # unseen
    assert not workers.live_session({**live, A.SESSION_LEASE: 0.0})  # released at its command's end
    assert not workers.live_session({})  # a study from before sessions had leases


def test_a_model_that_beats_the_study_is_an_artifact_and_the_leader_writes_best_pt_from_it(tmp_path):
    """A trial run elsewhere (another command, another machine) that beats the study's best is stored as an
    artifact of its trial; ``restore_best`` writes it to --out unless --out already holds as good a model."""
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    cfg = RunConfig(data=DataConfig(dataset="synthetic"))
    art = tmp_path / "elsewhere" / "artifacts"

    def trial_with(value: float, w: float) -> optuna.trial.FrozenTrial:
        trial = study.ask()
        result = RunResult(COMPLETE, state_dict={"w": torch.full((2,), w)}, seconds=1.0)
        kept = keep_artifact_if_best(study, trial, str(art), cfg, result, value, 10, 20, ["a", "b"])
        study.tell(trial, value)
        return kept, study.trials[trial.number]

    kept, first = trial_with(0.5, 1.0)
    assert kept and A.MODEL_ARTIFACT.of(first)["dir"] == str(art.absolute())
    kept, worse = trial_with(0.4, 2.0)
    assert not kept and A.MODEL_ARTIFACT.of(worse) is None  # not the study's best: nothing stored
    kept, best = trial_with(0.8, 3.0)
    assert kept
    assert [p.name for p in art.iterdir() if p.name.startswith(".")] == []  # no temp file left
    out = tmp_path / "here" / "best.pt"
    assert restore_best(str(out), study, best, Reporter("quiet"))
    ckpt = load_checkpoint(out)
    assert ckpt["extra"]["trial"] == best.number and torch.equal(ckpt["state_dict"]["w"], torch.full((2,), 3.0))
    assert not restore_best(str(out), study, best, Reporter("quiet"))  # already there
    # an artifact this machine cannot read: a warning, and --out keeps what it holds
    lost = optuna.trial.create_trial(value=0.9, user_attrs={A.MODEL_ARTIFACT: {
        "id": "gone", "dir": str(tmp_path / "other-machine"), "host": "another-machine"}})
    import io

    err = io.StringIO()
    assert not restore_best(str(out), study, lost, Reporter("text", io.StringIO(), err))
    assert "cannot read" in err.getvalue() and "--artifact-dir on a shared filesystem" in err.getvalue()
    assert load_checkpoint(out)["extra"]["trial"] == best.number


def test_a_joiner_takes_the_session_budget_and_refuses_another_backend():
    from budgetnet.config import ConfigError
    from budgetnet.search.join import joiner_options
    from budgetnet.search.options import SearchOptions

    attrs = {A.PLAN: {"budget_seconds": 600.0, "final_fraction": 0.25, "final_auto": True},
             A.SESSION_BACKEND: "optuna", A.SESSION_PID: 1, A.SESSION_HOST: "h"}
    opts = SearchOptions(max_params=1e6, budget_seconds=60, study_name="s", seed=3)
    joined, notes = joiner_options(opts, attrs)
    assert (joined.budget_seconds, joined.final_fraction, joined.final_auto) == (600.0, 0.25, True)
    assert joined.seed != opts.seed and "600 s" in notes[0]
    with pytest.raises(ConfigError, match="only an optuna-backend session can be joined"):
        joiner_options(opts, {**attrs, A.SESSION_BACKEND: "ray"})


def test_precision_and_probe_are_decided_once_per_study_and_machine(tmp_path, monkeypatch):
    """A resume on the machine that measured reuses its precision and probe; on another machine it measures
    again and says so; --precision other than auto always wins."""
    import io

    import budgetnet.search.resume as resume
    from budgetnet.search.options import SearchOptions

    study = optuna.create_study(study_name="s", storage=make_storage(f"sqlite:///{tmp_path / 's.db'}"),
                                direction="maximize")
    measured, machine = [], ["host-a cpu: X, 2 threads"]
    monkeypatch.setattr(resume, "resolve_precision", lambda device, asked: measured.append(asked) or (
        "bf16" if asked == "auto" else asked))
    monkeypatch.setattr(resume, "machine_id", lambda device: machine[0])
    opts = SearchOptions(max_params=1e6, budget_seconds=60)

    def decide(o=opts):
        out = io.StringIO()
        return (*resume.decide_precision(study, study.user_attrs, o, Reporter("text", out)), out.getvalue())

    assert decide() == ("bf16", False, "") and measured == ["auto"]  # a new study measures
    A.PROBE_IMAGES_PER_S.set(study, 1234.0)
    assert decide() == ("bf16", True, "") and measured == ["auto"]  # the same machine: reused, probe too
    machine[0] = "host-b cuda: H100, 16 threads"
    precision, reuse, said = decide()
    assert (precision, reuse) == ("bf16", False) and measured == ["auto", "auto"]
    assert "resumed on another machine (host-b" in said and "measuring them again" in said
    assert decide(SearchOptions(max_params=1e6, budget_seconds=60, precision="fp32"))[0] == "fp32"
    assert study.user_attrs[A.PRECISION] == "fp32" and study.user_attrs[A.MACHINE] == machine[0]
