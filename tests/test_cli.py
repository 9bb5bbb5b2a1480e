"""User mistakes get one line and exit code 2, and leave stored studies untouched; the dashboard serves."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

from budgetnet.cli import main
from budgetnet.cli.parser import parse_count

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("text,value", [("1e6", 1e6), ("1M", 1e6), ("250k", 250e3), ("1,000,000", 1e6),
                                        ("2.5m", 2.5e6)])
def test_parse_count(text, value):
    assert parse_count(text) == value


def _search(tmp_path, *args):
    return ["search", "--dataset", "synthetic", "--storage", f"sqlite:///{tmp_path / 'keep.db'}",
            "--out", str(tmp_path / "best.pt"), "--artifact-dir", str(tmp_path / "art"), *args]


BAD = {
    "zero hours": ["--hours", "0"],
    "negative hours": ["--hours", "-1"],
    "nan hours": ["--hours", "nan"],
    "non-numeric params": ["--max-params", "lots"],
    "zero params": ["--max-params", "0"],
    "unknown dataset": ["--dataset", "imagenet"],
    "unknown precision": ["--precision", "fp8"],
    "unknown test-time augmentation": ["--tta", "rotate"],
    "malformed storage": ["--storage", "sqlite:/nope"],
    "unsupported storage": ["--storage", "redis://localhost/0"],
    "unwritable out": ["--out", "/proc/budgetnet/best.pt"],
    "out is a directory": ["--out", "/tmp"],
    "out named like the summary": ["--out", "/tmp/budgetnet-model.json"],  # best.json would replace the model
    "final fraction 1": ["--final-fraction", "1"],
    "final fraction word": ["--final-fraction", "most"],
    "grid without file": ["--sampler", "grid"],
    "missing grid file": ["--sampler", "grid", "--grid", "/nonexistent/grid.json"],
    "unknown flag": ["--frobnicate"],
    "cuda without gpu": ["--device", "cuda"],
    "zero workers": ["--workers", "0"],
    "fractional workers": ["--workers", "1.5"],
    "thousands of workers": ["--workers", "5000"],
    "a device torch parses but budgetnet cannot train on": ["--device", "meta"],
    "an mps device": ["--device", "mps"],
    "negative seed": ["--seed", "-1"],
    "seed past numpy's": ["--seed", "4294967296"],
    "hours past a year": ["--hours", "1e308"],  # inf seconds: the search had failed trials forever
    "binary grid file": ["--sampler", "grid", "--grid", sys.executable],
}
# what the line must say, where a later refusal (best.pt here is no checkpoint) would also give exit 2
SAYS = {"thousands of workers": "at most 1024", "a device torch parses but budgetnet cannot train on": "--device meta",
        "an mps device": "--device mps", "negative seed": "--seed", "seed past numpy's": "--seed",
        "hours past a year": "--hours", "binary grid file": "not a JSON text file"}


@pytest.fixture
def stored_study(tmp_path):
    """A study with one completed trial, and a best.pt, that a bad command must not touch."""
    storage = f"sqlite:///{tmp_path / 'keep.db'}"
    study = optuna.create_study(study_name="keep", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    (tmp_path / "best.pt").write_bytes(b"precious")
    return storage, (tmp_path / "keep.db").read_bytes()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_search_input_is_one_line_exit_2_and_touches_nothing(tmp_path, capsys, stored_study, case):
    import torch

    if case == "cuda without gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args = _search(tmp_path, *BAD[case])
    if case.startswith(("unwritable", "out ")):
        args = [a for a in args if a != str(tmp_path / "best.pt")]  # keep only the bad --out value
        args.remove("--out")
        args += BAD[case]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("budgetnet: error:"), err
    assert SAYS.get(case, "") in err[0]
    storage, db_bytes = stored_study
    assert (tmp_path / "keep.db").read_bytes() == db_bytes  # no study row changed
    assert (tmp_path / "best.pt").read_bytes() == b"precious"
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["keep"]


@pytest.mark.parametrize("kind", ["text file as sqlite", "garbage journal", "server without its driver",
                                  "server that refuses"])
def test_a_storage_optuna_cannot_use_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch, kind):
    """Past the URL's syntax: a file that is not a study database, a damaged journal, a server database
    whose Python driver is not installed (named with its install), a server that refuses the connection
    (its password not shown). Each is the user's to fix: one line, exit 2, the file as it was."""
    import builtins

    from budgetnet.search import storage

    junk = tmp_path / ("notes.txt" if kind != "garbage journal" else "study.log")
    junk.write_text("{not a study\n")
    url = {"text file as sqlite": f"sqlite:///{junk}", "garbage journal": str(junk),
           "server without its driver": "postgresql://127.0.0.1:1/budgetnet",
           "server that refuses": "postgresql://ann:s3cret@127.0.0.1:1/budgetnet"}[kind]  # nothing on port 1
    says = f"budgetnet: error: cannot use --storage {url}"
    if kind == "server without its driver":  # whichever drivers this machine has: none, as on a fresh one
        real_import = builtins.__import__

        def no_drivers(name, *a, **k):
            if name.split(".")[0] in ("psycopg", "psycopg2", "pg8000", "asyncpg"):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return real_import(name, *a, **k)

        monkeypatch.setattr(builtins, "__import__", no_drivers)
        monkeypatch.setattr(storage, "_installed", lambda module: False)
        says = (f"budgetnet: error: --storage {url} needs a postgresql driver, and none is installed: "
                "pip install 'budgetnet[postgres]'")
    if kind == "server that refuses":
        says = "budgetnet: error: cannot use --storage postgresql://ann:***@127.0.0.1:1/budgetnet as a study database"
    code = main(["search", "--dataset", "synthetic", "--hours", "0.01", "--storage", url,
                 "--out", str(tmp_path / "best.pt"), "--artifact-dir", str(tmp_path / "art")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(says) and "s3cret" not in err[0], err
    assert junk.read_text() == "{not a study\n" and not (tmp_path / "best.pt").exists()


def test_ray_on_cuda_with_no_gpu_share_is_refused_before_anything(tmp_path, capsys, monkeypatch):
    import torch

    import budgetnet.cli.search as cli

    monkeypatch.setattr(cli, "_device", lambda name, flag="--device": torch.device("cuda", 0))  # as if a GPU were here
    code = main(_search(tmp_path, "--hours", "0.01", "--backend", "ray", "--gpus-per-trial", "0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--gpus-per-trial 0 on CUDA" in err[0], err
    assert not (tmp_path / "keep.db").exists()


@pytest.mark.parametrize("case", ["another study's", "a deleted study's of the same name"])
def test_a_model_of_another_study_at_out_is_never_ranked_against_nor_overwritten(tmp_path, capsys, case):
    """--out holds a budgetnet model of another study; or of this study's name, in a storage that no
    longer holds that study (deleted, to start over): a new search would rank its trials against that
    model and keep it. One line, exit 2, the model as it was."""
    import torch

    from budgetnet.checkpoint import save_checkpoint
    from budgetnet.config import DataConfig, RunConfig
    from budgetnet.search.options import default_study_name

    name = default_study_name("synthetic", 20_000, 0.01)
    owner = "other" if case == "another study's" else name
    save_checkpoint(tmp_path / "best.pt", RunConfig(data=DataConfig(dataset="synthetic")), {"w": torch.zeros(2)},
                    metrics={"val_acc": 0.9}, n_params=2, flops=2, classes=["a", "b"], train_seconds=1.0,
                    precision="fp32", extra={"phase": "search", "study": owner, "trial": 3})
    before = (tmp_path / "best.pt").read_bytes()
    code = main(_search(tmp_path, "--hours", "0.01", "--max-params", "20k"))
    err = capsys.readouterr().err.strip().splitlines()
    says = "not " + repr(name) if case == "another study's" else "no longer holds"
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert (tmp_path / "best.pt").read_bytes() == before and not (tmp_path / "keep.db").exists()


def test_a_place_the_machine_cannot_write_is_one_line_exit_2(tmp_path, capsys, stored_study):
    """Not a mistake in a flag's value but the machine's to fix (a path through a file, a read-only or
    full disk, a busy port): one line naming it, exit 2, no traceback."""
    (tmp_path / "afile").write_text("")
    storage, _ = stored_study
    code = main(["report", "--storage", storage, "--out", str(tmp_path / "afile" / "report")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("budgetnet: error: Not a directory"), err


def test_a_model_left_at_out_by_something_else_is_never_overwritten(tmp_path, capsys, stored_study):
    code = main(_search(tmp_path, "--hours", "0.01", "--max-params", "20k"))  # otherwise a valid command
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a budgetnet checkpoint" in err[0]
    assert (tmp_path / "best.pt").read_bytes() == b"precious"


def test_a_teacher_that_cannot_teach_this_data_is_refused_before_anything(tmp_path, capsys):
    from test_search import _teacher

    other = _teacher(tmp_path / "fmnist-shaped.pt")  # trained on synthetic; the search below is on cifar10
    for path, says in ((tmp_path / "none.pt", "none.pt"), (other, "trained on synthetic, not cifar10")):
        code = main(_search(tmp_path, "--hours", "0.01", "--dataset", "cifar10", "--teacher", str(path)))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "keep.db").exists() and not (tmp_path / "best.pt").exists()


def test_missing_dataset_names_the_path_and_flags(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    downloads = []  # the default makes no network access: torchvision's downloader is never reached
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", lambda *a, **k: downloads.append(k))
    code = main(["search", "--dataset", "cifar100", "--data-dir", str(tmp_path / "nowhere"),
                 "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--out", str(tmp_path / "best.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert str(tmp_path / "nowhere") in err[0] and "cifar-100-python" in err[0] and "--data-dir" in err[0]
    assert not (tmp_path / "x.db").exists()  # no empty study left behind
    assert downloads == []


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "budgetnet", *(_search(tmp_path, "--hours", "-2"))],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_train_takes_no_binary_config_and_trains_a_distilled_config_on_its_labels(tmp_path, capsys):
    """A checkpoint given as --config is one line; a distilled search's best.json (train.distill > 0, its
    teacher not in the file) trains on its labels with a note, where it had raised a ValueError."""
    import torch

    torch.save({"weights": torch.zeros(3)}, tmp_path / "m.pt")
    assert main(["train", "--config", str(tmp_path / "m.pt"), "--epochs", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a JSON text file" in err[0], err
    distilled = tmp_path / "best.json"
    distilled.write_text(json.dumps({"model": {"family": "plain", "n_conv": 2, "width": 4, "hidden": []},
                                     "train": {"batch_size": 64, "eval_points": 1, "distill": 0.5},
                                     "data": {"dataset": "synthetic"}}))
    assert main(["train", "--config", str(distilled), "--epochs", "0.2", "--out", str(tmp_path / "d.pt"),
                 "--device", "cpu"]) == 0
    assert "train.distill 0.5 needs the teacher" in capsys.readouterr().err
    from budgetnet.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "d.pt")["run_config"].train.distill == 0.0  # what it trained with


def test_train_command_bad_config_and_success(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"family": "plain", "widht": 8}}')
    assert main(["train", "--config", str(bad), "--epochs", "1", "--out", str(tmp_path / "m.pt")]) == 2
    assert "widht" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"model": {"family": "plain", "n_conv": 2, "width": 4, "hidden": []},
                                "train": {"batch_size": 64, "eval_points": 2},
                                "data": {"dataset": "synthetic"}}))
    assert main(["train", "--config", str(good), "--epochs", "1", "--out", str(tmp_path / "m.pt"),
                 "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "m.pt"), "--device", "cpu"]) == 0
    assert "top-1" in capsys.readouterr().out
    compiled = []  # --compile trains through torch.compile (a spy here: compiling is slow on a CPU)
    monkeypatch.setattr("torch.compile", lambda model: compiled.append(model) or model)
    assert main(["train", "--config", str(good), "--epochs", "1", "--out", str(tmp_path / "m.pt"),
                 "--device", "cpu", "--compile"]) == 0
    assert len(compiled) == 1 and "compiled (first step" in capsys.readouterr().out
    # the guard on the train command
    assert main(["train", "--config", str(good), "--epochs", "1", "--max-params", "100",
                 "--out", str(tmp_path / "m2.pt")]) == 2
    assert "exceed the cap" in capsys.readouterr().err


@pytest.mark.parametrize("n_conv, says", [(16, "GiB for weights, gradients and optimizer state"),
                                          (64, "overflows 64 bits")])
def test_train_command_refuses_a_model_that_cannot_fit_before_allocating_it(tmp_path, capsys, n_conv, says):
    # doubling widths from 8: 16 convs hold ~4e11 parameters (4.6 TiB to train), 64 overflow int64.
    # Building either for real would exhaust memory (on Linux the process may be killed, not raise).
    cfg = tmp_path / "huge.json"
    cfg.write_text(json.dumps({"model": {"family": "plain", "n_conv": n_conv, "width": 8, "convs_per_block": n_conv,
                                         "hidden": []}, "data": {"dataset": "synthetic"}}))
    code = main(["train", "--config", str(cfg), "--seconds", "5", "--out", str(tmp_path / "m.pt"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dashboard_over_no_study_is_refused_and_creates_nothing(tmp_path, capsys):
    code = main(["dashboard", "--storage", f"sqlite:///{tmp_path / 'none.db'}", "--artifact-dir",
                 str(tmp_path / "art")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no study storage at" in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["dashboard", "report"])
def test_readers_leave_a_database_that_is_not_optunas_as_it_was(tmp_path, capsys, command):
    """report and dashboard only read: Optuna's RDBStorage adds its tables to any database it opens, so a
    user's own SQLite file (or an empty one) given as --storage came back with Optuna's schema in it."""
    import sqlite3

    theirs, empty = tmp_path / "photos.db", tmp_path / "empty.db"
    with sqlite3.connect(theirs) as db:
        db.execute("create table photos (id integer)")
    empty.touch()
    before = {p: p.read_bytes() for p in (theirs, empty)}
    extra = ["--artifact-dir", str(tmp_path / "art")] if command == "dashboard" else ["--out", str(tmp_path / "r")]
    for path in (theirs, empty, tmp_path / "missing" / "s.db"):
        assert main([command, "--storage", f"sqlite:///{path}", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0], err
    assert {p: p.read_bytes() for p in (theirs, empty)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "photos.db"]  # no folder made either


def test_a_refused_search_leaves_no_folder_of_its_out_path(tmp_path, capsys):
    """--out's folders are made when the model is written; a search refused after --out was checked (here
    for its --storage, or a missing --teacher) leaves none behind, nor a file of the write check."""
    out = tmp_path / "runs" / "a" / "best.pt"
    for bad in (["--storage", "sqlite:////proc/budgetnet/s.db"], ["--teacher", str(tmp_path / "none.pt")]):
        assert main([*_search(tmp_path, *bad), "--out", str(out)]) == 2  # the last --out is the one used
        assert capsys.readouterr().err.count("\n") == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    file = tmp_path / "file"
    file.write_text("x")
    assert main([*_search(tmp_path), "--out", str(file / "sub" / "best.pt")]) == 2
    assert "cannot write --out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("port", ["70000", "-1", "0", "http"])
def test_a_dashboard_port_out_of_range_is_one_line(port, capsys):
    assert main(["dashboard", "--port", port]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "from 1 to 65535" in err[0], err


def test_version_storage_flag_names_and_what_a_user_can_feed_back(tmp_path, capsys, stored_study):
    """--version; an unwritable --storage is named as --storage, not --out; a search's best.json trains as a
    config; a model of another study at --out that the storage still holds names --study-name to go on."""
    import stat

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip().startswith("budgetnet ")
    assert main(_search(tmp_path, "--storage", "sqlite:////proc/budgetnet/s.db")) == 2
    assert "cannot write --storage /proc/budgetnet/s.db" in capsys.readouterr().err
    # best.json, as a search writes it beside best.pt (its config under "config")
    cfg = {"model": {"family": "plain", "n_conv": 2, "width": 8, "hidden": [16]}, "data": {"dataset": "synthetic"}}
    (tmp_path / "best.json").write_text(json.dumps({"best_trial": 3, "config": cfg, "study": "s"}))
    assert main(["train", "--config", str(tmp_path / "best.json"), "--epochs", "0.1", "--out",
                 str(tmp_path / "t.pt"), "--device", "cpu"]) == 0
    mode = stat.S_IMODE((tmp_path / "t.pt").stat().st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # written through a temp file, yet with a plain file's mode
    # a model of the stored study "keep" at --out, and a command whose default study name differs
    from budgetnet.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tmp_path / "t.pt")
    save_checkpoint(tmp_path / "best.pt", ckpt["run_config"], ckpt["state_dict"], metrics={}, n_params=1, flops=1,
                    classes=ckpt["classes"], train_seconds=1.0, precision="fp32",
                    extra={"phase": "search", "study": "keep", "trial": 0})
    capsys.readouterr()
    assert main(_search(tmp_path, "--hours", "0.01")) == 2
    assert "--study-name keep goes on with that study" in capsys.readouterr().err


def test_dashboard_serves_the_study_on_localhost(tmp_path):
    storage = f"sqlite:///{tmp_path / 'dash.db'}"
    study = optuna.create_study(study_name="dash-study", storage=storage, direction="maximize")
    trial = study.ask()
    trial.set_user_attr("n_params", 12345)
    trial.set_user_attr("flops", 678)
    trial.report(0.5, step=10)
    study.tell(trial, 0.75)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "budgetnet", "dashboard", "--storage", storage, "--port",
                             str(port), "--artifact-dir", str(tmp_path / "art")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        studies = None
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=2) as r:
                    studies = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.2)
        assert studies is not None, proc.stderr.read() if proc.poll() is not None else "dashboard never answered"
        (entry,) = [s for s in studies["study_summaries"] if s["study_name"] == "dash-study"]
        with urllib.request.urlopen(f"{base}/api/studies/{entry['study_id']}", timeout=5) as r:
            detail = json.loads(r.read())
        (t,) = detail["trials"]
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert attrs["n_params"] in (12345, "12345") and t["values"] == [0.75]
        # bound to the loopback interface only
        out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout if _has("ss") else ""
        if out:
            lines = [line for line in out.splitlines() if f":{port} " in line]
            assert lines and all("127.0.0.1:" in line for line in lines), lines
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _has(cmd: str) -> bool:
    import shutil

    return shutil.which(cmd) is not None


@pytest.mark.parametrize("typed", ["fashion_mnist", "fashion-mnist", "FashionMNIST", "Fashion-MNIST"])
def test_dataset_accepts_the_spellings_users_type(typed):
    from budgetnet.cli.parser import build_parser

    assert build_parser().parse_args(["search", "--dataset", typed]).dataset == "fashion_mnist"
    assert build_parser().parse_args(["search", "--dataset", "CIFAR-100"]).dataset == "cifar100"


def test_trial_seconds_help_states_the_rule_the_code_uses(capsys):
    from budgetnet.search.clock import MIN_SLICE_S, TRIALS_PER_SEARCH

    with pytest.raises(SystemExit):
        main(["search", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"search time / {TRIALS_PER_SEARCH}, at least {MIN_SLICE_S:g} s" in help_text
    assert "--precision {auto,fp32,bf16,fp16}" in help_text
    assert ("auto (default): the search ends once past 40% of the budget when 3 judged trials in a row "
            "(complete, or pruned below the median)") in help_text


@pytest.mark.parametrize("command", ["search", "train", "evaluate", "report", "prune", "export", "datasets",
                                     "dashboard"])
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and f"usage: budgetnet {command}" in capsys.readouterr().out


def test_a_trial_line_for_a_trial_that_failed_before_its_family_was_known():
    import io

    from budgetnet.search.progress import Reporter

    out = io.StringIO()
    row = {"number": 3, "family": None, "n_params": None, "flops": None, "progress": None, "val_acc": None,
           "seconds": 0.1, "state": "failed", "reason": "ConfigError: bad grid point"}
    Reporter("text", out).trial(row, 10.0, 60.0)
    first = out.getvalue().splitlines()[0]
    assert first.startswith("trial    3  -") and first.endswith("failed (ConfigError: bad grid point)")


def test_help_and_a_flag_mistake_answer_without_importing_torch():
    """torch takes seconds to import: --help and a flag's mistake, the commands a user runs to find their
    way, must not wait for it (they waited 2-3 s)."""
    code = ("import sys\nfrom budgetnet.cli import main\nrc = main(['search', '--hours', '-1'])\n"
            "try:\n    main(['search', '--help'])\nexcept SystemExit as e:\n    rc = (rc, e.code)\n"
            "print(rc, 'torch' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--max-params" in proc.stdout  # the help was printed
    assert proc.stderr.splitlines()[-1] == "(2, 0) False", proc.stderr
    assert "--hours: must be more than 0" in proc.stderr
