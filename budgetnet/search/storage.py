"""The one path from a ``--storage`` string to an Optuna storage, for search, report and dashboard.

Also the study's sampler and pruner, and every use of Optuna's private API, each behind one named
function, so that an Optuna release that moves one breaks one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import threading
import time
import warnings
from pathlib import Path

import optuna

from budgetnet.config import ConfigError
from budgetnet.errors import first_line
from budgetnet.search.clock import REPORT_STEPS

DRIVERS = ("sqlite", "postgresql", "mysql")
# A server database's drivers: SQLAlchemy's name, the module it imports, its pip package. A bare URL
# gets SQLAlchemy's default driver when installed, else the first one installed.
DRIVER_MODULES = {
    "postgresql": (("psycopg", "psycopg", "psycopg[binary]"), ("psycopg2", "psycopg2", "psycopg2-binary")),
    "mysql": (("mysqldb", "MySQLdb", "mysqlclient"), ("pymysql", "pymysql", "pymysql")),
}
INSTALL_DRIVER = {"postgresql": "pip install 'budgetnet[postgres]'", "mysql": "pip install pymysql"}


class StorageError(ConfigError):
    """``--storage`` names something Optuna cannot use: a database without its driver installed, a file
    that is not a study database or journal, a damaged one (a user mistake)."""


def shown_url(url: str, *, resolve: bool = False) -> str:
    """``url`` as it may be shown or written down: a server database's password as ``***`` (in the URL or
    its query); a journal path or an SQLite URL unchanged. Also for a URL SQLAlchemy cannot read. With
    ``resolve``, a database URL with its driver named, as ``resolved_url`` (for optuna-dashboard's command)."""
    if "://" not in url:
        return url
    if resolve:
        url = resolved_url(url)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", url)
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True).replace("password=%2A%2A%2A", "password=***")


def parse_url(url: str):
    """A database URL as SQLAlchemy reads it, with the driver it will use named (``postgresql://`` as
    ``postgresql+psycopg://`` where psycopg is the one installed); StorageError when malformed, of a
    database Optuna lacks, or of a server database none of whose drivers is installed."""
    from sqlalchemy.engine import make_url  # sqlalchemy loads in a second: only for a URL
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(f"malformed --storage {shown_url(url)!r}: expected a database URL such as "
                           f"sqlite:///studies/budgetnet.db or a journal file ending in .log") from None
    database, _, driver = parsed.drivername.partition("+")
    if database not in DRIVERS:
        raise StorageError(f"unsupported --storage {shown_url(url)!r}: use sqlite:///FILE, postgresql://..., "
                           f"mysql://... or a journal file ending in .log")
    if database not in DRIVER_MODULES:
        return parsed
    known = {name: (module, package) for name, module, package in DRIVER_MODULES[database]}
    if driver:  # as given; a known one must be installed
        if driver in known and not _installed(known[driver][0]):
            raise StorageError(f"--storage {shown_url(url)} names the driver {driver}, which is not installed: "
                               f"pip install '{known[driver][1]}', or give {database}:// "
                               f"({INSTALL_DRIVER[database]})")
        return parsed
    default = parsed.get_dialect().driver  # SQLAlchemy's default driver for a bare URL (its version's)
    names = [default, *[name for name in known if name != default]]
    for name in names:
        if name in known and _installed(known[name][0]):
            return parsed.set(drivername=f"{database}+{name}")
    raise StorageError(f"--storage {shown_url(url)} needs a {database} driver, and none is installed: "
                       f"{INSTALL_DRIVER[database]}")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolved_url(url: str) -> str:
    """The storage string Optuna and optuna-dashboard are given: a database URL with its driver named (the
    password kept: never show it, ``shown_url`` is for that); a journal path unchanged."""
    if "://" not in url:
        return url
    return parse_url(url).render_as_string(hide_password=False)


def local_path(url: str) -> Path | None:
    """The file behind a SQLite URL or a journal path; None for a server database."""
    if "://" not in url:
        return Path(url)
    parsed = parse_url(url)
    if parsed.drivername.split("+")[0] != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise StorageError(f"--storage {url!r} names no database file")
    return Path(parsed.database)


def _sqlite_file(url: str) -> str | None:
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else None


def make_storage(url: str, *, create: bool = True) -> optuna.storages.BaseStorage:
    """An RDB URL (sqlite:///..., postgresql://...) or a path to a journal file (several local workers).
    ``create=False`` (readers: report, dashboard) creates nothing: no folder, and no Optuna tables in a
    database that lacks them (``RDBStorage`` adds its schema to any database it opens)."""
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        if create:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    kwargs: dict = {"skip_table_creation": not create}
    if (file := _sqlite_file(url)) is not None:
        if create:
            Path(file).parent.mkdir(parents=True, exist_ok=True)
        # Several workers write to one file: wait for its lock longer than sqlite's 5 s.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 30}}
    else:
        # A server restarted, or a connection dropped by the network while a long trial ran: checked out of
        # the pool, a dead connection is replaced instead of failing the storage call.
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    resolved = resolved_url(url)
    if not create:
        return optuna.storages.RDBStorage(resolved, **kwargs)
    # Creating the tables races between commands started together on a new database (the loser's
    # CREATE TABLE fails): one at a time.
    with exclusive(url, "optuna-schema", timeout_s=120):
        return optuna.storages.RDBStorage(resolved, **kwargs)


def check_journal(url: str) -> None:
    """A ``--storage`` path that exists must be an Optuna journal: Optuna would append to any file (a
    run's text log, say). An SQLite database given so is named with the URL it needs."""
    if "://" in url or not Path(url).is_file() or not Path(url).stat().st_size:
        return
    with open(url, "rb") as f:
        head = f.readline()
    if head.startswith(b"SQLite format 3\x00"):
        raise StorageError(f"--storage {url} is an SQLite database: give it as sqlite:///{Path(url).resolve()}")
    try:
        journal = isinstance(entry := json.loads(head), dict) and "op_code" in entry
    except ValueError:
        journal = False
    if not journal:
        raise StorageError(f"cannot use --storage {url} as an Optuna journal file: its first line is not a "
                           "journal entry (a journal file is created by the search; give a new path)")


@contextlib.contextmanager
def storage_errors(url: str):
    """Whatever opening ``--storage`` raises, but a KeyError (no such study), as one-line ``StorageError``.
    The message shows the URL without its password."""
    try:
        yield
    except (KeyError, StorageError):  # a StorageError is one line already
        raise
    except Exception as e:  # noqa: BLE001 - each is the user's to fix, in one line
        kind = "an Optuna journal file" if "://" not in url else "a study database"
        raise StorageError(f"cannot use --storage {shown_url(url)} as {kind}: {first_line(e, cause=True)}") from None


def stored_study_attrs(url: str, name: str) -> dict | None:
    """The user attrs of study ``name`` in storage ``url``; None when it holds no such study. Creates
    nothing: a local storage file that does not exist yet holds no study."""
    path = _sqlite_file(url) if "://" in url else url
    if path is not None and not Path(path).exists():
        return None
    check_journal(url)
    try:
        with storage_errors(url):
            storage = make_storage(url)
            return storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    except KeyError:  # a new study
        return None


# -- one process at a time, across processes (and machines, for a server database) ----------------------

_held = threading.local()  # the locks this thread holds: {id: depth}


@contextlib.contextmanager
def exclusive(url: str, key: str, timeout_s: float = 30.0):
    """An exclusive section named ``key`` among every process that opens storage ``url``, released when the
    block ends or the process dies (the kernel or the server drops it). StorageError (one line) if it cannot
    be had within ``timeout_s`` or the storage cannot be reached.

    * PostgreSQL: ``pg_advisory_lock`` on a 64-bit hash of ``key``, in this database, on every machine,
      through a connection of its own held for the block. MySQL: ``GET_LOCK``/``RELEASE_LOCK`` likewise.
    * SQLite file or journal file: ``flock`` on the folder that holds it, on this machine only (not over
      NFS). Every key of the folder shares that one lock. The folder must exist (``make_storage`` creates
      it); the file need not. Not the file itself: closing a descriptor of an SQLite file drops every
      fcntl lock SQLite holds on it in this process, another thread's transaction included.

    Reentrant in one thread (a block inside a block of the same lock goes straight in); another thread of
    the same process waits like another process. Hold it briefly and never wait inside for another process
    that opens the storage: a local storage's lock is its folder's, which ``make_storage`` takes too.
    """
    path = local_path(url)
    ident = ("folder", str(path.parent.resolve())) if path is not None else ("server", resolved_url(url), key)
    held = _held.__dict__.setdefault("depth", {})
    if held.get(ident):
        held[ident] += 1
        try:
            yield
        finally:
            held[ident] -= 1
        return
    with (_folder_lock(url, path.parent, timeout_s) if path is not None else _server_lock(url, key, timeout_s)):
        held[ident] = 1
        try:
            yield
        finally:
            del held[ident]


@contextlib.contextmanager
def _folder_lock(url: str, folder: Path, timeout_s: float):
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise StorageError(f"cannot lock --storage {url}: its folder {folder}: {e.strerror}") from None
    try:
        deadline, pause = time.monotonic() + timeout_s, 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StorageError(f"--storage {url}: another process held its lock for over "
                                       f"{timeout_s:g} s") from None
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
        yield
    finally:
        os.close(fd)  # releases the flock


def _lock_number(database: str | None, key: str) -> int:
    digest = hashlib.blake2b(f"budgetnet:{database}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextlib.contextmanager
def _server_lock(url: str, key: str, timeout_s: float):
    import sqlalchemy as sa

    parsed = parse_url(url)
    number = _lock_number(parsed.database, key)
    if mysql := parsed.get_backend_name() == "mysql":  # a name of at most 64 characters, server-wide
        lock, unlock = "SELECT GET_LOCK(:name, :s)", "SELECT RELEASE_LOCK(:name)"
        args = {"name": f"budgetnet:{number:x}"}
    else:  # pg_advisory_lock returns nothing, and waits at most lock_timeout (set below)
        lock, unlock, args = "SELECT 1 FROM pg_advisory_lock(:n)", "SELECT pg_advisory_unlock(:n)", {"n": number}
    connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": max(1, round(timeout_s))}
    engine = sa.create_engine(parsed, poolclass=sa.pool.NullPool, connect_args=connect_args)
    try:
        with storage_errors(url):
            conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        with conn:  # closed at the end: the server drops the lock with it
            try:
                if not mysql:
                    conn.execute(sa.text("SELECT set_config('lock_timeout', :ms, false)"),
                                 {"ms": str(max(1, round(timeout_s * 1000)))})
                got = conn.execute(sa.text(lock), {**args, "s": timeout_s} if mysql else args).scalar()
            except sa.exc.OperationalError as e:
                if _sqlstate(e) != "55P03":  # not lock_not_available (waited past lock_timeout)
                    raise StorageError(f"cannot lock --storage {shown_url(url)}: "
                                       f"{first_line(e, cause=True)}") from None
                got = 0
            if got != 1:
                raise StorageError(f"--storage {shown_url(url)}: another process held its lock {key!r} for "
                                   f"over {timeout_s:g} s")
            yield
            with contextlib.suppress(sa.exc.DBAPIError):  # a lost connection has released it already
                conn.execute(sa.text(unlock), args)
    finally:
        engine.dispose()


def _sqlstate(e) -> str | None:
    return getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)


def make_sampler(name: str, seed: int, grid: dict | None = None) -> optuna.samplers.BaseSampler:
    """Each worker passes its own ``seed``, or they would all propose the same start-up points."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid, seed=seed)
    # group=True: the space is conditional (per-family knobs), so TPE models each sub-space jointly.
    # constant_liar: other workers' running trials count as bad ones, so workers spread out.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=6, multivariate=True, group=True,
                                      constant_liar=True)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=10, max_resource=REPORT_STEPS, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    # 3 complete trials give a usable median; no verdict before warm-up ends (30%); then every report.
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=30, interval_steps=10)


def open_study(opts, study_name: str, seed: int) -> optuna.Study:
    """Create or load the study of ``opts`` (a ``SearchOptions``) with its sampler and pruner."""
    sampler = make_sampler(opts.sampler, seed, opts.grid[1] if opts.grid else None)
    with storage_errors(opts.storage):
        return optuna.create_study(study_name=study_name, storage=make_storage(opts.storage), direction="maximize",
                                   sampler=sampler, pruner=make_pruner(opts.pruner), load_if_exists=True)


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# -- Optuna's private API, one function each -------------------------------------------------------------

def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage


def trial_id(trial) -> int:
    """The storage's id of a ``Trial`` or ``FrozenTrial`` (not its number)."""
    return trial._trial_id


def fresh_study_attrs(study: optuna.Study) -> dict:
    """The study's user attrs as stored now, past any cache of this process."""
    return study._storage.get_study_user_attrs(study._study_id)


def trial_id_of(study: optuna.Study, number: int) -> int:
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def live_trial(study: optuna.Study, number: int) -> optuna.Trial:
    """Trial ``number`` as a ``Trial`` that can be told, whichever process asked for it."""
    return optuna.Trial(study, trial_id_of(study, number))
