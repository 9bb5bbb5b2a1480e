"""The one path from a ``--storage`` string to an Optuna storage, for search, report and dashboard.

Also the study's sampler and pruner, and every use of Optuna's private API, each behind one named
function, so that an Optuna release that moves one breaks one line.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import optuna

from budgetnet.config import ConfigError
from budgetnet.errors import first_line
from budgetnet.search.clock import REPORT_STEPS

DRIVERS = ("sqlite", "postgresql", "mysql")


class StorageError(ConfigError):
    """``--storage`` names something Optuna cannot use: a database without its driver installed, a file
    that is not a study database or journal, a damaged one (a user mistake)."""


def parse_url(url: str):
    """A database URL as SQLAlchemy reads it; StorageError when malformed or of a database Optuna lacks."""
    from sqlalchemy.engine import make_url  # sqlalchemy loads in a second: only for a URL
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(f"malformed --storage {url!r}: expected a database URL such as "
                           f"sqlite:///studies/budgetnet.db or a journal file ending in .log") from None
    if parsed.drivername.split("+")[0] not in DRIVERS:
        raise StorageError(f"unsupported --storage {url!r}: use sqlite:///FILE, postgresql://..., mysql://... "
                           f"or a journal file ending in .log")
    return parsed


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
    return optuna.storages.RDBStorage(url, **kwargs)


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
    """Whatever opening ``--storage`` raises, but a KeyError (no such study), as one-line ``StorageError``."""
    try:
        yield
    except KeyError:
        raise
    except Exception as e:  # noqa: BLE001 - each is the user's to fix, in one line
        kind = "an Optuna journal file" if "://" not in url else "a study database"
        raise StorageError(f"cannot use --storage {url} as {kind}: {first_line(e, cause=True)}") from None


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
