"""The final pick (``--pick``): the estimate on curves with known limits, the finalists, the race (it keeps
the finalist that trains better, within the budget, and a kill -9 mid-race resumes), and what reports it."""

from __future__ import annotations

import io
import json
import math
import os
import random
import subprocess
import time

import optuna
import pytest

from budgetnet.checkpoint import load_checkpoint
from budgetnet.config import DataConfig, PlainConfig, RunConfig, TrainConfig
from budgetnet.search import attrs as A
from budgetnet.search.clock import Clock
from budgetnet.search.options import SearchOptions
from budgetnet.search.pick import (
    MAX_ERROR_CUT,
    Choice,
    choose,
    estimate,
    finalists,
    rank,
    standard_error,
    tta,
)
from budgetnet.search.progress import Reporter
from budgetnet.search.storage import stored_study_attrs


def _curve(a: float, b: float, c: float, epochs: float, marks: int = 10, val: int = 2000, last: int = 6000,
           rng: random.Random | None = None) -> list:
    """A validation curve a - b e^-c at ``marks`` equal steps up to ``epochs``, with binomial noise from
    ``rng`` (none without): intermediate marks score ``val`` images, the last ``last``."""
    out = []
    for k in range(1, marks + 1):
        e, n = epochs * k / marks, val if k < marks else last
        y = a - b * e ** -c
        if rng is not None:
            y += rng.gauss(0.0, math.sqrt(y * (1 - y) / n))
        out.append([e, y, n])
    return out


def test_the_estimate_finds_a_known_limit_and_keeps_a_flat_or_falling_curve_where_it_is():
    # a curve that still rises steeply: the estimate lands near the true value at 8x the epochs
    curve = _curve(0.95, 0.3, 1.0, 5.0)
    est = estimate(curve, curve[-1][1], 40.0)
    truth = 0.95 - 0.3 / 40.0
    assert est.value > curve[-1][1] + 0.02 and abs(est.value - truth) < 0.01 and est.weight > 0.8
    # flat and falling curves gain nothing; nor does a final no longer than the trial
    for flat in (_curve(0.9, 0.0, 1.0, 5.0), [[e, 0.95 - 0.005 * e, n] for e, _, n in _curve(0.9, 0, 1, 5.0)]):
        assert estimate(flat, flat[-1][1], 40.0).value == flat[-1][1]
    assert estimate(curve, curve[-1][1], 5.0).value == curve[-1][1]
    # too few points past half the trial's epochs: the observed value
    assert estimate(curve[-3:], curve[-1][1], 40.0).value == curve[-1][1]
    # bounded: never more than MAX_ERROR_CUT of the observed error, however steep the curve
    steep = _curve(2.0, 1.2, 0.25, 2.0)
    steep = [[e, min(y, 0.9), n] for e, y, n in steep]
    est = estimate(steep, 0.6, 1e6)
    assert est.value <= 0.6 + MAX_ERROR_CUT * 0.4 + 1e-12


def test_over_noisy_curves_the_estimate_is_nearer_the_truth_than_the_observed_value_and_shrinks_noise():
    rng = random.Random(0)
    truth = 0.93 - 0.25 / 40.0
    observed_err, estimate_err = [], []
    for _ in range(200):
        curve = _curve(0.93, 0.25, 1.0, 5.0, rng=rng)
        observed_err.append(abs(curve[-1][1] - truth))
        estimate_err.append(abs(estimate(curve, curve[-1][1], 40.0).value - truth))
    assert sum(estimate_err) < 0.6 * sum(observed_err)
    # pure noise around a level: shrunk to (nearly) the observed value
    gains = []
    for _ in range(200):
        noisy = _curve(0.9, 0.0, 1.0, 5.0, rng=rng)
        gains.append(estimate(noisy, noisy[-1][1], 40.0).value - noisy[-1][1])
    assert sum(gains) / len(gains) < 0.002 and max(gains) < 0.02


def _trial(number: int, value: float, cfg: RunConfig, curve: list, rate: float = 1000.0):
    return optuna.trial.create_trial(
        value=value, intermediate_values={round(100 * (k + 1) / len(curve)): p[1] for k, p in enumerate(curve)},
        user_attrs={str(k): v for k, v in ((A.CONFIG, cfg.to_json(indent=None)), (A.CURVE, curve),
                                           (A.EPOCHS, curve[-1][0]), (A.IMAGES_PER_S, rate), (A.N_PARAMS, 1000),
                                           (A.FLOPS, 2000), (A.FAMILY, cfg.model.family))})


def _cfg(width: int = 8, lr: float = 0.1) -> RunConfig:
    return RunConfig(model=PlainConfig(n_conv=2, width=width, hidden=(32,)), train=TrainConfig(lr=lr, batch_size=64),
                     data=DataConfig(dataset="synthetic"))


def test_finalists_are_the_distinct_configs_within_the_validation_noise_of_the_leader():
    flat = [[k / 2, 0.9, 2000] for k in range(1, 11)]
    trials = [_trial(0, 0.90, _cfg(8), flat[:-1] + [[5, 0.90, 400]]),
              _trial(1, 0.89, _cfg(9), flat[:-1] + [[5, 0.89, 400]]),
              _trial(2, 0.89, _cfg(8), flat[:-1] + [[5, 0.89, 400]]),  # the leader's config again
              _trial(3, 0.80, _cfg(10), flat[:-1] + [[5, 0.80, 400]])]  # far below, beyond the noise
    for number, t in enumerate(trials):
        t.number = number
    picked = [r.trial.number for r in finalists(rank(trials))]
    assert picked == [0, 1]
    assert standard_error(0.9, 400) == pytest.approx(0.015)
    # on a validation split 100x larger the same gap is signal, not noise: no finalist but the leader
    big = [_trial(n, t.value, _cfg(8 + n), flat[:-1] + [[5, t.value, 40_000]]) for n, t in enumerate(trials)]
    for number, t in enumerate(big):
        t.number = number
    assert [r.trial.number for r in finalists(rank(big))] == [0]


def test_pick_by_estimate_prefers_the_curve_still_rising_and_observed_keeps_the_slice_winner():
    plateau = _curve(0.915, 0.02, 2.0, 5.0)  # the slice winner: it has nearly reached its limit
    rising = _curve(0.96, 0.25, 1.0, 5.0)  # behind at the slice, still climbing
    trials = [_trial(0, plateau[-1][1], _cfg(8), plateau), _trial(1, rising[-1][1], _cfg(16), rising)]
    for number, t in enumerate(trials):
        t.number = number
    assert trials[0].value > trials[1].value
    observed, _ = choose(trials, "observed", 400.0, 10_000)
    by_estimate, est = choose(trials, "estimate", 400.0, 10_000)
    assert observed.trial.number == 0 and observed.by == "observed" and not observed.finalists
    assert by_estimate.trial.number == 1 and by_estimate.by == "estimate"
    assert est[1].value > est[0].value and est[1].final_epochs == pytest.approx(40.0)
    assert by_estimate.as_attr()["observed_best"] == 0 and by_estimate.as_attr()["estimate_best"] == 1


def _race_study(tmp_path, cfgs_values: list[tuple[RunConfig, float]]):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s", direction="maximize")
    for cfg, value in cfgs_values:
        study.add_trial(_trial(0, value, cfg, [[k / 4, value, 2000] for k in range(1, 10)] + [[2.5, value, 400]]))
    return study


@pytest.mark.timing
def test_the_race_keeps_the_finalist_that_trains_better_where_the_slice_winner_loses(tmp_path, synthetic_data,
                                                                                     slice_s):
    """Constructed: the study says trial 0 won its slice, but its config cannot learn (lr 1e-9); trial 1,
    within the noise of it, can. The race trains both, keeps trial 1, and its leg goes on to best.pt."""
    import budgetnet.search.final as final

    study = _race_study(tmp_path, [(_cfg(8, lr=1e-9), 0.95), (_cfg(8, lr=0.1), 0.93)])
    trials = study.get_trials(deepcopy=False)
    seconds = 8 * slice_s  # legs of 0.3 * 8 / 2 = 1.2 slices: the race runs
    choice, _ = choose(trials, "race", seconds, 2800)
    assert [r.trial.number for r in choice.finalists] == [0, 1] and choice.trial.number == 0
    opts = SearchOptions(max_params=30_000, budget_seconds=seconds + 3.0, dataset="synthetic", pick="race",
                         storage=f"sqlite:///{tmp_path / 's.db'}", out=str(tmp_path / "best.pt"),
                         artifact_dir=str(tmp_path / "art"), trial_seconds=slice_s, device="cpu")
    out = io.StringIO()
    t0 = time.perf_counter()
    phase, metrics = final.final_training(opts, study, choice, Clock(opts.budget_seconds, 0.0, t0), lambda: False,
                                          Reporter("text", out), "fp32", split=synthetic_data, slice_s=slice_s)
    wall = time.perf_counter() - t0
    race = study.user_attrs["race"]
    assert race["state"] == "decided" and race["winner"] == 1, out.getvalue()
    assert race["legs"]["1"]["val_acc"] > race["legs"]["0"]["val_acc"] + 0.2
    assert race["leg_seconds"] == pytest.approx(0.3 * seconds / 2, rel=0.1)
    assert choice.by == "race" and choice.trial.number == 1
    assert study.user_attrs["pick"]["by"] == "race" and study.user_attrs["pick"]["trial"] == 1
    assert phase == "final" and metrics["fit_acc"] > 0.5
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["extra"]["trial"] == 1 and ckpt["extra"]["picked_by"] == "race"
    assert ckpt["run_config"].train.lr == pytest.approx(0.1)
    # the winner went on from its leg: its run's seconds count the leg too, nothing trained twice
    assert ckpt["train_seconds"] >= race["legs"]["1"]["seconds"] + 0.5 * (seconds - 2 * race["leg_seconds"])
    assert wall <= opts.budget_seconds + 5.0
    assert "final race: trials 0, 1" in out.getvalue()


def test_a_race_that_cannot_give_each_finalist_a_slice_is_skipped_in_one_line(tmp_path, synthetic_data):
    import budgetnet.search.final as final

    study = _race_study(tmp_path, [(_cfg(8), 0.95), (_cfg(9), 0.94)])
    choice, _ = choose(study.get_trials(deepcopy=False), "race", 4.0, 2800)
    opts = SearchOptions(max_params=30_000, budget_seconds=7.0, dataset="synthetic", pick="race",
                         storage=f"sqlite:///{tmp_path / 's.db'}", out=str(tmp_path / "best.pt"),
                         artifact_dir=str(tmp_path / "art"), trial_seconds=5.0, device="cpu")
    out = io.StringIO()
    final.final_training(opts, study, choice, Clock(7.0, 0.0, time.perf_counter()), lambda: False,
                         Reporter("text", out), "fp32", split=synthetic_data, slice_s=5.0)
    (line,) = [x for x in out.getvalue().splitlines() if "race" in x]
    assert line.startswith("final race skipped:") and "under a 5 s trial slice each" in line
    assert study.user_attrs["race"]["state"] == "skipped" and study.user_attrs["pick"]["trial"] == 0


def _cli(tmp_path, budget_h: str, slice_s: float, *extra) -> list[str]:
    """A race search on a grid of four nets that all learn the synthetic task: ties within the noise."""
    import sys

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"base": {"model": {"family": "plain", "n_conv": 2, "hidden": [32]},
                                         "train": {"batch_size": 64}},
                                "grid": {"model.width": [6, 8], "model.kernel": [3, 5]}}))
    return [sys.executable, "-m", "budgetnet", "search", "--dataset", "synthetic", "--max-params", "30k",
            "--hours", budget_h, "--trial-seconds", f"{slice_s:.2f}", "--storage", f"sqlite:///{tmp_path / 's.db'}",
            "--artifact-dir", str(tmp_path / "art"), "--out", str(tmp_path / "best.pt"), "--device", "cpu",
            "--final-fraction", "0.6", "--pick", "race", "--sampler", "grid", "--grid", str(grid),
            "--pruner", "none", "--study-name", "race", "--json", *extra]


def _attrs(tmp_path) -> dict:
    try:  # the file may be mid-creation
        return stored_study_attrs(f"sqlite:///{tmp_path / 's.db'}", "race") or {}
    except Exception:  # noqa: BLE001
        return {}


@pytest.mark.timing
@pytest.mark.slow
def test_a_search_with_a_race_holds_its_budget_and_a_kill_9_mid_race_resumes_without_racing_again(tmp_path,
                                                                                                  slice_s):
    """A --pick race search on a task where trials tie within the noise: killed -9 during a leg, the same
    command resumes its final phase without a second race, trains the pick's leader in the time left and
    writes best.pt; both runs together hold the one budget, and best.json says how the config was picked."""
    budget_h = f"{16 * slice_s / 3600:.5f}"  # a final phase of 9.6 slices: legs of 1.4 slices for two racers
    budget = float(budget_h) * 3600
    cmd = _cli(tmp_path, budget_h, slice_s)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    end = time.time() + budget + 60
    while time.time() < end and proc.poll() is None and _attrs(tmp_path).get("race", {}).get("state") != "racing":
        time.sleep(0.2)
    race = _attrs(tmp_path).get("race", {})
    if race.get("state") != "racing":
        out, err = proc.communicate(timeout=budget + 60)
        pytest.fail(f"no race started: {race}; {out[-2000:]} {err[-2000:]}")
    time.sleep(0.5 * race["leg_seconds"])  # mid-leg
    proc.kill()
    proc.communicate()
    first = time.perf_counter() - t0
    assert load_checkpoint(tmp_path / "best.pt")["extra"]["phase"] == "search"  # the search's model is safe

    t0 = time.perf_counter()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=budget + 120)
    walls = first + time.perf_counter() - t0
    assert second.returncode == 0, second.stderr
    events = [json.loads(line) for line in second.stdout.splitlines() if line.startswith("{")]
    texts = [e.get("text", "") for e in events]
    assert any("race an earlier run started was interrupted" in t for t in texts), texts
    assert not any(t.startswith("final race: trials") for t in texts)  # no second race
    attrs = _attrs(tmp_path)
    assert attrs["race"]["state"] == "interrupted" and attrs["final_runs"] == 2
    summary = events[-1]
    assert summary["event"] == "summary" and summary["checkpoint_phase"] in ("final", "search")
    assert summary["seconds_used"] <= budget + 15.0
    assert walls <= budget + 15.0 + 2 * 5.0  # the one budget, its overshoot bound, two start-ups
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["pick"]["asked"] == "race" and best["pick"]["race"]["state"] == "interrupted"
    assert best["pick"]["trial"] == attrs["pick"]["trial"] == best["picked_trial"]
    assert best["pick"]["line"].startswith(f"final config: trial {best['pick']['trial']}, picked by")
    if summary["checkpoint_phase"] == "final":
        ckpt = load_checkpoint(tmp_path / "best.pt")
        assert ckpt["extra"]["trial"] == best["picked_trial"]
        assert json.loads(ckpt["run_config"].to_json()) == best["config"]


def test_choice_of_a_trial_is_the_observed_pick():
    t = optuna.trial.create_trial(value=0.5)
    c = Choice.of(t)
    assert (c.by, c.asked, c.finalists, c.observed_best) == ("observed", "observed", [], t.number)


def _flip(fixed: int, broke: int, n: int = 10_000, right: int = 9_000) -> dict:
    return {"val_acc": right / n, "val_acc_flip": (right + fixed - broke) / n, "flip_fixed": fixed, "flip_broke": broke}


def test_flip_averaging_of_a_flip_trained_config_stays_off_only_where_validation_shows_it_hurts():
    # McNemar, one-sided at 5%: off where broke - fixed exceeds 1.645 sqrt(fixed + broke)
    assert tta("auto", _flip(60, 20))[0] == "flip"
    assert tta("auto", _flip(38, 29))[0] == "flip"  # a gain within the noise: the final model's is larger
    assert tta("auto", _flip(37, 41))[0] == "flip"  # a loss within the noise: 4 < 1.645 sqrt(78) = 14.5
    assert tta("auto", _flip(25, 40))[0] == "none"  # 15 > 1.645 sqrt(65) = 13.3
    assert tta("auto", _flip(0, 0)) == ("none", "its two views agree on every validation image")
    on, why = tta("auto", _flip(60, 20))
    assert "fixed 60 images and broke 20" in why and "90.00% -> 90.40%" in why
    assert "it hurts, beyond the noise" in tta("auto", _flip(25, 40))[1]
    # no score (a config trained without mirrored images), a cap two views would break, or the user's word
    assert tta("auto", None) == ("none", "the picked trial has no flip score (a config trained without mirrored "
                                         "images)")
    assert tta("auto", _flip(60, 20), "--max-flops (2 x 3 M MACs)")[0] == "none"
    assert tta("flip", _flip(20, 60)) == ("flip", "--tta flip")
    assert tta("flip", None, "--max-latency-ms (2 x 1 ms)")[0] == "none"
    assert tta("none", _flip(600, 20)) == ("none", "--tta none")


def test_the_final_phase_counts_two_views_against_every_cap_before_turning_flip_averaging_on(tmp_path):
    from budgetnet.search.final import final_tta

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    trial = study.ask()
    trial.set_user_attr(A.FLOPS, 2_000_000)  # 1 M MACs an image
    trial.set_user_attr(A.LATENCY_MS, 0.6)
    trial.set_user_attr(A.FLIP, _flip(60, 20))
    study.tell(trial, 0.9)
    frozen = study.trials[0]
    lines = []
    reporter = Reporter("quiet")
    reporter.message = lines.append

    def decided(**caps) -> str:
        opts = SearchOptions(max_params=1e6, budget_seconds=60, dataset="synthetic", **caps)
        return final_tta(opts, study, frozen, reporter)

    assert decided() == "flip" and A.TTA.of(study)["tta"] == "flip" and "flip averaging: on" in lines[-1]
    assert decided(max_flops=2.0e6) == "flip"  # two views: 2 M MACs, at the cap
    assert decided(max_flops=1.9e6) == "none" and "--max-flops" in A.TTA.of(study)["why"]
    assert decided(max_latency_ms=1.3) == "flip"
    assert decided(max_latency_ms=1.1) == "none" and "--max-latency-ms" in lines[-1]
    assert decided(tta="none") == "none"
