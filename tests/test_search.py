"""The search service: feasible space, the guard as a safety net, the hard budget, resume, the artifacts."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState

import budgetnet.search.runner as runner
from budgetnet.budget import count_flops, count_params
from budgetnet.checkpoint import load_checkpoint
from budgetnet.config import DataConfig, MobileNetConfig, PlainConfig, ResNetConfig
from budgetnet.data import DATASET_INFO
from budgetnet.evaluate import evaluate_checkpoint
from budgetnet.search.report import Reporter
from budgetnet.search.runner import SearchOptions, run_search
from budgetnet.search.space import WARM_START, _with_width, grid_config, load_grid, max_width, suggest_config

optuna.logging.set_verbosity(optuna.logging.WARNING)
CIFAR = DATASET_INFO["cifar100"].shape


@settings(max_examples=8, deadline=None)
@given(cap=st.integers(20_000, 2_000_000), seed=st.integers(0, 2**16))
def test_space_is_feasible_by_construction(cap, seed):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(3):
        trial = study.ask()
        cfg = suggest_config(trial, CIFAR, cap, DataConfig())
        if count_params(cfg.model, CIFAR) > cap:
            # Only when no width at all fits the other sampled choices (e.g. a 128-unit hidden layer
            # under a 20k cap): then the guard rejects it, the safety net behind the space.
            assert max_width(_with_width(cfg.model, 1), CIFAR, cap) == 0
        study.tell(trial, 0.0)


@settings(max_examples=200, deadline=None, database=None)
@given(a=st.floats(0, 50), b=st.floats(0, 5000), c=st.floats(0, 1e5), kink=st.integers(1, 1024),
       jump=st.floats(0, 1e6), cap=st.floats(1, 6e7), limit=st.integers(1, 1024))
def test_largest_width_equals_a_full_scan(a, b, c, kink, jump, cap, limit):
    """The quadratic guess only steers; the answer must be the exact largest fitting width even for
    counts that are not quadratic (a jump at ``kink``, rounding)."""
    from budgetnet.search.space import _largest

    def count(w):
        return math.floor(a * w * w + b * w + c + (jump if w >= kink else 0.0)) + w  # strictly increasing

    expected = max((w for w in range(1, limit + 1) if count(w) <= cap), default=0)
    assert _largest(count, cap, limit) == expected


@pytest.mark.parametrize("cfg", [ResNetConfig(depths=(5, 5, 5)), PlainConfig(width_pattern="halving", n_conv=4),
                                 MobileNetConfig(), PlainConfig(hidden=(256,), n_conv=2)],
                         ids=["resnet32", "plain-halving", "mobilenet", "plain-hidden"])
@pytest.mark.parametrize("cap", [3e4, 2.5e5, 1e6])
def test_max_width_is_the_exact_bound(cfg, cap):
    w = max_width(cfg, CIFAR, cap)
    if w == 0:
        assert count_params(_with_width(cfg, 1), CIFAR) > cap
        return
    assert count_params(_with_width(cfg, w), CIFAR) <= cap
    assert w == 1024 or count_params(_with_width(cfg, w + 1), CIFAR) > cap


def test_space_respects_a_flop_cap():
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(6):
        trial = study.ask()
        cfg = suggest_config(trial, CIFAR, 1e6, DataConfig(), max_flops=5e6)
        assert count_flops(cfg.model, CIFAR) <= 5e6 or count_params(cfg.model, CIFAR) < 2_000  # width 1 floor
        study.tell(trial, 0.0)


def test_tpe_study_of_100_trials_proposes_under_5_percent_oversized():
    study = optuna.create_study(direction="maximize", sampler=runner.make_sampler("tpe", seed=0))
    study.enqueue_trial(WARM_START)
    oversized = 0
    for _ in range(100):
        trial = study.ask()
        cfg = suggest_config(trial, CIFAR, 1e6, DataConfig())
        n = count_params(cfg.model, CIFAR)
        oversized += n > 1e6
        # A made-up objective that rewards size, so TPE pushes against the cap.
        study.tell(trial, n / 1e6)
    assert oversized <= 5


def test_grid_file_applies_points_on_a_base_config():
    base, grid = load_grid(json.dumps({"base": {"model": {"family": "plain", "n_conv": 2}},
                                       "grid": {"model.width": [8, 16], "model.hidden": [[50], [100]]}}))
    cfg = grid_config(base, {"model.width": grid["model.width"][1], "model.hidden": grid["model.hidden"][0]})
    assert isinstance(cfg.model, PlainConfig) and cfg.model.width == 16 and cfg.model.hidden == (50,)
    with pytest.raises(ValueError):
        load_grid(json.dumps({"grid": {"model.nonsense": [1]}}))


def _opts(tmp_path, **kw) -> SearchOptions:
    defaults = dict(max_params=30_000, budget_seconds=30.0, dataset="synthetic",
                    storage=f"sqlite:///{tmp_path / 'study.db'}", out=str(tmp_path / "best.pt"),
                    artifact_dir=str(tmp_path / "artifacts"), trial_seconds=3.0, device="cpu")
    defaults.update(kw)
    return SearchOptions(**defaults)


def test_end_to_end_search_writes_best_pt_that_evaluates(tmp_path):
    t0 = time.perf_counter()
    summary = run_search(_opts(tmp_path, budget_seconds=30.0), Reporter("quiet"), started=t0)
    wall = time.perf_counter() - t0
    assert wall <= 30.0 + 15.0  # overshoot at most max(1%, 15 s)
    assert summary["seconds_used"] <= 30.0 + 15.0
    assert summary["trials"]["complete"] >= 1
    assert summary["checkpoint_phase"] == "final"
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["extra"]["phase"] == "final" and ckpt["n_params"] <= 30_000
    best_json = json.loads((tmp_path / "best.json").read_text())
    assert best_json["best_trial"] == summary["best_trial"]
    report = evaluate_checkpoint(tmp_path / "best.pt", device="cpu", latency_repeats=2)
    assert report["top1"] > 0.3  # the synthetic task is learnable; chance is 0.1
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 'study.db'}")
    # attached as an Optuna artifact, and the user attrs the dashboard shows are there
    assert study.user_attrs["best_artifact_id"]
    assert list((tmp_path / "artifacts").iterdir())
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for t in done:
        assert {"n_params", "flops", "seconds", "images_per_s", "config", "family"} <= set(t.user_attrs)
        assert set(t.intermediate_values) <= set(range(10, 101, 10))  # the shared progress axis
        assert 100 in t.intermediate_values


def test_tiny_cap_never_trains_an_oversized_model(tmp_path, monkeypatch):
    trained = []
    real_train_run = runner.train_run

    def spy(cfg, data, **kw):
        if kw.get("seconds", 0) > 1.0 and data.val is not None:  # a trial, not the speed probe
            trained.append(count_params(cfg.model, data.info.shape))
        return real_train_run(cfg, data, **kw)

    monkeypatch.setattr(runner, "train_run", spy)
    grid = load_grid(json.dumps({"base": {"model": {"family": "plain", "n_conv": 2, "hidden": [16]},
                                          "train": {"batch_size": 64}},
                                 "grid": {"model.width": [2, 64, 4]}}))
    summary = run_search(_opts(tmp_path, max_params=10_000, sampler="grid", grid=grid, final_fraction=0.0,
                               budget_seconds=25.0, trial_seconds=4.0), Reporter("quiet"))
    assert trained and all(n <= 10_000 for n in trained)
    assert summary["trials"]["rejected"] == 1
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 'study.db'}")
    (rejected,) = [t for t in study.trials if t.user_attrs.get("state") == "rejected"]
    assert rejected.state == TrialState.PRUNED  # PRUNED, never FAIL: TPE learns from it
    assert rejected.user_attrs["n_params"] > 10_000 and "exceed the cap" in rejected.user_attrs["reason"]
    assert not rejected.intermediate_values and "seconds" not in rejected.user_attrs


def test_diverging_trial_is_recorded_and_the_search_goes_on(tmp_path):
    grid = load_grid(json.dumps({"base": {"model": {"family": "plain", "n_conv": 2, "width": 4, "hidden": []},
                                          "train": {"batch_size": 64, "warmup": 0.0}},
                                 "grid": {"train.lr": [1e6, 0.05]}}))
    summary = run_search(_opts(tmp_path, sampler="grid", grid=grid, final_fraction=0.0, budget_seconds=20.0,
                               trial_seconds=3.0), Reporter("quiet"))
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 'study.db'}")
    states = {json.loads(t.params["train.lr"]): (t.state, t.user_attrs.get("state")) for t in study.trials}
    assert states[1e6] == (TrialState.PRUNED, "diverged")
    assert states[0.05] == (TrialState.COMPLETE, "complete")
    assert summary["checkpoint"]


def test_trials_too_slow_for_their_slice_are_pruned_early_and_the_search_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "MIN_EPOCHS_PER_TRIAL", 1e5)  # no model can see 1e5 epochs in 3 s
    summary = run_search(_opts(tmp_path, final_fraction=0.0, budget_seconds=20.0, trial_seconds=3.0),
                         Reporter("quiet"))
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 'study.db'}")
    slow = [t for t in study.trials if t.user_attrs.get("state") == "too slow"]
    assert len(slow) >= 3  # the search went on after each one
    # every trial that trained was stopped for speed; the others are the guard's rejections, or the last
    # one, cut when the budget ran out
    assert {t.user_attrs.get("state") for t in study.trials} <= {"too slow", "rejected", "stopped"}
    for t in slow:
        assert t.state == TrialState.PRUNED and "epochs projected" in t.user_attrs["reason"]
        assert not t.intermediate_values  # stopped before its first evaluation (at 10% of the slice)
        assert t.user_attrs["seconds"] < 3.0  # well inside its slice, start-up (model build, step 1) included
    assert summary["trials"]["complete"] == 0 and summary["checkpoint"] is None
    assert not (tmp_path / "best.pt").exists()


def _cli(tmp_path, *extra, budget_h="0.012"):
    return [sys.executable, "-m", "budgetnet", "search", "--dataset", "synthetic", "--max-params", "30k",
            "--hours", budget_h, "--trial-seconds", "3", "--storage", f"sqlite:///{tmp_path / 's.db'}",
            "--artifact-dir", str(tmp_path / "art"), "--out", str(tmp_path / "best.pt"), "--device", "cpu",
            "--json", *extra]


def _wait_for(predicate, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def _complete_trials(tmp_path) -> list:
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
        studies = storage.get_all_studies()
        if not studies:
            return []
        return [t for t in storage.get_all_trials(studies[0]._study_id) if t.state == TrialState.COMPLETE]
    except Exception:  # noqa: BLE001 - the file may be mid-creation
        return []


def test_kill_9_then_the_same_command_resumes(tmp_path):
    budget = 0.012 * 3600  # 43.2 s
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(_cli(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert _wait_for(lambda: len(_complete_trials(tmp_path)) >= 2, 60), "no trial completed"
    time.sleep(1.0)  # kill mid-trial
    proc.kill()
    proc.wait()
    first_wall = time.perf_counter() - t0
    before = {t.number: t.value for t in _complete_trials(tmp_path)}

    t1 = time.perf_counter()
    second = subprocess.run(_cli(tmp_path), capture_output=True, text=True, env=env, timeout=120)
    second_wall = time.perf_counter() - t1
    assert second.returncode == 0, second.stderr
    events = [json.loads(line) for line in second.stdout.splitlines() if line.startswith("{")]
    summary = events[-1]
    assert any("resuming" in e.get("text", "") for e in events)
    after = {t.number: t.value for t in _complete_trials(tmp_path)}
    assert all(after[n] == v for n, v in before.items())  # no completed trial lost
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 's.db'}")
    orphans = [t for t in study.trials if t.state == TrialState.FAIL]
    assert orphans and all("interrupted" in t.user_attrs["reason"] for t in orphans)
    # Honest time accounting: the two runs together stay within the budget (plus the tolerance),
    # and the recorded time is what the processes really spent, less at most the unsaved tail.
    assert first_wall + second_wall <= budget + 15.0 + 5.0  # + interpreter start-up twice
    assert summary["seconds_used"] <= budget + 15.0
    assert summary["seconds_used"] >= first_wall + second_wall - 3.0 - 6.0
    assert load_checkpoint(tmp_path / "best.pt")["n_params"] <= 30_000


def test_ctrl_c_stops_gracefully_and_keeps_best_so_far(tmp_path):
    proc = subprocess.Popen(_cli(tmp_path, budget_h="0.05"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert _wait_for(lambda: (tmp_path / "best.pt").exists(), 60)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] and summary["checkpoint"]
    assert "Traceback" not in err
    assert load_checkpoint(tmp_path / "best.pt")["extra"]["phase"] == "search"


def test_no_final_phase_keeps_the_best_trial_model(tmp_path):
    summary = run_search(_opts(tmp_path, final_fraction=0.0, budget_seconds=12.0), Reporter("quiet"))
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["extra"]["phase"] == "search" and ckpt["extra"]["trial"] == summary["best_trial"]
    assert ckpt["metrics"]["val_acc"] == pytest.approx(summary["best_val_acc"])
    assert torch.is_tensor(next(iter(ckpt["state_dict"].values())))
