"""budgetnet report: the table matches the study, every plot is written, and the page renders offline in a
real browser (headless Chromium) from the files alone."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import time

import optuna
import pandas as pd
import pytest

from budgetnet.checkpoint import load_checkpoint, save_checkpoint
from budgetnet.cli import main
from budgetnet.evaluate import evaluate_checkpoint, save_evaluation
from budgetnet.report.pages import PLOTS
from budgetnet.search.options import SearchOptions
from budgetnet.search.progress import Reporter
from budgetnet.search.session import run_search
from budgetnet.search.space import load_grid

optuna.logging.set_verbosity(optuna.logging.WARNING)
NETWORK_URL = re.compile(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", re.I)  # http://..., https://..., //cdn...


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A real budgetnet study on the synthetic task: a grid of four tiny nets trained for 0.5 s each and two
    over the 30k cap (rejected by the guard); best.pt from the search, evaluated on the test split."""
    tmp = tmp_path_factory.mktemp("report")
    grid = load_grid(json.dumps({
        "base": {"model": {"family": "plain", "n_conv": 2, "hidden": [16]}, "train": {"batch_size": 64}},
        "grid": {"model.width": [4, 8, 96], "train.lr": [0.05, 0.2]}}))  # width 96: over the cap, both lrs
    opts = SearchOptions(max_params=30_000, budget_seconds=60, dataset="synthetic", storage=f"sqlite:///{tmp}/s.db",
                         out=str(tmp / "best.pt"), artifact_dir=str(tmp / "art"), trial_seconds=0.5, device="cpu",
                         sampler="grid", grid=grid, final_fraction=0.0, warm_start=False, precision="fp32")
    summary = run_search(opts, Reporter("quiet"), started=time.perf_counter())
    report = evaluate_checkpoint(tmp / "best.pt", device="cpu", latency_repeats=1, precision="fp32")
    save_evaluation(report)
    study = optuna.load_study(study_name=summary["study"], storage=opts.storage)
    assert main(["report", "--storage", opts.storage, "--checkpoint", str(tmp / "best.pt"),
                 "--out", str(tmp / "report")]) == 0
    return tmp, study, report


def test_report_table_matches_the_study_and_every_plot_is_written(searched):
    tmp, study, evaluation = searched
    out = tmp / "report"
    df = pd.read_csv(out / "trials.csv")
    trials = study.trials
    assert len(trials) == 6 and df["number"].tolist() == [t.number for t in trials]
    states = {t.user_attrs.get("state") for t in trials}
    assert {"complete", "rejected"} <= states
    wanted = {"state", "budgetnet_state", "reason", "val_acc", "progress", "family", "n_params", "flops", "seconds",
              "images_per_s", "epochs"} | {f"params_{k}" for t in trials for k in t.params}
    assert wanted <= set(df.columns)
    for t, row in zip(trials, df.to_dict("records")):
        assert row["state"] == t.state.name and row["budgetnet_state"] == t.user_attrs["state"]
        assert (math.isnan(row["val_acc"]) if t.value is None else row["val_acc"] == pytest.approx(t.value))
        assert row["n_params"] == t.user_attrs["n_params"]
        assert row["params_model.width"] == json.loads(t.params["model.width"])  # grid values are JSON
        if t.intermediate_values:
            assert row["progress"] == max(t.intermediate_values) / 100
    # the Pareto flags, recomputed: a completed trial is off the front if another one dominates it
    done = df[df["state"] == "COMPLETE"]
    for _, row in done.iterrows():
        n, acc = done["n_params"], done["val_acc"]
        beaten = (((n <= row["n_params"]) & (acc > row["val_acc"])) | ((n < row["n_params"]) & (acc >= row["val_acc"])))
        assert row["pareto_n_params"] == (not beaten.any())
    assert not df.loc[df["state"] != "COMPLETE", "pareto_n_params"].any()

    for plot in PLOTS:
        page = (out / f"{plot.name}.html").read_text()
        assert f'id="plot-{plot.name}"' in page and 'src="plotly.min.js"' in page
    index = (out / "index.html").read_text()
    assert index.count("Plotly.newPlot") == len(PLOTS)
    assert (out / "plotly.min.js").stat().st_size > 1e6  # plotly.js itself, written once, beside the pages
    for page in [out / "index.html", *(out / f"{p.name}.html" for p in PLOTS)]:
        assert NETWORK_URL.findall(page.read_text()) == [], page.name  # nothing to fetch from a network

    summary = json.loads((out / "summary.json").read_text())
    best = max((t for t in trials if t.value is not None), key=lambda t: t.value)
    assert summary["best"]["trial"] == best.number and summary["best"]["config"] == json.loads(
        best.user_attrs["config"])
    assert summary["budget_seconds"] == 60 and summary["max_params"] == 30_000
    assert summary["checkpoint"]["test_top1"] == evaluation["top1"]
    assert f"{evaluation['top1']:.2%}" in index  # the model's test accuracy is on the page


def test_the_page_renders_offline_in_headless_chromium(searched, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it where apt-get can run)")
    index = searched[0] / "report" / "index.html"
    # Every host name resolves to nothing: the page must draw from the files beside it alone.
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=20000", "--dump-dom", index.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert "<h1>budgetnet report:" in dom
    # plotly marks a div it has drawn into as js-plotly-plot and puts its SVG layers (main-svg) inside it
    for plot in PLOTS:
        div = re.search(rf'<div id="plot-{plot.name}"[^>]*class="[^"]*js-plotly-plot[^"]*".*?class="main-svg"',
                        dom, re.S)
        assert div is not None, f"{plot.name} was not drawn"
    assert dom.count('class="main-svg"') >= len(PLOTS)


def test_pareto_front_keeps_ties_and_drops_dominated_rows():
    from budgetnet.report.study import pareto_front

    df = pd.DataFrame({"n_params": [10, 10, 20, 20, 30, 5, None],
                       "val_acc": [0.5, 0.5, 0.5, 0.7, 0.6, 0.1, 0.9]})
    assert pareto_front(df, "n_params").tolist() == [True, True, False, True, False, True, False]


def test_csv_on_stdout_and_json_summary_write_no_folder(searched, capsys, monkeypatch, tmp_path):
    tmp, study, _ = searched
    monkeypatch.chdir(tmp_path)  # where the default report/ folder would go
    storage = f"sqlite:///{tmp}/s.db"
    assert main(["report", "--storage", storage, "--csv", "-"]) == 0
    df = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert df["number"].tolist() == [t.number for t in study.trials]
    assert df["val_acc"].dropna().tolist() == pytest.approx([t.value for t in study.trials if t.value is not None])
    assert main(["report", "--storage", storage, "--json", "--study-name", study.study_name]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_trials"] == len(study.trials) and sum(summary["trials"].values()) == len(study.trials)
    assert summary["checkpoint"] is None  # no best.pt here: nothing to show
    assert list(tmp_path.iterdir()) == []  # stdout only: no report folder


def test_a_replaced_checkpoint_shows_no_stale_test_accuracy(searched, capsys):
    tmp, study, _ = searched
    ckpt = load_checkpoint(tmp / "best.pt")
    copy = tmp / "other" / "best.pt"
    save_checkpoint(copy, ckpt["run_config"], ckpt["state_dict"], metrics={"val_acc": 0.5}, n_params=ckpt["n_params"],
                    flops=ckpt["flops"], classes=ckpt["classes"], train_seconds=1.0, precision="fp32",
                    extra={"study": study.study_name, "phase": "search"})
    (tmp / "other" / "best.eval.json").write_text((tmp / "best.eval.json").read_text())  # of other bytes
    assert main(["report", "--storage", f"sqlite:///{tmp}/s.db", "--checkpoint", str(copy), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["checkpoint"]
    assert shown["path"] == str(copy) and shown["test_top1"] is None


def test_a_running_study_and_an_empty_one_still_report(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    empty = optuna.create_study(study_name="empty", storage=storage, direction="maximize")
    running = optuna.create_study(study_name="running", storage=storage, direction="maximize")
    running.enqueue_trial({"x": 0.5})
    trial = running.ask()
    trial.suggest_float("x", 0, 1)
    trial.report(0.4, 10)  # a trial under way, as a live search leaves it
    import logging

    logged = []  # Optuna's plots log "[W ...] Study instance does not contain trials" on stderr
    catch = logging.Handler(logging.WARNING)
    catch.emit = logged.append
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").addHandler(catch)
    try:
        for name in ("empty", "running"):
            assert main(["report", "--storage", storage, "--study-name", name, "--out", str(tmp_path / name)]) == 0
    finally:
        logging.getLogger("optuna").removeHandler(catch)
        optuna.logging.set_verbosity(verbosity)
    assert [r.getMessage() for r in logged] == []
    for name in ("empty", "running"):
        for plot in PLOTS:
            assert (tmp_path / name / f"{plot.name}.html").stat().st_size > 0
    df = pd.read_csv(tmp_path / "running" / "trials.csv")
    assert df["budgetnet_state"].tolist() == ["running"] and df["progress"].tolist() == [0.1]
    assert pd.read_csv(tmp_path / "empty" / "trials.csv").empty
    assert empty.trials == []


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory) -> str:
    storage = f"sqlite:///{tmp_path_factory.mktemp('two')}/s.db"
    for name in ("a", "b"):
        optuna.create_study(study_name=name, storage=storage)
    return storage


@pytest.mark.parametrize("case", ["no_file", "not_a_database", "no_study", "two_studies", "out_is_a_file",
                                  "both_on_stdout", "checkpoint_of_another_study", "csv_is_a_folder",
                                  "sqlite_file_without_its_scheme", "text_file_as_journal"])
def test_user_mistakes_give_one_line_and_exit_2(two_studies, tmp_path, capsys, case):
    storage = two_studies
    args = ["report", "--storage", storage, "--study-name", "a", "--out", str(tmp_path / "out")]
    if case == "no_file":
        args[2] = f"sqlite:///{tmp_path}/missing.db"
    elif case == "not_a_database":
        (tmp_path / "notes.db").write_text("not sqlite")
        args[2] = f"sqlite:///{tmp_path}/notes.db"
    elif case == "no_study":
        args[4] = "c"
    elif case == "two_studies":
        args = args[:3]
    elif case == "out_is_a_file":
        (tmp_path / "out").write_text("keep me")
    elif case == "both_on_stdout":
        args += ["--csv", "-", "--json"]
    elif case == "checkpoint_of_another_study":
        from budgetnet.config import PlainConfig, RunConfig

        cfg = RunConfig(model=PlainConfig(n_conv=1, width=4, hidden=()))
        save_checkpoint(tmp_path / "best.pt", cfg, {}, metrics={}, n_params=1, flops=1, classes=[],
                        train_seconds=0, precision="fp32", extra={"study": "someone-else"})
        args += ["--checkpoint", str(tmp_path / "best.pt")]
    elif case in ("sqlite_file_without_its_scheme", "text_file_as_journal"):
        if case == "text_file_as_journal":
            (tmp_path / "run.log").write_text("epoch 1 loss 2.3\n")
        args[2] = two_studies[len("sqlite:///"):] if case.startswith("sqlite") else str(tmp_path / "run.log")
    elif case == "csv_is_a_folder":  # refused before the page is written, in the user's own words
        (tmp_path / "tables").mkdir()
        args += ["--csv", str(tmp_path / "tables")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("budgetnet: error: ") and "\n" not in err
    if case == "csv_is_a_folder":
        assert f"--csv {tmp_path / 'tables'} is a directory" in err
    if case == "sqlite_file_without_its_scheme":  # the URL it needs, where Optuna said 'utf-8' codec can't...
        assert "is an SQLite database: give it as sqlite:///" in err
    if case == "text_file_as_journal":
        assert "its first line is not a journal entry" in err and (tmp_path / "run.log").read_text().count("\n") == 1
    assert not (tmp_path / "missing.db").exists()  # a storage that does not exist is not created
    if case == "not_a_database":
        assert (tmp_path / "notes.db").read_text() == "not sqlite"
    if case == "out_is_a_file":
        assert (tmp_path / "out").read_text() == "keep me"
    else:
        assert not (tmp_path / "out").exists()  # nothing written for a refused command


@pytest.mark.parametrize("mode", ["text", "quiet", "json"])
def test_a_warning_reaches_the_user_in_every_output_mode(mode):
    import io

    out, err = io.StringIO(), io.StringIO()
    reporter = Reporter(mode, out, err)
    reporter.message("resuming study 's'")
    reporter.warning("could not attach best.pt to the study as an artifact (disk full)")
    if mode == "json":
        events = [json.loads(line) for line in out.getvalue().splitlines()]
        assert events[-1] == {"event": "message", "level": "warning",
                              "text": "warning: could not attach best.pt to the study as an artifact (disk full)"}
        assert "level" not in events[0] and not err.getvalue()
    else:  # on standard error: --quiet and a redirected standard output keep it
        assert err.getvalue() == "warning: could not attach best.pt to the study as an artifact (disk full)\n"
        assert "warning" not in out.getvalue()
        assert ("resuming" in out.getvalue()) == (mode == "text")


def test_counts_stay_whole_numbers_when_some_trials_lack_them(tmp_path):
    """A rejected trial has n_params but no FLOPs, a running one neither: the columns had turned float
    (the table and summary.json said 1000.0 params)."""
    from optuna.trial import TrialState, create_trial

    from budgetnet.report.study import study_summary, trials_frame

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    attrs = {"state": "complete", "family": "resnet", "n_params": 1000, "flops": 1_000_000, "seconds": 3.0}
    study.add_trial(create_trial(value=0.5, user_attrs=attrs, state=TrialState.COMPLETE))
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={"state": "rejected", "n_params": 2_000_000,
                                                                      "reason": "over the cap"}))
    study.ask()  # running: no attrs yet
    df = trials_frame(study)
    assert df["n_params"].tolist()[:2] == [1000, 2_000_000] and df["flops"].tolist()[0] == 1_000_000
    assert str(df["n_params"].dtype) == str(df["flops"].dtype) == "Int64"
    best = study_summary(study, df, None)["best"]
    assert json.dumps({k: best[k] for k in ("n_params", "flops")}) == '{"n_params": 1000, "flops": 1000000}'
    assert "1000.0" not in df.to_csv()


def test_the_search_summary_says_why_its_trials_were_pruned(tmp_path):
    """The search's closing line and best.json count by Optuna state; pruned_by splits the pruned ones by
    budgetnet's reason, as budgetnet report does (best.json had said 3 pruned where the report said 1 too
    slow, 1 diverged, 1 stopped)."""
    from optuna.trial import TrialState, create_trial

    from budgetnet.report.study import study_summary, trials_frame
    from budgetnet.search.outcome import counts as _counts

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    study.add_trial(create_trial(value=0.5, state=TrialState.COMPLETE, user_attrs={"state": "complete"}))
    for state in ("rejected", "too slow", "too slow", "diverged", "stopped"):
        study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={"state": state, "reason": "r"}))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"state": "failed", "reason": "r"}))
    counts = _counts(study)
    assert counts == {"complete": 1, "pruned": 4, "rejected": 1, "failed": 1,
                      "pruned_by": {"too slow": 2, "diverged": 1, "stopped": 1}}
    report = study_summary(study, trials_frame(study), None)["trials"]
    assert {k: report[k] for k in counts["pruned_by"]} == counts["pruned_by"]
    out = io.StringIO()
    Reporter("text", out).summary({"trials": counts, "seconds_used": 10, "budget_seconds": 60,
                                   "dashboard_command": "optuna-dashboard x"})
    assert "1 complete, 4 pruned (2 too slow, 1 diverged, 1 stopped), 1 rejected, 1 failed" in out.getvalue()
    by_pruner = {**counts, "pruned": 2, "pruned_by": {"pruned": 2}}  # the pruner's own: nothing to add
    out = io.StringIO()
    Reporter("text", out).summary({"trials": by_pruner, "seconds_used": 10, "budget_seconds": 60,
                                   "dashboard_command": "optuna-dashboard x"})
    assert "1 complete, 2 pruned, 1 rejected" in out.getvalue()


def test_the_model_card_never_mixes_two_checkpoints(tmp_path, monkeypatch):
    """A running search may replace best.pt between the report's reads: the test accuracy shown must be that
    of the bytes whose trial and size are shown (the file had been hashed again after loading)."""
    import os

    import budgetnet.report.study as summary
    from budgetnet.config import PlainConfig, RunConfig
    from budgetnet.evaluate import file_sha256

    cfg = RunConfig(model=PlainConfig(n_conv=1, width=4, hidden=()))

    def save(path, trial):
        save_checkpoint(path, cfg, {}, metrics={}, n_params=1000 + trial, flops=1, classes=[], train_seconds=0,
                        precision="fp32", extra={"phase": "search", "study": "a", "trial": trial})

    save(tmp_path / "best.pt", 3)  # what the report reads
    save(tmp_path / "new.pt", 7)  # what the search writes a moment later, and evaluate scored
    (tmp_path / "best.eval.json").write_text(json.dumps({"checkpoint_sha256": file_sha256(tmp_path / "new.pt"),
                                                         "top1": 0.71}))
    real = summary.load_checkpoint

    def replaced_meanwhile(path):
        ckpt = real(path)
        os.replace(tmp_path / "new.pt", tmp_path / "best.pt")
        return ckpt

    monkeypatch.setattr(summary, "load_checkpoint", replaced_meanwhile)
    info = summary.checkpoint_info(tmp_path / "best.pt", "a")
    assert (info["trial"], info["n_params"], info["test_top1"]) == (3, 1003, None)
    monkeypatch.setattr(summary, "load_checkpoint", real)
    info = summary.checkpoint_info(tmp_path / "best.pt", "a")  # now the evaluated bytes: shown with them
    assert (info["trial"], info["n_params"], info["test_top1"]) == (7, 1007, 0.71)


def test_a_killed_searchs_trial_reads_interrupted_not_running(tmp_path):
    """A trial left RUNNING by a search killed with -9 was reported as running until the command ran
    again. Its process is gone: the report says interrupted. A live trial (its process alive, its lease
    renewed), and a Ray study's trials (Ray's hold no lease), stay running."""
    import socket

    from budgetnet.report.study import trials_frame
    from budgetnet.search.attrs import HOST_KEY, LEASE_KEY, PID_KEY

    gone = subprocess.Popen(["true"])
    gone.wait()
    storage = f"sqlite:///{tmp_path / 's.db'}"
    states = {}
    for name, ray in (("optuna", False), ("ray", True)):
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        if ray:
            study.set_user_attr("ray_experiment", str(tmp_path / "ray" / name))
        dead, live = study.ask(), study.ask()
        for trial, until, pid in ((dead, time.time() - 60, gone.pid), (live, time.time() + 20, os.getpid())):
            study._storage.set_trial_system_attr(trial._trial_id, PID_KEY, pid)
            study._storage.set_trial_system_attr(trial._trial_id, HOST_KEY, socket.gethostname())
            study._storage.set_trial_system_attr(trial._trial_id, LEASE_KEY, until)
        states[name] = trials_frame(study)["budgetnet_state"].tolist()
    assert states == {"optuna": ["interrupted", "running"], "ray": ["running", "running"]}
