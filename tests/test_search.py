"""The search service: feasible space, the guard as a safety net, the hard budget, resume, the artifacts."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState

import budgetnet.compile
import budgetnet.search.outcome as outcome
import budgetnet.search.resume as resume
import budgetnet.search.session as session
import budgetnet.train
from budgetnet.budget import count_flops, count_params
from budgetnet.checkpoint import load_checkpoint
from budgetnet.config import DataConfig, MobileNetConfig, PlainConfig, ResNetConfig
from budgetnet.datasets.info import DATASET_INFO
from budgetnet.evaluate import evaluate_checkpoint
from budgetnet.search import probe
from budgetnet.search.clock import PROBE_MIN_S
from budgetnet.search.options import SearchOptions, StudyMismatch
from budgetnet.search.phase import search_fits, trials_since_best
from budgetnet.search.pick import Choice
from budgetnet.search.pick import tta as pick_tta
from budgetnet.search.probe import PROBE_MODEL, feasible_flops, probe_speed
from budgetnet.search.progress import Reporter
from budgetnet.search.session import run_search
from budgetnet.search.space import (
    WARM_MIN_WIDTH,
    WARM_START,
    _with_width,
    grid_config,
    load_grid,
    max_width,
    suggest_config,
    warm_start,
)
from budgetnet.search.storage import make_sampler
from budgetnet.search.teacher import DISTILL_WEIGHT

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


def test_each_optimizer_samples_weight_decay_in_its_own_range():
    """SGD's coupled weight decay and AdamW's decoupled one differ ~100-1000x in effect per number: a shared
    range left AdamW trials all but unregularised."""
    decays = {"sgd": [], "adamw": []}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(60):
        cfg = suggest_config(study.ask(), CIFAR, 1e5, DataConfig(dataset="synthetic"))
        decays[cfg.train.optimizer].append(cfg.train.weight_decay)
    assert decays["sgd"] and decays["adamw"]
    assert all(1e-5 <= d <= 2e-3 for d in decays["sgd"]) and all(5e-3 <= d <= 0.2 for d in decays["adamw"])


def test_the_width_bound_is_counted_once_per_shape_of_net_whatever_its_dropout_and_init():
    """Dropout and the initialiser change no count, so configs that differ only in them share one bound."""
    from budgetnet.search.space import _fit_width

    max_width.cache_clear()
    base = PlainConfig(n_conv=3, hidden=(128,))
    widths = {_fit_width(dataclasses.replace(base, dropout=d, init=i), CIFAR, 1e5, None, 0.5).width
              for d in (0.0, 0.13, 0.29) for i in ("default", "kaiming")}
    info = max_width.cache_info()
    assert len(widths) == 1 and info.misses == 1 and info.hits == 5


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
    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", seed=0))
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


def test_the_warm_start_fixes_every_parameter_its_branch_samples():
    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", seed=0))
    study.enqueue_trial(WARM_START)
    trial = study.ask()
    cfg = suggest_config(trial, CIFAR, 1e6, DataConfig())
    assert trial.params == WARM_START  # nothing of the first trial is left to chance
    assert cfg.train.ema == 0.0 and cfg.train.label_smoothing == 0.1


@pytest.mark.parametrize("cap, hidden", [(1e6, 512), (300_000, 128), (100_000, 0), (5_000, 0)])
def test_the_warm_start_narrows_its_hidden_layer_until_its_convolutions_are_wide_enough(cap, hidden):
    shape = DATASET_INFO["synthetic"].shape
    params = warm_start(shape, cap, DataConfig(dataset="synthetic"))
    assert params == {**WARM_START, "plain_hidden": hidden}
    cfg = suggest_config(optuna.trial.FixedTrial(params), shape, cap, DataConfig(dataset="synthetic"))
    assert count_params(cfg.model, shape) <= cap  # the guard never rejects the first trial
    if cap >= 100_000:  # a first conv of 8 channels fits: the hidden layer gives way to it
        assert cfg.model.width >= WARM_MIN_WIDTH
    else:  # none does: the widest net that fits, with no hidden layer
        assert 1 <= cfg.model.width < WARM_MIN_WIDTH


def test_the_space_samples_ema_and_label_smoothing_up_to_0_3():
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    emas, smoothings = set(), []
    for _ in range(60):
        cfg = suggest_config(study.ask(), CIFAR, 1e6, DataConfig())
        emas.add(cfg.train.ema)
        smoothings.append(cfg.train.label_smoothing)
    assert emas == {0.0, 0.99, 0.999}
    assert 0.2 < max(smoothings) <= 0.3


def test_grid_file_applies_points_on_a_base_config():
    from budgetnet.config import ConfigError

    base, grid = load_grid(json.dumps({"base": {"model": {"family": "plain", "n_conv": 2}},
                                       "grid": {"model.width": [8, 16], "model.hidden": [[50], [100]]}}))
    cfg = grid_config(base, {"model.width": grid["model.width"][1], "model.hidden": grid["model.hidden"][0]})
    assert isinstance(cfg.model, PlainConfig) and cfg.model.width == 16 and cfg.model.hidden == (50,)
    with pytest.raises(ValueError):
        load_grid(json.dumps({"grid": {"model.nonsense": [1]}}))
    # every point is checked when the file loads: a bad later value, a pair that does not hold together
    plain = {"model": {"family": "plain", "hidden": []}}
    with pytest.raises(ConfigError, match='grid point model.width="wide", model.n_conv=3: .*width'):
        load_grid(json.dumps({"base": plain, "grid": {"model.width": [4, "wide"], "model.n_conv": [3]}}))
    with pytest.raises(ConfigError, match="model.n_conv=3, model.convs_per_block=2: model: n_conv must be a multiple"):
        load_grid(json.dumps({"base": plain, "grid": {"model.n_conv": [2, 3], "model.convs_per_block": [1, 2]}}))


def _opts(tmp_path, slice_s=3.0, **kw) -> SearchOptions:
    """Options for a search test: budgets are given in slices (``slice_s``, measured on this machine)."""
    defaults = dict(max_params=30_000, budget_seconds=10 * slice_s, dataset="synthetic",
                    storage=f"sqlite:///{tmp_path / 'study.db'}", out=str(tmp_path / "best.pt"),
                    artifact_dir=str(tmp_path / "artifacts"), trial_seconds=slice_s, device="cpu")
    defaults.update(kw)
    return SearchOptions(**defaults)


@pytest.mark.timing
@pytest.mark.slow
def test_end_to_end_search_writes_best_pt_that_evaluates(tmp_path, monkeypatch, slice_s):
    import weakref

    import budgetnet.search.final as final

    real, loaded = session.load_data, []

    def spy(cfg, *a, merge_val=False, **kw):
        if merge_val:  # the final phase: the search's split must be freed by now
            assert all(ref() is None for ref in loaded), "the search split is still alive"
        data = real(cfg, *a, merge_val=merge_val, **kw)
        if not merge_val:
            loaded.append(weakref.ref(data.train.images))
        return data

    monkeypatch.setattr(session, "load_data", spy)
    monkeypatch.setattr(final, "load_data", spy)  # the final phase loads train+validation there
    t0 = time.perf_counter()
    budget = 10 * slice_s
    # A 100k cap: the warm start is 10 channels wide there and learns the task in one short slice (at 30k,
    # 5 wide, whether any trial learns in 3 s depends on what TPE happens to sample).
    summary = run_search(_opts(tmp_path, slice_s, budget_seconds=budget, max_params=100_000), Reporter("quiet"),
                         started=t0)
    wall = time.perf_counter() - t0
    assert wall <= budget + max(0.01 * budget, 15.0)  # the promised overshoot bound
    assert summary["seconds_used"] <= budget + max(0.01 * budget, 15.0)
    assert summary["trials"]["complete"] >= 1
    assert summary["checkpoint_phase"] == "final" and loaded  # the spy saw both phases load
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["extra"]["phase"] == "final" and ckpt["n_params"] <= 100_000
    best_json = json.loads((tmp_path / "best.json").read_text())
    assert best_json["best_trial"] == summary["best_trial"]
    report = evaluate_checkpoint(tmp_path / "best.pt", device="cpu", latency_repeats=2)
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 'study.db'}")
    trials = [(t.number, t.user_attrs.get("state"), t.value, t.user_attrs.get("epochs")) for t in study.trials]
    assert report["top1"] > 0.3, trials  # the synthetic task is learnable; chance is 0.1
    # attached as an Optuna artifact, and the user attrs the dashboard shows are there
    assert study.user_attrs["best_artifact_id"]
    assert list((tmp_path / "artifacts").iterdir())
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for t in done:
        assert {"n_params", "flops", "seconds", "images_per_s", "config", "family"} <= set(t.user_attrs)
        assert set(t.intermediate_values) <= set(range(10, 101, 10))  # the shared progress axis
        assert 100 in t.intermediate_values
        assert t.user_attrs["seconds"] >= 0.9 * slice_s  # ranked only after a full slice
    assert summary["precision"] == study.user_attrs["precision"] == ckpt["precision"]
    # --tta auto: flip-trained complete trials scored their flip average, and best.pt predicts as decided
    # from the picked trial's score, which the summary says
    for t in done:
        flip = t.user_attrs.get("flip")
        assert (flip is not None) == json.loads(t.user_attrs["config"])["data"]["flip"], t.number
        if flip:
            assert flip["val_acc"] == t.value and flip["flip_fixed"] >= 0 and flip["flip_broke"] >= 0
    picked = next(t for t in study.trials if t.number == summary["picked_trial"])
    assert study.user_attrs["tta"] == {"asked": "auto", "tta": ckpt["tta"],
                                       "why": pick_tta("auto", picked.user_attrs.get("flip"))[1]}
    assert summary["pick"]["tta"] == study.user_attrs["tta"] and report["tta"] == ckpt["tta"]
    # The same command again, once it is done: nothing to do, and none of the budget spent on saying so
    used = study.user_attrs["seconds_used"]
    best_pt = (tmp_path / "best.pt").read_bytes()
    again = run_search(_opts(tmp_path, slice_s, budget_seconds=budget, max_params=100_000), Reporter("quiet"),
                       started=time.perf_counter() - 5.0)  # as if its start-up had taken 5 s
    assert again["checkpoint_phase"] == "final" and again["best_trial"] == summary["best_trial"]
    assert again["seconds_used"] == pytest.approx(used, abs=0.5)
    assert again["overshoot_s"] == pytest.approx(summary["overshoot_s"], abs=0.5)
    assert optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 'study.db'}"
                             ).user_attrs["seconds_used"] == used
    assert (tmp_path / "best.pt").read_bytes() == best_pt


def test_tiny_cap_never_trains_an_oversized_model(tmp_path, monkeypatch, slice_s):
    trained = []
    import budgetnet.search.trial as trial_mod

    real_train_run = trial_mod.train_run

    def spy(cfg, data, **kw):
        if kw.get("seconds", 0) > 1.0 and data.val is not None:  # a trial, not the speed probe
            trained.append(count_params(cfg.model, data.info.shape))
        return real_train_run(cfg, data, **kw)

    monkeypatch.setattr(trial_mod, "train_run", spy)  # the one trial function trains here
    grid = load_grid(json.dumps({"base": {"model": {"family": "plain", "n_conv": 2, "hidden": [16]},
                                          "train": {"batch_size": 64}},
                                 "grid": {"model.width": [2, 64, 4]}}))
    summary = run_search(_opts(tmp_path, 1.33 * slice_s, max_params=10_000, sampler="grid", grid=grid,
                               final_fraction=0.0, budget_seconds=8.3 * slice_s), Reporter("quiet"))
    assert trained and all(n <= 10_000 for n in trained)
    assert summary["trials"]["rejected"] == 1
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 'study.db'}")
    (rejected,) = [t for t in study.trials if t.user_attrs.get("state") == "rejected"]
    assert rejected.state == TrialState.PRUNED  # PRUNED, never FAIL: TPE learns from it
    assert rejected.user_attrs["n_params"] > 10_000 and "exceed the cap" in rejected.user_attrs["reason"]
    assert not rejected.intermediate_values and "seconds" not in rejected.user_attrs


def test_diverging_trial_is_recorded_and_the_search_goes_on(tmp_path, slice_s):
    grid = load_grid(json.dumps({"base": {"model": {"family": "plain", "n_conv": 2, "width": 4, "hidden": []},
                                          "train": {"batch_size": 64, "warmup": 0.0}},
                                 "grid": {"train.lr": [1e6, 0.05]}}))
    summary = run_search(_opts(tmp_path, slice_s, sampler="grid", grid=grid, final_fraction=0.0,
                               budget_seconds=7 * slice_s), Reporter("quiet"))
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 'study.db'}")
    states = {json.loads(t.params["train.lr"]): (t.state, t.user_attrs.get("state")) for t in study.trials}
    assert states[1e6] == (TrialState.PRUNED, "diverged")
    assert states[0.05] == (TrialState.COMPLETE, "complete")
    assert summary["checkpoint"]


@pytest.mark.timing
def test_trials_too_slow_for_their_slice_are_pruned_early_and_the_search_goes_on(tmp_path, monkeypatch, slice_s):
    import budgetnet.search.trial as trial_mod

    for module in (trial_mod, probe, outcome):  # the speed check, and the FLOP cap scaled from the probe
        monkeypatch.setattr(module, "MIN_EPOCHS_PER_TRIAL", 1e5)  # no model can see 1e5 epochs in a slice
    summary = run_search(_opts(tmp_path, slice_s, final_fraction=0.0, budget_seconds=7 * slice_s),
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
        assert t.user_attrs["seconds"] < slice_s  # inside its slice, start-up (model build, step 1) included
    assert summary["trials"]["complete"] == 0 and summary["checkpoint"] is None
    assert not (tmp_path / "best.pt").exists()
    # one line that says why, with the measured speed and what to change
    assert "images/s" in summary["error"] and "give more --hours or a smaller --max-params" in summary["error"]
    assert not study.get_trials(states=(TrialState.RUNNING,)) and study.user_attrs["phase"] == "final"


def _cli(tmp_path, *extra, budget_h="0.012", slice_s=3.0):
    return [sys.executable, "-m", "budgetnet", "search", "--dataset", "synthetic", "--max-params", "30k",
            "--hours", budget_h, "--trial-seconds", f"{slice_s:.2f}", "--storage", f"sqlite:///{tmp_path / 's.db'}",
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


@pytest.mark.timing
def test_ctrl_c_stops_gracefully_and_keeps_best_so_far(tmp_path, slice_s):
    proc = subprocess.Popen(_cli(tmp_path, budget_h="0.05", slice_s=slice_s), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert _wait_for(lambda: (tmp_path / "best.pt").exists(), 60 + 10 * slice_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] and summary["checkpoint"]
    assert "Traceback" not in err
    assert load_checkpoint(tmp_path / "best.pt")["extra"]["phase"] == "search"
    # the study stays in its search phase: the same command searches on with what is left
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 's.db'}")
    assert study.user_attrs.get("phase", "search") == "search"  # unset until the search phase ends
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]


@pytest.mark.timing
def test_no_final_phase_keeps_the_best_trial_model(tmp_path, slice_s, monkeypatch):
    import io

    import budgetnet.search.final as final

    # Every score counts as "near chance" here (under 11x a tenth), to see the runner say so of its best trial.
    monkeypatch.setattr(final, "CHANCE_FACTOR", 11.0)
    out, err = io.StringIO(), io.StringIO()
    summary = run_search(_opts(tmp_path, slice_s, final_fraction=0.0, budget_seconds=4 * slice_s),
                         Reporter("quiet", out, err))
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["extra"]["phase"] == "search" and ckpt["extra"]["trial"] == summary["best_trial"]
    assert ckpt["metrics"]["val_acc"] == pytest.approx(summary["best_val_acc"])
    assert torch.is_tensor(next(iter(ckpt["state_dict"].values())))
    (warning,) = [line for line in err.getvalue().splitlines() if "near chance" in line]  # --quiet keeps it
    assert warning.startswith("warning: the best trial") and "near chance" not in out.getvalue()
    assert f"best trial ({summary['best_trial']}) scored {summary['best_val_acc']:.1%}" in warning
    assert "(10.0% for 10 classes)" in warning
    # the same command again: its search is over and no final phase comes, so none of the budget is spent
    def used() -> float:
        return optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 'study.db'}"
                                 ).user_attrs["seconds_used"]

    before = used()
    again = run_search(_opts(tmp_path, slice_s, final_fraction=0.0, budget_seconds=4 * slice_s), Reporter("quiet"),
                       started=time.perf_counter() - 5.0)  # as if its start-up had taken 5 s
    assert again["checkpoint_phase"] == "search" and again["best_trial"] == summary["best_trial"]
    assert used() == before and again["seconds_used"] == pytest.approx(before, abs=0.5)


def test_a_best_trial_near_chance_is_named_before_its_model_is_written():
    from budgetnet.search.final import near_chance

    for value, classes, warned in ((0.12, 10, True), (0.149, 10, True), (0.151, 10, False), (0.9975, 10, False),
                                   (0.014, 100, True), (0.02, 100, False)):
        note = near_chance(optuna.trial.create_trial(value=value), classes)
        assert (note is not None) == warned, (value, classes, note)
    assert near_chance(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED), 10) is None


def _study_attrs(tmp_path) -> dict:
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
        studies = storage.get_all_studies()
        return storage.get_study_user_attrs(studies[0]._study_id) if studies else {}
    except Exception:  # noqa: BLE001 - the file may be mid-creation
        return {}


@pytest.mark.timing
@pytest.mark.slow
def test_kill_9_mid_search_and_mid_final_phase_each_resumed_by_the_same_command(tmp_path, slice_s):
    """One search killed twice (one budget for both scenarios: CI time): kill -9 mid-trial, and the same
    command resumes the search with nothing completed lost; kill -9 a quarter into the final phase, and the
    same command runs no second full final phase. All three runs together stay within the one budget."""
    budget_h = f"{16 * slice_s / 3600:.5f}"  # 48 s with 3 s slices: ~24 s of search, ~24 s of final training
    budget = float(budget_h) * 3600
    cmd = _cli(tmp_path, "--final-fraction", "0.5", budget_h=budget_h, slice_s=slice_s)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    walls = []

    # 1. kill -9 mid-trial, once two trials are complete
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert _wait_for(lambda: len(_complete_trials(tmp_path)) >= 2, 60 + 10 * slice_s), "no trial completed"
    time.sleep(1.0)  # kill mid-trial
    proc.kill()
    proc.wait()
    walls.append(time.perf_counter() - t0)
    before = {t.number: t.value for t in _complete_trials(tmp_path)}

    # 2. the same command resumes the search; kill -9 again a quarter into its final phase
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert _wait_for(lambda: _study_attrs(tmp_path).get("final_runs") == 1, budget + 30), "no final phase"
    time.sleep(0.25 * 0.5 * budget)  # a quarter into the final phase
    proc.kill()
    out, _ = proc.communicate()
    walls.append(time.perf_counter() - t0)
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any("resuming" in e.get("text", "") for e in events)
    after = {t.number: t.value for t in _complete_trials(tmp_path)}
    assert all(after[n] == v for n, v in before.items())  # no completed trial lost
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 's.db'}")
    orphans = [t for t in study.trials if t.state == TrialState.FAIL]
    assert orphans and all("interrupted" in t.user_attrs["reason"] for t in orphans)
    used_at_kill = _study_attrs(tmp_path)["seconds_used"]
    # saved as it ran (every second here): what both runs spent, less the first kill's unsaved tail, a
    # second, and the start-up before each run's clock
    assert used_at_kill >= sum(walls) - 3.0 - 1.0 - 2 * 5.0
    assert load_checkpoint(tmp_path / "best.pt")["extra"]["phase"] == "search"  # the search's model is safe

    # 3. the same command resumes the final phase, not the search
    t0 = time.perf_counter()
    third = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120 + budget)
    walls.append(time.perf_counter() - t0)
    assert third.returncode == 0, third.stderr
    events = [json.loads(line) for line in third.stdout.splitlines() if line.startswith("{")]
    assert any("resuming" in e.get("text", "") and "final phase" in e.get("text", "") for e in events)
    assert not [e for e in events if e["event"] == "trial"]  # no trial: the search phase was over
    ckpt = load_checkpoint(tmp_path / "best.pt")
    if ckpt["extra"]["phase"] == "final":  # a final run in the time that was left, not a full one again
        assert ckpt["train_seconds"] <= budget - used_at_kill
        assert _study_attrs(tmp_path)["final_runs"] == 2
    else:  # or none at all, when what was left was too short; or one too short to pass its fit check
        assert any("final training skipped" in e.get("text", "") or "failed its check" in e.get("text", "")
                   for e in events)
    assert ckpt["n_params"] <= 30_000
    # Honest time accounting: the three runs together stay within the budget, the promised overshoot and
    # the interpreter start-up three times; the recorded time is what the processes really spent, less
    # at most the two unsaved tails and the start-ups
    summary = events[-1]
    assert sum(walls) <= budget + 15.0 + 7.5
    assert summary["seconds_used"] <= budget + 15.0
    assert summary["seconds_used"] >= sum(walls) - 2 * 3.0 - 9.0


@pytest.mark.timing
@pytest.mark.slow
def test_a_final_phase_too_short_to_learn_keeps_the_search_model(tmp_path, slice_s):
    import io

    out, err = io.StringIO(), io.StringIO()
    # Trials of 3 slices; the final phase gets 10% of the budget plus what no full trial could use, less
    # the write reserve: under 2.1 slices, which would show the merged data (1.2x the trials' split) fewer
    # epochs than a trial saw.
    summary = run_search(_opts(tmp_path, 3 * slice_s, budget_seconds=10 * slice_s, final_fraction=0.1),
                         Reporter("text", out, err))
    assert summary["checkpoint_phase"] == "search" and summary["trials"]["complete"] >= 1
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["extra"] == {"phase": "search", "study": summary["study"], "trial": summary["best_trial"]}
    skipped = [line for line in out.getvalue().splitlines() if line.startswith("final training skipped")]
    assert len(skipped) == 1 and "fewer than its" in skipped[0]
    assert "near chance" not in out.getvalue() + err.getvalue()  # its trials learned: no warning
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert "final_runs" not in study.user_attrs and not study.user_attrs.get("final_done")


def test_train_run_refuses_an_empty_budget(synthetic_data):
    from budgetnet.config import RunConfig
    from budgetnet.train import train_run

    for kw in (dict(seconds=0), dict(seconds=-1.0), dict(epochs=0), dict(seconds=math.inf)):
        with pytest.raises(ValueError, match="positive, finite budget"):
            train_run(RunConfig(), synthetic_data, device="cpu", **kw)


def test_a_resume_with_another_cap_or_dataset_is_refused(tmp_path, capsys):
    from budgetnet.cli import main

    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="mine", storage=storage, direction="maximize")
    study.set_user_attr("max_params", 30_000.0)
    study.set_user_attr("dataset", "synthetic")
    study.set_user_attr("seconds_used", 12.5)
    base = ["search", "--study-name", "mine", "--storage", storage, "--hours", "0.01", "--device", "cpu",
            "--out", str(tmp_path / "best.pt"), "--artifact-dir", str(tmp_path / "art")]
    # refused before the data is read: no CIFAR-10 is needed to learn that the study is a synthetic one
    for changed, expected in ((["--dataset", "synthetic", "--max-params", "40k"], "--max-params 30000, not 40000"),
                              (["--dataset", "CIFAR-10", "--max-params", "30k", "--data-dir", str(tmp_path)],
                               "--dataset synthetic, not cifar10")):
        assert main(base + changed) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "was started with" in err[0] and expected in err[0]
    after = optuna.load_study(study_name="mine", storage=storage)
    assert after.user_attrs == {"max_params": 30_000.0, "dataset": "synthetic", "seconds_used": 12.5}
    assert not after.trials and not (tmp_path / "best.pt").exists()
    # a folder dataset at another --image-size is another problem too (its images, its FLOPs)
    folder = optuna.create_study(study_name="folder", storage=storage, direction="maximize")
    for key, value in (("max_params", 30_000.0), ("dataset", "folder:/data/leaves"), ("image_size", None)):
        folder.set_user_attr(key, value)
    same = dict(max_params=30_000, budget_seconds=60, dataset="folder:/data/leaves")
    resume.check_same_study(storage, "folder", SearchOptions(**same))
    with pytest.raises(StudyMismatch, match="--image-size its default, not 64"):
        resume.check_same_study(storage, "folder", SearchOptions(**same, image_size=64))


def test_a_budget_too_short_for_one_slice_exits_non_zero_with_one_line(tmp_path):
    proc = subprocess.run(_cli(tmp_path, budget_h="0.002", slice_s=30.0), capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("budgetnet: nothing trained:"), proc.stderr
    assert "cannot hold one 30 s trial slice" in err[0] and "--hours" in err[0]
    assert not (tmp_path / "best.pt").exists()
    study = optuna.load_study(study_name=json.loads(proc.stdout.splitlines()[-1])["study"],
                              storage=f"sqlite:///{tmp_path / 's.db'}")
    # consistent: nothing ran (the queued warm start waits for a resume), the phase is over
    assert all(t.state == TrialState.WAITING for t in study.trials) and study.user_attrs["phase"] == "final"


@pytest.mark.timing
def test_the_speed_probe_is_bounded_and_stoppable(synthetic_data):
    t0 = time.perf_counter()
    rate = probe_speed(synthetic_data, "cpu", 1.0)
    took = time.perf_counter() - t0
    one_step = 128 / rate
    assert rate > 0 and took <= 1.0 + 2 * one_step + 0.5  # its bound, overshot by at most a step or so
    t0 = time.perf_counter()
    assert probe_speed(synthetic_data, "cpu", 60.0, stop=lambda: True) is None  # stopped at once
    assert time.perf_counter() - t0 < 5.0


def test_a_search_gives_its_probe_a_small_share_of_the_budget(tmp_path, monkeypatch, slice_s):
    asked = []
    real = probe_speed

    def spy(data, device, seconds, **kw):
        asked.append(seconds)
        assert kw.get("stop") is not None
        return real(data, device, seconds, **kw) / 50  # measured in a busy moment

    monkeypatch.setattr(session, "probe_speed", spy)
    run_search(_opts(tmp_path, slice_s, budget_seconds=400.0, trial_seconds=500.0), Reporter("quiet"))
    assert not asked  # no slice fits: not even the probe runs
    out = io.StringIO()
    run_search(_opts(tmp_path, slice_s, budget_seconds=3 * slice_s, final_fraction=0.0, study_name="b"),
               Reporter("text", out))
    assert asked == [PROBE_MIN_S]  # 3% of a short budget is under the 1 s floor
    # The trials' own speeds correct the probe's: the time-feasible FLOP cap rises after the first one.
    study = optuna.load_study(study_name="b", storage=f"sqlite:///{tmp_path / 'study.db'}")
    probed = feasible_flops(study.user_attrs["probe_images_per_s"],
                                   count_flops(PROBE_MODEL, DATASET_INFO["synthetic"].shape),
                                   2000, study.user_attrs["slice_seconds"])
    assert study.user_attrs["time_feasible_flops"] > 1.25 * probed
    assert "are time-feasible (was" in out.getvalue()


@pytest.mark.parametrize("search_end, used, expected", [
    (2340.0, 5.0, 2340.0 / 12),  # an hour, 65% of it searching: 12 slices
    (390.0, 5.0, 32.5),  # 10 minutes: 12 slices of 32.5 s
    (78.0, 5.0, 10.0),  # 2 minutes: 12 slices would be 6.5 s; at least 10 s, and 4 of those still fit
    (23.4, 5.0, (23.4 - 5.0) / 5),  # 36 s: 4 slices of 10 s do not fit; 4 shorter ones and one spare do
    (10.0, 5.0, 3.0),  # never under 3 s
])
def test_slices_are_shares_of_the_budget_with_floors(search_end, used, expected):
    from budgetnet.search.clock import slice_seconds

    assert slice_seconds(search_end, used) == pytest.approx(expected)


@pytest.mark.parametrize("used, fits", [
    (50.0, True),  # ends at 80 s, well before the phase does
    (73.0, True),  # ends at 103 s: within a tenth of a slice (3 s) past the phase's end
    (73.1, False),  # ends 3.1 s past it
])
def test_a_trial_starts_only_if_its_slice_ends_within_a_tenth_of_a_slice_of_the_search_end(used, fits):
    from budgetnet.search.clock import SLICE_GRACE, slice_fits

    assert SLICE_GRACE == 0.1
    assert slice_fits(used, 30.0, 100.0) is fits


def test_with_no_final_phase_no_trial_is_started_or_run_past_the_budget():
    """The grace past the search phase's end is absorbed by the final phase; with none (--final-fraction
    0) a trial must end, and be stopped, before the budget does, with room to write best.pt. A 1,800 s
    budget with 300 s slices: a trial started at 1,529 s would have run to 1,829 s, 29 s over."""
    from budgetnet.search.clock import SLICE_GRACE, WRITE_RESERVE_S, slice_fits, trial_deadline

    budget = 1800.0
    assert slice_fits(1529.0, 300.0, budget) and not slice_fits(1529.0, 300.0, budget, budget)
    assert slice_fits(budget - 300.0 - WRITE_RESERVE_S, 300.0, budget, budget)
    assert trial_deadline(budget, 300.0, budget) == budget - WRITE_RESERVE_S
    # with a final phase after it, the grace stays: the final phase gives up what a late trial takes
    assert slice_fits(1229.0, 300.0, 1500.0, budget) and not slice_fits(1231.0, 300.0, 1500.0, budget)
    assert trial_deadline(1500.0, 300.0, budget) == 1500.0 + 2 * SLICE_GRACE * 300.0
    # and the search's own rule applies it, as every worker and backend asks it
    from budgetnet.search.clock import Clock

    opts = SearchOptions(max_params=1e5, budget_seconds=budget, dataset="synthetic", final_fraction=0.0)
    study = optuna.create_study()
    for used, fits in ((1529.0, False), (1490.0, True)):
        assert search_fits(opts, study, Clock(budget, used, time.perf_counter()), 300.0)() is fits


def _teacher(path, dataset="synthetic"):
    """A small trained checkpoint to distil from."""
    from budgetnet.checkpoint import save_checkpoint
    from budgetnet.config import RunConfig, TrainConfig
    from budgetnet.data import load_data
    from budgetnet.train import train_run

    cfg = RunConfig(model=PlainConfig(n_conv=2, width=8, hidden=(32,)), train=TrainConfig(batch_size=64, lr=1e-95),
                    data=DataConfig(dataset=dataset))
    data = load_data(cfg.data)
    r = train_run(cfg, data, device="cpu", epochs=1)
    return save_checkpoint(path, cfg, r.state_dict, metrics=r.metrics, n_params=0, flops=0, classes=data.classes,
                           train_seconds=r.seconds, precision=r.precision)


def test_the_final_phase_distils_from_a_teacher_inside_its_own_time(tmp_path, slice_s, monkeypatch):
    import budgetnet.search.final as final

    teacher = _teacher(tmp_path / "teacher.pt")
    calls = []
    real = final.train_run
    monkeypatch.setattr(final, "train_run", lambda cfg, data, **kw: calls.append((cfg, kw)) or real(cfg, data, **kw))
    budget = 6 * slice_s
    summary = run_search(_opts(tmp_path, slice_s, budget_seconds=budget, final_fraction=0.5, max_params=100_000,
                               teacher=str(teacher)), Reporter("quiet"))
    assert summary["checkpoint_phase"] == "final" and summary["seconds_used"] <= budget + 15.0
    ((cfg, kw),) = calls
    assert isinstance(kw["teacher"], torch.nn.Module) and cfg.train.distill == DISTILL_WEIGHT
    assert kw["seconds"] <= budget  # the teacher's passes run inside the final run's own seconds
    assert load_checkpoint(tmp_path / "best.pt")["run_config"].train.distill == DISTILL_WEIGHT


def _study_with_one_trial(opts, cfg, run, data):
    """A study (at ``opts.storage``) whose one COMPLETE trial stands for ``cfg``, scored and timed by ``run``."""
    study = optuna.create_study(study_name="s", storage=opts.storage, direction="maximize")
    attrs = {"config": cfg.to_json(), "n_params": count_params(cfg.model, data.info.shape),
             "flops": count_flops(cfg.model, data.info.shape), "images_per_s": run.images_per_s,
             "epochs": run.metrics["epoch"]}
    study.add_trial(optuna.trial.create_trial(value=run.metrics["val_acc"], user_attrs=attrs))
    return study, study.best_trial


def test_a_final_model_that_fails_its_fit_check_leaves_the_trial_model_in_place(tmp_path, synthetic_data):
    """A final run that ends without a NaN but learned nothing (here lr 1e-9: its weights stay at their
    initialisation) must not replace the trial's model, which the study's best trial stands behind."""
    import io

    import budgetnet.search.final as final
    from budgetnet.config import PlainConfig, RunConfig, TrainConfig
    from budgetnet.search.clock import Clock
    from budgetnet.train import train_run

    opts = _opts(tmp_path, 3.0)
    cfg = RunConfig(model=PlainConfig(n_conv=2, width=8, hidden=(32,)), train=TrainConfig(lr=1e-9, batch_size=64),
                    data=DataConfig(dataset="synthetic"))
    # The trial trained at the default lr; the config it stands for (what the final phase trains) has lr 1e-9.
    trial_run = train_run(cfg.replace(train=TrainConfig(batch_size=64)), synthetic_data, device="cpu", epochs=2)
    study, best = _study_with_one_trial(opts, cfg, trial_run, synthetic_data)
    assert best.value > 0.5  # the trial's model learned the task
    final.keep_if_best(opts.out, "s", best.number, cfg, trial_run, best.value, best.user_attrs["n_params"], 1,
                       synthetic_data.classes)
    before = (tmp_path / "best.pt").read_bytes()
    out = io.StringIO()
    phase, metrics = final.final_training(opts, study, Choice.of(best), Clock(5.0, 0.0, time.perf_counter()), lambda: False,
                                          Reporter("text", out), "fp32")
    assert (phase, metrics) == ("search", {})
    assert (tmp_path / "best.pt").read_bytes() == before
    (line,) = [x for x in out.getvalue().splitlines() if "failed its check" in x]
    assert "keeping the search's best model (trial 0)" in line
    assert "of its training images" in study.user_attrs["final_failed"] and "final_done" not in study.user_attrs


@pytest.mark.timing
@pytest.mark.parametrize("retried", [True, False], ids=["diverged-early", "diverged-at-its-end"])
def test_a_diverged_final_run_is_run_again_at_half_the_lr_while_time_allows(tmp_path, synthetic_data, monkeypatch,
                                                                          retried):
    """A 10-minute search's final run diverged at step 2376 and left 130 s unused (docs/benchmarks.md): the
    time left goes to a run at half the learning rate, if it still shows the data the trial's epochs."""
    import io

    import budgetnet.search.final as final
    from budgetnet.checkpoint import load_checkpoint
    from budgetnet.config import PlainConfig, RunConfig, TrainConfig
    from budgetnet.search.clock import Clock
    from budgetnet.train import DIVERGED, RunResult, train_run

    opts = _opts(tmp_path, 3.0)
    cfg = RunConfig(model=PlainConfig(n_conv=2, width=8, hidden=(32,)), train=TrainConfig(lr=0.08, batch_size=64),
                    data=DataConfig(dataset="synthetic"))
    trial_run = train_run(cfg, synthetic_data, device="cpu", epochs=1)
    study, best = _study_with_one_trial(opts, cfg, trial_run, synthetic_data)
    runs = []

    def diverge_first(run_cfg, *a, **kw):  # the first final run diverges (at once, or when its time is up)
        runs.append(run_cfg.train.lr)
        if len(runs) > 1:
            return train_run(run_cfg, *a, **kw)
        if not retried:
            time.sleep(kw["seconds"])
        return RunResult(DIVERGED, reason="non-finite loss at step 7")

    monkeypatch.setattr(final, "train_run", diverge_first)
    out = io.StringIO()
    phase, metrics = final.final_training(opts, study, Choice.of(best), Clock(8.0, 0.0, time.perf_counter()),
                                          lambda: False, Reporter("text", out), "fp32")
    if retried:
        assert runs == [0.08, 0.04] and phase == "final" and "fit_acc" in metrics
        assert load_checkpoint(opts.out)["run_config"].train.lr == 0.04  # what was trained is what is stored
        assert "again at half the learning rate (0.04)" in out.getvalue() and study.user_attrs["final_retries"] == 1
    else:  # too little time for the trial's epochs: the trial's model stays, as before
        assert runs == [0.08] and phase == "search" and "final training ended early (diverged" in out.getvalue()
        assert "final_retries" not in study.user_attrs


@pytest.mark.parametrize("mode", ["on", "off"])
def test_the_final_run_compiles_as_asked_and_the_study_records_it(tmp_path, synthetic_data, monkeypatch, mode):
    import io

    import budgetnet.search.final as final
    from budgetnet.config import PlainConfig, RunConfig, TrainConfig
    from budgetnet.search.clock import Clock
    from budgetnet.train import train_run

    opts = _opts(tmp_path, 3.0, compile=mode)
    cfg = RunConfig(model=PlainConfig(n_conv=2, width=8, hidden=(32,)), train=TrainConfig(lr=0.05, batch_size=64),
                    data=DataConfig(dataset="synthetic"))
    study, best = _study_with_one_trial(opts, cfg, train_run(cfg, synthetic_data, device="cpu", epochs=1),
                                        synthetic_data)
    compiled = []

    def failing_compile(model):  # a compiler that cannot build this model (no C++ toolchain, say)
        def forward(x):
            compiled.append(len(x))
            raise RuntimeError("inductor: no working C++ compiler found")
        return forward

    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(budgetnet.compile, "COMPILE_ON_MIN_S", 0.0)  # this short final run stands in for a long one
    out = io.StringIO()
    phase, _ = final.final_training(opts, study, Choice.of(best), Clock(6.0, 0.0, time.perf_counter()), lambda: False,
                                    Reporter("text", out), "fp32")
    record = study.user_attrs["final_compile"]
    assert phase == "final" and record["mode"] == mode and record["compiled"] is False
    if mode == "on":  # tried in the first step, failed, and the final model trained eager all the same
        assert len(compiled) == 1 and "no working C++ compiler" in record["reason"]
        assert "final training not compiled: compilation failed (RuntimeError" in out.getvalue()
    else:
        assert compiled == [] and "compile" not in out.getvalue()


def _trial_stats(**attrs) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(value=0.9, user_attrs=attrs)


def test_teacher_auto_declines_where_the_device_is_too_slow_for_teacher_and_student():
    from budgetnet.search.teacher import TEACHERS, plan_teacher

    shape = DATASET_INFO["fashion_mnist"].shape
    student = {"n_params": 300_000, "flops": 20_000_000, "epochs": 6.0}
    measured = []

    def measure(rate):
        return lambda model: measured.append(model) or rate

    # A 2-core CPU: the student trained 1,500 images/s; a 10-minute search leaves ~200 s of final phase.
    # No teacher outruns its student, so no candidate is even measured.
    why = plan_teacher(_trial_stats(images_per_s=1500.0, **student), 200.0, 60_000, shape, measure(1e9))
    assert isinstance(why, str) and "needs 15" in why and "student's own speed" in why and not measured
    # A GPU: the student trained 60,000 images/s and the largest candidate measures 20,000: it fits.
    plan = plan_teacher(_trial_stats(images_per_s=60_000.0, **student), 300.0, 60_000, shape, measure(20_000.0))
    assert plan.model == TEACHERS[0] and measured == [TEACHERS[0]] and plan.n_params >= 2 * student["n_params"]
    assert plan.epochs == pytest.approx(20_000 * 0.4 * 300 / 60_000) and plan.student_epochs >= 15
    # Measured at 3,000 images/s, no candidate fits: each is measured once, and the answer says why.
    measured.clear()
    why = plan_teacher(_trial_stats(images_per_s=60_000.0, **student), 300.0, 60_000, shape, measure(3_000.0))
    assert "needs 15" in why and measured == list(TEACHERS)
    # A student as large as every candidate gets no teacher, however fast the device.
    big = {**student, "n_params": 10_000_000}
    assert "no candidate" in plan_teacher(_trial_stats(images_per_s=1e9, **big), 300.0, 60_000, shape,
                                          measure(1e9))


@pytest.mark.timing
@pytest.mark.slow
def test_teacher_auto_trains_a_teacher_and_the_student_inside_the_final_phase(tmp_path, synthetic_data, monkeypatch):
    import io

    import budgetnet.search.final as final
    import budgetnet.search.teacher as teacher_mod
    from budgetnet.config import PlainConfig, RunConfig, TrainConfig
    from budgetnet.search.clock import Clock
    from budgetnet.train import train_run

    # Candidates a CPU test can afford (a synthetic-task teacher in a few seconds), rules unchanged otherwise.
    monkeypatch.setattr(teacher_mod, "TEACHERS", (ResNetConfig(depths=(1, 1, 1), widths=(8, 16, 32), stem_width=8),))
    monkeypatch.setattr(teacher_mod, "TEACHER_MIN_EPOCHS", 1.0)
    monkeypatch.setattr(teacher_mod, "STUDENT_MIN_EPOCHS", 2.0)
    runs = []
    for mod in (teacher_mod, final):
        real = mod.train_run
        monkeypatch.setattr(mod, "train_run", lambda c, d, _real=real, _mod=mod.__name__, **kw:
                            runs.append((_mod, c, kw)) or _real(c, d, **kw))
    opts = _opts(tmp_path, 3.0, teacher="auto", max_params=15_000)
    cfg = RunConfig(model=PlainConfig(n_conv=2, width=4, hidden=(16,), batch_norm=True),
                    train=TrainConfig(batch_size=64), data=DataConfig(dataset="synthetic"))
    trial_run = train_run(cfg, synthetic_data, device="cpu", epochs=0.5)  # a bar a few-second teacher can clear
    study, best = _study_with_one_trial(opts, cfg, trial_run, synthetic_data)
    budget = 20.0
    clock, out = Clock(budget, 0.0, time.perf_counter()), io.StringIO()
    phase, _ = final.final_training(opts, study, Choice.of(best), clock, lambda: False, Reporter("text", out), "fp32")
    assert clock.used() <= budget + 1.0  # the teacher's run and the student's, both inside the budget
    assert len(runs) == 2, out.getvalue()
    (t_mod, t_cfg, t_kw), (s_mod, s_cfg, s_kw) = runs
    assert t_mod.endswith("teacher") and t_cfg.model.family == "resnet" and "teacher" not in t_kw
    assert t_kw["seconds"] <= 0.4 * (budget - final.WRITE_RESERVE_S)  # its share, after its speed probe
    assert s_mod.endswith("final") and isinstance(s_kw["teacher"], torch.nn.Module), out.getvalue()
    assert s_cfg.train.distill == DISTILL_WEIGHT and s_kw["seconds"] <= budget - t_kw["seconds"]
    teacher_params = sum(p.numel() for p in s_kw["teacher"].parameters())
    assert teacher_params > opts.max_params >= best.user_attrs["n_params"]
    assert phase == "final", out.getvalue()
    ckpt = load_checkpoint(opts.out)
    assert ckpt["run_config"].train.distill == DISTILL_WEIGHT and ckpt["n_params"] <= opts.max_params
    assert "teacher:" in out.getvalue() and "epochs" in study.user_attrs["teacher"]
    # The teacher is kept (a checkpoint in the artifact folder), and a final phase run again (resumed after an
    # interruption) distils from it instead of training a second one out of what is left of the budget.
    saved = load_checkpoint(study.user_attrs["teacher_checkpoint"])
    assert saved["extra"]["phase"] == "teacher" and saved["n_params"] == teacher_params
    assert Path(study.user_attrs["teacher_checkpoint"]).parent == Path(opts.artifact_dir).absolute()
    runs.clear()
    clock, out = Clock(budget / 2, 0.0, time.perf_counter()), io.StringIO()  # what a resume has left
    phase, _ = final.final_training(opts, study, Choice.of(best), clock, lambda: False, Reporter("text", out), "fp32")
    assert [m for m, _, _ in runs] == [final.__name__], out.getvalue()  # the student's run only
    reused = runs[0][2]["teacher"]
    assert all(torch.equal(a, b.to(a.device)) for a, b in zip(reused.state_dict().values(),
                                                                saved["state_dict"].values()))
    assert phase == "final" and "trained before the interruption" in study.user_attrs["teacher"]


def test_a_run_without_validation_scores_its_fit_on_a_sample_of_its_training_images():
    from budgetnet.config import PlainConfig, RunConfig, TrainConfig
    from budgetnet.data import load_data
    from budgetnet.search.final import fit_fell_short
    from budgetnet.train import train_run

    merged = load_data(DataConfig(dataset="synthetic"), merge_val=True)
    cfg = RunConfig(model=PlainConfig(n_conv=2, width=8, hidden=(32,)), train=TrainConfig(batch_size=64),
                    data=DataConfig(dataset="synthetic"))
    learned = train_run(cfg, merged, device="cpu", epochs=2, fit_images=1000)
    still = train_run(cfg.replace(train=TrainConfig(batch_size=64, lr=1e-9)), merged, device="cpu", epochs=0.1,
                      fit_images=1000)
    assert learned.metrics["fit_images"] == 1000 and "fit_acc" not in train_run(cfg, merged, device="cpu",
                                                                                 epochs=0.1).metrics
    assert learned.metrics["fit_acc"] > 0.5 and still.metrics["fit_acc"] < 0.3  # chance is 0.1
    trial = optuna.trial.create_trial(value=learned.metrics["fit_acc"])
    assert fit_fell_short(learned, trial) is None
    assert "against trial" in fit_fell_short(still, trial)


@pytest.mark.parametrize("optimizer, rule", [("sgd", lambda r: r), ("adamw", math.sqrt)])
def test_the_sampled_lr_scales_with_the_sampled_batch(optimizer, rule):
    params = {**WARM_START, "optimizer": optimizer, f"{optimizer}_lr_128": 0.02, "adamw_weight_decay": 0.05}
    lrs = {}
    for batch in (64, 128, 512):
        cfg = suggest_config(optuna.trial.FixedTrial({**params, "batch_size": batch}), CIFAR, 1e6, DataConfig())
        lrs[batch] = cfg.train.lr
    assert lrs[128] == pytest.approx(0.02)
    assert lrs[512] == pytest.approx(0.02 * rule(4)) and lrs[64] == pytest.approx(0.02 * rule(0.5))


def test_trials_since_best_counts_judged_trials_after_the_best_complete_one():
    """Complete trials and trials the pruner stopped (state ``pruned``) count; too slow, diverged, rejected
    and interrupted ones do not; a tie does not beat the best; nothing counts before the first complete."""
    pruned = optuna.trial.TrialState.PRUNED

    def study_of(*trials):
        study = optuna.create_study(direction="maximize")
        for t in trials:
            if isinstance(t, float):
                study.add_trial(optuna.trial.create_trial(value=t))
            else:
                study.add_trial(optuna.trial.create_trial(state=pruned, user_attrs={"state": t}))
        return study

    assert trials_since_best(study_of()) is None
    assert trials_since_best(study_of("pruned", "pruned")) is None  # no complete trial yet
    assert trials_since_best(study_of("pruned", 0.5)) == 0
    assert trials_since_best(study_of(0.5, "pruned", 0.4, "pruned")) == 3
    assert trials_since_best(study_of(0.5, "pruned", 0.6, "pruned")) == 1  # a new best resets it
    assert trials_since_best(study_of(0.5, 0.5, 0.5)) == 2  # ties do not beat the best
    assert trials_since_best(
        study_of(0.5, "too slow", "diverged", "rejected", "stopped", "failed", "pruned")) == 1


def test_counting_only_complete_trials_trials_since_best_is_optunas_stagnation_rule():
    """With no pruned trials, trials_since_best is the rule of optuna.terminator's
    BestValueStagnationEvaluator (deprecated in Optuna 4.9, a warning on every use): on random studies
    with ties, both agree; trials stopped for other reasons than the pruner change neither."""
    import warnings

    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from optuna.terminator import BestValueStagnationEvaluator
    for _ in range(30):
        study = optuna.create_study(direction="maximize")
        assert trials_since_best(study) is None
        for value in rng.choice([0.5, 0.6, 0.7, 0.8], size=rng.integers(1, 12)):  # ties on purpose
            study.add_trial(optuna.trial.create_trial(value=float(value)))
            if rng.random() < 0.3:
                study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED,
                                                          user_attrs={"state": "too slow"}))
        with warnings.catch_warnings():  # deprecated and experimental: warnings either way
            warnings.simplefilter("ignore")
            left = BestValueStagnationEvaluator(max_stagnation_trials=0).evaluate(study.trials, study.direction)
        assert trials_since_best(study) == -left


def test_final_fraction_auto_ends_a_stagnant_search_and_hands_the_rest_to_the_final_phase(tmp_path):
    import io

    from budgetnet.search.clock import AUTO_SEARCH_MIN, STAGNANT_TRIALS, Clock

    opts = _opts(tmp_path, 3.0, budget_seconds=100.0, final_fraction=0.25, final_auto=True)
    study = optuna.create_study(study_name="s", storage=opts.storage, direction="maximize")
    used = {"s": 0.0}
    clock = Clock(100.0, 0.0, time.perf_counter())
    clock.used = lambda: used["s"]  # budget time, set by the test
    out = io.StringIO()
    fits = search_fits(opts, study, clock, 3.0, Reporter("text", out))
    for value in (0.5, 0.8):
        study.add_trial(optuna.trial.create_trial(value=value))
    for _ in range(STAGNANT_TRIALS):
        study.add_trial(optuna.trial.create_trial(value=0.7))
    used["s"] = AUTO_SEARCH_MIN * 100 - 1
    assert fits()  # stagnant, but before the least share of the search
    used["s"] = AUTO_SEARCH_MIN * 100 + 1
    assert not fits() and "not improved in 3 judged trials" in out.getvalue()
    assert study.user_attrs["search_ended"] == pytest.approx(41.0)
    # every worker sees the decision through the study, whatever its own clock says
    assert not search_fits(opts, study, Clock(100.0, 0.0, time.perf_counter()), 3.0)()
    # one more complete trial that beats the best would have kept it going; a fixed share never stops early
    fresh = optuna.create_study(study_name="t", storage=opts.storage, direction="maximize")
    for value in (0.5, 0.8, 0.7, 0.7, 0.9):
        fresh.add_trial(optuna.trial.create_trial(value=value))
    assert search_fits(opts, fresh, clock, 3.0)()
    # trials the median pruner stopped count as judged: a search whose trials are mostly pruned ends too
    judged = optuna.create_study(study_name="v", storage=opts.storage, direction="maximize")
    judged.add_trial(optuna.trial.create_trial(value=0.8))
    for _ in range(STAGNANT_TRIALS):
        judged.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={"state": "pruned"}))
    assert not search_fits(opts, judged, clock, 3.0)() and "search_ended" in judged.user_attrs
    fixed = dataclasses.replace(opts, final_auto=False)
    stagnant = optuna.create_study(study_name="u", storage=opts.storage, direction="maximize")
    for value in (0.8, 0.7, 0.7, 0.7, 0.7):
        stagnant.add_trial(optuna.trial.create_trial(value=value))
    assert search_fits(fixed, stagnant, clock, 3.0)() and "search_ended" not in stagnant.user_attrs
