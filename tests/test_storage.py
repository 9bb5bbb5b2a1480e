"""search/storage.py's handling of a --storage string: the driver a server URL gets, the password never shown,
and ``exclusive``, one process at a time, on an SQLite file, a journal file and a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from budgetnet.checkpoint import load_checkpoint
from budgetnet.search import storage as S
from budgetnet.search.storage import StorageError, exclusive, make_storage, parse_url, resolved_url, shown_url

ROOT = Path(__file__).resolve().parents[1]


# -- URLs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url,shown", [
    ("postgresql://ann:s3cret@db.lan:5432/studies", "postgresql://ann:***@db.lan:5432/studies"),
    ("postgresql+psycopg://ann:s3cret@db.lan/studies?sslmode=require",
     "postgresql+psycopg://ann:***@db.lan/studies?sslmode=require"),
    ("postgresql://ann@db.lan/studies?password=s3cret", "postgresql://ann@db.lan/studies?password=***"),
    ("mysql://ann:s3cret@db.lan/studies", "mysql://ann:***@db.lan/studies"),
    ("postgresql://ann@db.lan/studies", "postgresql://ann@db.lan/studies"),
    ("sqlite:///studies/budgetnet.db", "sqlite:///studies/budgetnet.db"),
    ("studies/run.log", "studies/run.log"),
    ("postgres ql://ann:s3cret@db.lan/x", "postgres ql://ann:***@db.lan/x"),  # SQLAlchemy cannot read it
])
def test_shown_url_never_holds_the_password(url, shown):
    assert shown_url(url) == shown and "s3cret" not in shown_url(url)


def test_a_bare_postgresql_url_gets_an_installed_driver_and_an_explicit_one_is_kept(monkeypatch):
    bare = "postgresql://ann:s3cret@db.lan/studies"
    installed = {"psycopg"}  # as budgetnet[postgres] leaves a machine
    monkeypatch.setattr(S, "_installed", lambda module: module in installed)
    assert resolved_url(bare) == "postgresql+psycopg://ann:s3cret@db.lan/studies"
    assert shown_url(bare, resolve=True) == "postgresql+psycopg://ann:***@db.lan/studies"
    installed.add("psycopg2")  # both: SQLAlchemy's own default for its version is kept
    assert parse_url(bare).drivername in ("postgresql+psycopg", "postgresql+psycopg2")
    installed.discard("psycopg")
    assert resolved_url(bare) == "postgresql+psycopg2://ann:s3cret@db.lan/studies"
    assert resolved_url("postgresql+pg8000://ann@db.lan/x") == "postgresql+pg8000://ann@db.lan/x"  # not ours to judge
    assert resolved_url("sqlite:///a/b.db") == "sqlite:///a/b.db" and resolved_url("a/b.log") == "a/b.log"


@pytest.mark.parametrize("url,says", [
    ("postgresql://ann:s3cret@db.lan/studies", "pip install 'budgetnet[postgres]'"),
    ("postgresql+psycopg://ann:s3cret@db.lan/studies", "pip install 'psycopg[binary]'"),
    ("mysql://ann:s3cret@db.lan/studies", "pip install pymysql"),
])
def test_a_server_url_without_its_driver_is_one_line_naming_the_install(monkeypatch, url, says):
    monkeypatch.setattr(S, "_installed", lambda module: False)
    for call in (parse_url, make_storage, S.local_path):
        with pytest.raises(StorageError) as e:
            call(url)
        assert says in str(e.value) and "\n" not in str(e.value) and "s3cret" not in str(e.value)


def test_a_server_that_refuses_the_connection_is_one_line_without_the_password():
    url = "postgresql://ann:s3cret@127.0.0.1:1/studies"  # nothing listens on port 1
    with pytest.raises(StorageError) as e:
        make_storage(url)
    line = str(e.value)
    assert line.startswith("cannot use --storage postgresql://ann:***@127.0.0.1:1/studies as a study database: ")
    assert "refused" in line and "\n" not in line and "s3cret" not in line
    with pytest.raises(StorageError) as e:
        with exclusive(url, "k", timeout_s=2):
            pass
    assert "refused" in str(e.value) and "s3cret" not in str(e.value)


# -- exclusive ----------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def storage_url(request, tmp_path) -> str:
    """A storage of each kind: an SQLite file and a journal file (neither created yet), a PostgreSQL database."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return {"sqlite": f"sqlite:///{tmp_path / 'study.db'}", "journal": str(tmp_path / "study.log")}[request.param]


# One contender: holds the section ``n`` times for ``hold`` s, noting (monotonic clock, shared by the
# processes of a machine) when it wanted it, entered ("in") and left ("held": wanted, entered, left; written
# before it leaves).
CONTENDER = """
import os, sys, time
from budgetnet.search.storage import exclusive
url, key, log, go, n, hold = sys.argv[1:7]
def note(line):
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {line}\\n")
note("ready")
while not os.path.exists(go):
    time.sleep(0.005)
for _ in range(int(n)):
    wanted = time.monotonic()
    note(f"want {wanted}")
    with exclusive(url, key, timeout_s=60):
        entered = time.monotonic()
        note(f"in {entered}")
        time.sleep(float(hold))
        note(f"held {wanted} {entered} {time.monotonic()}")
    time.sleep(0.01)
"""


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_left():
    """What a test started is ended with it, whatever the test's outcome."""
    yield
    while STARTED:
        p = STARTED.pop()
        if p.poll() is None:
            p.kill()
        p.communicate()


def _start(script: str, args: list[str], log: Path, go: Path, n_procs: int) -> list[subprocess.Popen]:
    """``n_procs`` runs of ``script`` that note "ready" in ``log`` once imported and wait for ``go``: they
    start together."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(n_procs)]
    STARTED.extend(procs)
    _wait_for(lambda: len(_notes(log, "ready")) >= n_procs, procs)
    go.touch()
    return procs


def _contenders(url: str, folder: Path, tag: str, n_procs: int, n: int, hold: float) -> list[subprocess.Popen]:
    log, go = folder / f"{tag}.notes", folder / f"{tag}.go"
    return _start(CONTENDER, [url, "section", str(log), str(go), str(n), str(hold)], log, go, n_procs)


def _notes(log: Path, word: str) -> list[list[float]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [[float(x) for x in line.split()[2:]] for line in lines if line.split()[1] == word]


def _wait_for(done, procs: list[subprocess.Popen], limit_s: float = 60) -> None:
    end = time.monotonic() + limit_s
    while not done():
        failed = [p.communicate()[1] for p in procs if p.poll() is not None]
        assert not failed and time.monotonic() < end, f"a process failed or hung: {failed}"
        time.sleep(0.01)


def test_exclusive_lets_one_process_in_at_a_time(tmp_path, storage_url):
    """Three processes want the section at once, five times each: no two holds overlap, and some process
    wanted it while another held it (so the test saw contention, not turns)."""
    procs = _contenders(storage_url, tmp_path, "c", n_procs=3, n=5, hold=0.05)
    for p in procs:
        assert p.wait(timeout=120) == 0, p.communicate()[1]
    holds = sorted(_notes(tmp_path / "c.notes", "held"), key=lambda h: h[1])  # (wanted, entered, left)
    assert len(holds) == 15
    for before, after in zip(holds, holds[1:]):
        assert after[1] >= before[2], holds
    assert any(after[0] < before[2] for before, after in zip(holds, holds[1:]))


def test_a_process_killed_inside_exclusive_releases_it(tmp_path, storage_url):
    """kill -9 of the holder: the process that waits gets the section within seconds (the kernel, or the
    server at the connection's end, drops the lock)."""
    holder = _contenders(storage_url, tmp_path, "holder", n_procs=1, n=1, hold=600)
    _wait_for(lambda: _notes(tmp_path / "holder.notes", "in"), holder)
    waiter = _contenders(storage_url, tmp_path, "waiter", n_procs=1, n=1, hold=0)
    _wait_for(lambda: _notes(tmp_path / "waiter.notes", "want"), holder + waiter)
    time.sleep(0.5)
    assert not _notes(tmp_path / "waiter.notes", "in")  # it waits
    killed = time.monotonic()
    holder[0].kill()
    assert waiter[0].wait(timeout=30) == 0, waiter[0].communicate()[1]
    [[entered]] = _notes(tmp_path / "waiter.notes", "in")
    assert killed <= entered < killed + 5


@pytest.mark.parametrize("storage_url", ["sqlite", "postgresql"], indirect=True)
def test_exclusive_is_reentrant_in_a_thread_and_excludes_other_threads(storage_url):
    """A block inside a block (a storage opened while the section is held: make_storage takes it for Optuna's
    tables) goes straight in; another thread waits, and gives up after its timeout in one line. On a server,
    another key is another lock; on a local storage, every key shares its folder's."""
    seen = []

    def other(key: str) -> None:
        try:
            with exclusive(storage_url, key, timeout_s=0.3):
                seen.append(key)
        except StorageError as e:
            seen.append(str(e))

    with exclusive(storage_url, "session"):
        study = optuna.create_study(study_name="s", storage=make_storage(storage_url), load_if_exists=True)
        study.set_user_attr("leader", 1)
        for key in ("session", "other"):
            t = threading.Thread(target=other, args=(key,))
            t.start()
            t.join()
    assert "another process held its lock" in seen[0] and "\n" not in seen[0]
    if storage_url.startswith("postgresql"):
        assert seen[1] == "other"
    else:
        assert "another process held its lock" in seen[1]
    other("session")
    assert seen[2] == "session"


def test_exclusive_on_a_local_storage_needs_its_folder_and_creates_nothing(tmp_path):
    with pytest.raises(StorageError, match="its folder"):
        with exclusive(f"sqlite:///{tmp_path / 'none' / 's.db'}", "k"):
            pass
    with exclusive(str(tmp_path / "s.log"), "k"):
        pass
    assert not list(tmp_path.iterdir())


# Opens the storage and the study at the same moment as the others: a new database's tables race.
OPENER = """
import os, sys, time
import optuna
from budgetnet.search.storage import make_storage
url, log, go = sys.argv[1:4]
with open(log, "a") as f:
    f.write(f"{os.getpid()} ready\\n")
while not os.path.exists(go):
    time.sleep(0.005)
optuna.create_study(study_name="s", storage=make_storage(url), load_if_exists=True)
"""


def test_commands_that_open_a_new_postgresql_database_together_all_succeed(tmp_path, postgres_url):
    """Optuna creates its tables in any database it opens: without make_storage's lock, of four processes
    doing so at once on a new one, one often failed (a duplicate key in PostgreSQL's catalogue)."""
    log, go = tmp_path / "opener.notes", tmp_path / "go"
    procs = _start(OPENER, [postgres_url, str(log), str(go)], log, go, n_procs=4)
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert [s.study_name for s in make_storage(postgres_url).get_all_studies()] == ["s"]


@pytest.mark.slow
def test_a_search_on_postgresql_writes_its_model_and_report_reads_it_and_no_password_is_shown(
        tmp_path, postgres_url, slice_s):
    """``budgetnet search --storage postgresql://...`` end to end (its worker process too), then ``budgetnet
    report`` on it. The server trusts 127.0.0.1, so a password in the URL is accepted and ignored: it must
    appear in no output and no file."""
    url = postgres_url.replace("budgetnet@", "budgetnet:s3cret@")
    (tmp_path / "grid.json").write_text(json.dumps(  # small nets, unpruned: a trial completes on a busy machine
        {"base": {"model": {"family": "plain", "n_conv": 2, "hidden": [16]}, "train": {"batch_size": 64}},
         "grid": {"model.width": [4, 6, 8], "train.lr": [0.05, 0.1]}}))
    budget = 6 * slice_s
    search = subprocess.run(
        [sys.executable, "-m", "budgetnet", "search", "--dataset", "synthetic", "--max-params", "30k", "--hours",
         f"{budget / 3600:.6f}", "--trial-seconds", f"{slice_s:.2f}", "--storage", url, "--artifact-dir",
         str(tmp_path / "art"), "--out", str(tmp_path / "best.pt"), "--device", "cpu", "--json", "--workers", "2",
         "--no-warm-start", "--sampler", "grid", "--grid", str(tmp_path / "grid.json"), "--pruner", "none"],
        capture_output=True, text=True, timeout=120 + budget, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert search.returncode == 0, search.stderr
    summary = json.loads(search.stdout.splitlines()[-1])
    assert summary["trials"]["complete"] >= 1 and summary["checkpoint_phase"] in ("search", "final")  # a short budget
    assert summary["storage"] == postgres_url.replace("budgetnet@", "budgetnet:***@")
    assert load_checkpoint(tmp_path / "best.pt")["extra"]["study"] == summary["study"]
    shown = postgres_url.replace("postgresql://budgetnet@", "postgresql+psycopg://budgetnet:***@")
    assert summary["dashboard_command"] == f"optuna-dashboard {shown} --artifact-dir {tmp_path / 'art'}"
    report = subprocess.run([sys.executable, "-m", "budgetnet", "report", "--storage", url, "--checkpoint",
                             str(tmp_path / "best.pt"), "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "index.html").is_file()
    written = [f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()]
    for text in (search.stdout, search.stderr, report.stdout, report.stderr, *written):
        assert ("s3cret" if isinstance(text, str) else b"s3cret") not in text


@pytest.mark.parametrize("command", ["report", "dashboard"])
def test_readers_of_a_server_that_refuses_say_so_in_one_line_without_the_password(tmp_path, capsys, command):
    from budgetnet.cli import main

    url = "postgresql://ann:s3cret@127.0.0.1:1/studies"  # nothing listens on port 1
    assert main([command, "--storage", url, "--out" if command == "report" else "--artifact-dir",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "postgresql://ann:***@127.0.0.1:1/studies" in err[0] and "refused" in err[0], err
    assert "s3cret" not in err[0] and not (tmp_path / "out").exists()
