"""User-given names become one safe folder name (``files.safe_name``) and paths made from them stay inside
their folder (``files.inside``); a search under a hostile ``--study-name`` writes nowhere else."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import optuna
import pytest

from budgetnet.cli import main
from budgetnet.files import MAX_NAME, UnsafePath, inside, safe_name

optuna.logging.set_verbosity(optuna.logging.WARNING)

HOSTILE = ["../../../x", "/etc/passwd", "a/b", "..", ".", "", "x\x00y", "x" * 300, "données", "日本語",
           "a b", "tab\there", "new\nline", "-rf", ".hidden", "a..b", "C:\\Windows", "folder:/data/x-1Mparams-60min",
           "bad\udcffbyte", "run-deadbeef"]
SAFE = ["cifar100-1Mparams-60min", "fashion_mnist-250kparams-2.5min", "a_b", "a-b", "x", "v1.2", "x" * MAX_NAME]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_name_becomes_one_plain_folder_name(name):
    safe = safe_name(name)
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", safe), safe
    assert ".." not in safe and 0 < len(safe) <= MAX_NAME
    assert re.search(r"-[0-9a-f]{8}$", safe), safe  # a changed name carries its hash
    assert safe_name(name) == safe  # the same name, the same folder, every time


@pytest.mark.parametrize("name", SAFE)
def test_a_safe_name_is_its_own_folder(name):
    assert safe_name(name) == name  # existing studies' folders stay where they are


def test_different_names_never_share_a_folder():
    names = ["a/b", "a_b", "a-b", "a:b", "a b", "a//b", "a\\b", *HOSTILE, *SAFE, "x" * 301, "x" * 81]
    mapped = [safe_name(n) for n in names]
    assert len(set(mapped)) == len(set(names)), sorted(mapped)
    assert safe_name(safe_name("a/b")) != safe_name("a/b")  # a mapped name given as a name is another one


def test_inside_returns_the_resolved_path_and_refuses_escapes(tmp_path):
    base = tmp_path / "studies" / "ray"  # need not exist yet
    assert inside(base, "x") == base.resolve() / "x"
    assert inside(base, "a", "b") == base.resolve() / "a" / "b"
    assert inside(base, safe_name("../../../x")).parent == base.resolve()
    for parts in (["../../../x"], [".."], ["/etc/passwd"], ["a", "../../b"], [tmp_path]):
        with pytest.raises(UnsafePath, match="leads outside"):
            inside(base, *parts)


def test_inside_follows_a_symlink_out_of_the_folder(tmp_path):
    base, outside = tmp_path / "base", tmp_path / "elsewhere"
    base.mkdir()
    outside.mkdir()
    (base / "link").symlink_to(outside)
    (base / "sub").mkdir()
    (base / "in").symlink_to(base / "sub")
    with pytest.raises(UnsafePath, match="leads outside"):
        inside(base, "link")
    with pytest.raises(UnsafePath):
        inside(base, "link", "x")
    assert inside(base, "in", "x") == (base / "sub" / "x").resolve()  # a link that stays inside is fine


def test_an_escape_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import budgetnet.cli as cli

    def escape(args):
        inside(tmp_path, "..")

    monkeypatch.setitem(cli.COMMANDS, "report", escape)
    assert main(["report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("budgetnet: error: ") and "leads outside" in err[0], err


def test_a_search_under_a_hostile_study_name_writes_only_where_it_was_told(tmp_path):
    work = tmp_path / "a" / "b" / "c" / "work"  # deep enough for ../../../x to land inside tmp_path if followed
    work.mkdir(parents=True)
    name = "../../../x"
    # its own process, in its own working folder: the default storage, artifact folder and --out are
    # relative to it (and its budget counts from its own start)
    done = subprocess.run([sys.executable, "-m", "budgetnet", "search", "--dataset", "synthetic", "--hours", "0.005",
                           "--max-params", "20k", "--trial-seconds", "2", "--study-name", name, "--device", "cpu",
                           "--quiet"], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0 and (work / "best.pt").is_file(), done.stderr
    assert optuna.load_study(study_name=name, storage=f"sqlite:///{work / 'studies' / 'budgetnet.db'}").trials
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert written and all(p.startswith(str(work) + os.sep) for p in written), written
    assert not any(p.name == "x" for p in tmp_path.rglob("*"))
