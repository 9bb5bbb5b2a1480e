"""The deployment caps beside --max-params: --max-flops (MACs, exact, on the meta device) and
--max-latency-ms (measured before any training), and the final model checked against every cap."""

from __future__ import annotations

import dataclasses
import json
import time

import optuna
import pandas as pd
import pytest
import torch

import budgetnet.search.trial as trial_mod
from budgetnet.budget import BudgetExceeded, check_flops, count_flops, count_macs
from budgetnet.cli import main
from budgetnet.config import DataConfig, MobileNetConfig, PlainConfig, ResNetConfig, RunConfig
from budgetnet.datasets.info import DATASET_INFO
from budgetnet.evaluate import evaluate_checkpoint, format_report
from budgetnet.latency import MIN_REPEATS, SECONDS, deployment_latency
from budgetnet.models import build_model
from budgetnet.search import resume
from budgetnet.search.options import SearchOptions, StudyMismatch
from budgetnet.search.progress import Reporter
from budgetnet.search.session import run_search
from budgetnet.search.space import load_grid, max_width, sampling_flops, suggest_config
from budgetnet.search.storage import make_sampler
from budgetnet.search.trial import Caps, guard

optuna.logging.set_verbosity(optuna.logging.WARNING)
CIFAR = DATASET_INFO["cifar100"].shape
SYNTH = DATASET_INFO["synthetic"].shape


@pytest.mark.parametrize("cfg", [PlainConfig(n_conv=3, width=12), ResNetConfig(depths=(2, 2, 2)),
                                 MobileNetConfig(depths=(1, 1, 1, 1, 1))], ids=["plain", "resnet", "mobilenet"])
def test_the_mac_guard_refuses_exactly_above_the_cap(cfg):
    flops = count_flops(cfg, CIFAR)
    macs = count_macs(cfg, CIFAR)
    assert flops == 2 * macs  # the flop counter's 2 per multiply-add: MACs are exactly half
    assert check_flops(cfg, CIFAR, macs) == flops  # at the cap: passes
    with pytest.raises(BudgetExceeded) as e:
        check_flops(cfg, CIFAR, macs - 1)  # one MAC over
    assert (e.value.what, e.value.value, e.value.cap) == ("MACs", macs, macs - 1)
    assert "MACs" in str(e.value) and "--max-flops" in str(e.value)
    # the trial's guard: the same rule, rejected with the numbers and a constraint per cap
    run = RunConfig(model=cfg)
    at = guard(run, CIFAR, Caps(1e9, max_macs=macs), lambda k, v: None)
    over = guard(run, CIFAR, Caps(1e9, max_macs=macs - 1), lambda k, v: None)
    assert at.state == "stopped" and at.constraints["macs"] == 0 and at.flops == flops
    assert over.state == "rejected" and over.constraints["macs"] == 1 and over.flops == flops
    assert "MACs" in over.reason and over.latency_ms is None


def test_a_mac_count_is_the_multiply_adds_of_the_layers_by_hand():
    """Two padded 3x3 convs (4, then 8 channels) with pools, and two linear layers: counted by hand from the
    shapes a real forward pass produces."""
    cfg = PlainConfig(n_conv=2, width=4, kernel=3, hidden=(8,), batch_norm=False)
    model = build_model(cfg, SYNTH)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = torch.zeros(1, SYNTH.channels, SYNTH.image_size, SYNTH.image_size)
    expected, sizes = 0, {}
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.__setitem__(m, o.shape)) for m in convs]
    model.eval()(x)
    for h in hooks:
        h.remove()
    for m in convs:
        _, c_out, h, w = sizes[m]
        expected += c_out * h * w * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
    expected += sum(m.in_features * m.out_features for m in linears)
    assert count_macs(cfg, SYNTH) == expected


def test_the_space_samples_no_config_over_the_mac_cap_across_many_tpe_proposals():
    cap = 3e6  # MACs; a width-1 net of every family is far under it
    bound = sampling_flops(None, cap)
    assert bound == 2 * cap and sampling_flops(1e7, cap) == 2 * cap and sampling_flops(5e6, cap) == 5e6
    assert sampling_flops(None, None) is None and sampling_flops(5e6, None) == 5e6
    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", seed=0))
    for _ in range(40):
        trial = study.ask()
        cfg = suggest_config(trial, CIFAR, 1e6, DataConfig(), max_flops=bound)
        macs = count_macs(cfg.model, CIFAR)
        assert macs <= cap, (macs, cfg.model)
        study.tell(trial, macs / cap)  # rewards size: TPE pushes against the cap
    assert max_width(PlainConfig(), CIFAR, 1e6, bound) > 0


@pytest.mark.timing
def test_the_deployment_latency_is_a_bounded_median_on_its_own_threads_restored_after():
    model = build_model(PlainConfig(n_conv=2, width=8, hidden=()), SYNTH).train()
    before = torch.get_num_threads()
    seen = []
    real_forward = model.forward
    model.forward = lambda x: seen.append((torch.get_num_threads(), model.training)) or real_forward(x)
    m = deployment_latency(model, SYNTH, "cpu", n_threads=2)
    assert torch.get_num_threads() == before and model.training  # both restored
    assert set(seen) == {(2, False)}  # timed on its own threads, in eval mode
    assert m["latency_ms"] > 0 and m["repeats"] >= MIN_REPEATS and m["threads"] == 2
    assert len(seen) == 3 + m["repeats"]  # warm-up, then the timed forwards
    assert m["seconds"] < SECONDS + 2.0  # stops repeating at about a second (a tiny net: ms a forward)


def _grid(widths) -> tuple:
    return load_grid(json.dumps({"base": {"model": {"family": "plain", "n_conv": 2, "hidden": [16]},
                                          "train": {"batch_size": 64}},
                                 "grid": {"model.width": widths}}))


def _opts(tmp_path, **kw) -> SearchOptions:
    defaults = dict(max_params=1e6, budget_seconds=60, dataset="synthetic", storage=f"sqlite:///{tmp_path}/s.db",
                    out=str(tmp_path / "best.pt"), artifact_dir=str(tmp_path / "art"), trial_seconds=0.5,
                    device="cpu", sampler="grid", final_fraction=0.0, warm_start=False, precision="fp32")
    return SearchOptions(**{**defaults, **kw})


def test_the_latency_guard_rejects_a_config_over_its_cap_and_trains_nothing(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(trial_mod, "train_run", lambda *a, **kw: trained.append(1))  # no training may start
    threads = torch.get_num_threads()
    summary = run_search(_opts(tmp_path, grid=_grid([4, 8]), max_latency_ms=0.001, latency_threads=2),
                         Reporter("quiet"), started=time.perf_counter())
    assert not trained and torch.get_num_threads() == threads
    assert summary["trials"]["rejected"] == 2 and summary["checkpoint"] is None
    assert "over a cap" in summary["error"] and "--max-latency-ms" in summary["error"]
    study = optuna.load_study(study_name=summary["study"], storage=_opts(tmp_path).storage)
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.PRUNED and t.user_attrs["state"] == "rejected"
        assert t.user_attrs["latency_ms"] > 0.001 and "seconds" not in t.user_attrs
        assert "latency" in t.user_attrs["reason"] and "2 threads" in t.user_attrs["reason"]
        assert t.system_attrs["constraints:latency_ms"] == pytest.approx(t.user_attrs["latency_ms"] - 0.001, abs=1e-3)
    guard = summary["guard"]
    assert guard["trials_latency_measured"] == 2 and guard["seconds"] > 0
    assert guard["share_of_budget"] == pytest.approx(guard["seconds"] / 60, abs=1e-4)


def test_a_resume_with_another_flops_or_latency_cap_is_refused_in_one_line(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="capped", storage=storage, direction="maximize")
    for key, value in (("max_params", 30_000.0), ("dataset", "synthetic"), ("max_flops", 2e7),
                       ("max_latency_ms", None), ("latency_device", "cpu"), ("latency_threads", 1)):
        study.set_user_attr(key, value)
    base = ["search", "--study-name", "capped", "--storage", storage, "--hours", "0.01", "--device", "cpu",
            "--dataset", "synthetic", "--max-params", "30k", "--out", str(tmp_path / "best.pt"),
            "--artifact-dir", str(tmp_path / "art")]
    for changed, expected in (
            (["--max-flops", "30M"], "with --max-flops 20000000, not 30000000; resume it with --max-flops 20000000"),
            ([], "with --max-flops 20000000, not without it"),
            (["--max-flops", "2e7", "--max-latency-ms", "2"], "without --max-latency-ms, not with --max-latency-ms 2")):
        assert main(base + changed) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert not optuna.load_study(study_name="capped", storage=storage).trials
    assert not (tmp_path / "best.pt").exists()
    same = SearchOptions(max_params=30_000, budget_seconds=36, dataset="synthetic", max_flops=2e7)
    resume.check_same_study(storage, "capped", same)  # the same caps resume
    study.set_user_attr("max_latency_ms", 2.0)
    with pytest.raises(StudyMismatch, match="--latency-threads 1, not 4"):  # measured otherwise: another cap
        resume.check_same_study(storage, "capped", dataclasses.replace(same, max_latency_ms=2.0, latency_threads=4))


def test_train_refuses_a_config_over_max_flops_in_one_line(tmp_path, capsys):
    cfg = RunConfig(model=PlainConfig(n_conv=2, width=8, hidden=()), data=DataConfig(dataset="synthetic"))
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    macs = count_macs(cfg.model, SYNTH)
    assert main(["train", "--config", str(path), "--epochs", "1", "--max-flops", str(macs - 1), "--device", "cpu",
                 "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"MACs {macs:,} per image exceed" in err[0]
    assert not (tmp_path / "m.pt").exists()


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """A grid search under all three caps: width 4 and 8 pass, width 48 is over the MAC cap; best.pt from
    the search, evaluated; the report written."""
    tmp = tmp_path_factory.mktemp("caps")
    cfg = PlainConfig(n_conv=2, hidden=(16,))
    cap = (count_macs(dataclasses.replace(cfg, width=8), SYNTH) + count_macs(dataclasses.replace(cfg, width=48), SYNTH)) // 2
    opts = _opts(tmp, grid=_grid([4, 8, 48]), max_flops=cap, max_latency_ms=1e4)
    summary = run_search(opts, Reporter("quiet"), started=time.perf_counter())
    report = evaluate_checkpoint(tmp / "best.pt", device="cpu", latency_repeats=1, precision="fp32")
    from budgetnet.evaluate import save_evaluation

    save_evaluation(report)
    assert main(["report", "--storage", opts.storage, "--checkpoint", str(tmp / "best.pt"),
                 "--out", str(tmp / "report")]) == 0
    return tmp, opts, summary, report


def test_best_json_evaluate_and_report_carry_the_measured_latency(capped):
    tmp, opts, summary, report = capped
    best = json.loads((tmp / "best.json").read_text())
    assert best["trials"]["complete"] == 2 and best["trials"]["rejected"] == 1
    assert best["caps"]["max_flops"] == opts.max_flops and best["caps"]["max_flops_unit"] == "MACs"
    assert 0 < best["latency_ms"] < 1e4 and best["macs"] == best["flops"] // 2 <= opts.max_flops
    check = best["final_check"]
    assert check["over"] == [] and check["latency_ms"] > 0 and check["latency_device"] == "cpu"
    assert check["macs"] <= opts.max_flops and check["latency_threads"] == 1
    assert best["guard"]["trials_latency_measured"] == 2 and best["guard"]["seconds"] > 0
    dep = report["deployment_latency"]
    assert dep["latency_ms"] > 0 and (dep["device"], dep["threads"], dep["batch_size"]) == ("cpu", 1, 1)
    assert "deployment latency (batch 1, fp32, cpu, 1 thread)" in format_report(report)
    assert [lat["batch_size"] for lat in report["latency"]] == [1, 256]  # evaluate's own rows stay
    summ = json.loads((tmp / "report" / "summary.json").read_text())
    assert summ["best"]["latency_ms"] == pytest.approx(best["latency_ms"], rel=1e-3)
    assert summ["checkpoint"]["final_check"]["latency_ms"] == check["latency_ms"]
    assert summ["checkpoint"]["deployment_latency"]["latency_ms"] == dep["latency_ms"]
    assert summ["max_flops"] == opts.max_flops and summ["max_latency_ms"] == 1e4
    df = pd.read_csv(tmp / "report" / "trials.csv")
    assert df["latency_ms"].notna().sum() == 2 and "pareto_latency_ms" in df.columns
    rejected = df[df["budgetnet_state"] == "rejected"]
    assert len(rejected) == 1 and "MACs" in rejected["reason"].iloc[0] and rejected["latency_ms"].isna().all()


def test_the_reports_latency_plot_is_written_with_the_caps_drawn(capped):
    tmp, opts, summary, _ = capped
    page = (tmp / "report" / "accuracy_vs_latency.html").read_text()
    assert "latency at batch 1 (ms)" in page and "cap 10000 ms" in page
    flops_page = (tmp / "report" / "accuracy_vs_flops.html").read_text()
    assert f"--max-flops {opts.max_flops:,.0f} MACs = {2 * opts.max_flops:,.0f} FLOPs" in flops_page
    assert "accuracy_vs_latency.html" in (tmp / "report" / "index.html").read_text()


def test_on_ray_the_driver_measures_the_latency_and_an_over_cap_config_never_becomes_a_ray_trial(
        tmp_path, synthetic_data):
    pytest.importorskip("ray")
    from budgetnet.search import ray_backend as rb
    from budgetnet.search.clock import Clock
    from budgetnet.search.objective import Objective
    from budgetnet.search.phase import Interrupt

    opts = SearchOptions(max_params=30_000, budget_seconds=100, dataset="synthetic", storage=_opts(tmp_path).storage,
                         study_name="r", out=str(tmp_path / "best.pt"), device="cpu", backend="ray",
                         max_latency_ms=0.001)
    study = optuna.create_study(study_name="r", storage=opts.storage, direction="maximize")
    objective = Objective(opts, synthetic_data, Clock(100, 0, time.perf_counter(), study), 65, 3.0, Interrupt(),
                          Reporter("quiet"), study)
    rb._LIVE["r"] = rb._Live(objective, lambda: len(study.trials) < 2, 2, 1e9, "median stopping rule")
    try:
        assert rb.BudgetSearch("r").suggest("a") == rb.Searcher.FINISHED  # both proposals rejected in the driver
    finally:
        rb._LIVE.pop("r", None)
    assert len(study.trials) == 2
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.PRUNED and t.user_attrs["state"] == "rejected"
        assert t.user_attrs["latency_ms"] > 0.001 and "latency" in t.user_attrs["reason"]
        assert "ray_trial" not in t.user_attrs and t.user_attrs["guard_seconds"] > 0
        assert "constraints:latency_ms" in t.system_attrs
