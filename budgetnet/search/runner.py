"""The search service: an Optuna study under a hard wall-clock budget, then a final training run.

Budget semantics (docs/search.md has the long form):
- ``budget_seconds`` bounds the whole command from its first second: the precision decision, data
  loading, the speed probe, search, final training and writing ``best.pt``. The seconds already used
  live in the study's user attrs (``search/clock.py``), saved as the command runs, so running the same
  command again resumes with what is left, in any phase.
- The search phase gets ``1 - final_fraction`` of the budget. Each trial trains for a full time slice
  with the time-aware schedule (a trial whose slice no longer fits is not started), reports validation
  accuracy at 10%, 20%, ... 100% of its own slice (one shared step axis for the median pruner), and is
  stopped inside the slice on Ctrl-C or past the deadline, because Optuna's ``timeout`` only acts
  between trials.
- The final phase trains the best configuration on train+validation for what is left, ending annealed
  just before the deadline, and writes ``best.pt`` atomically; it is skipped when what is left would
  show the data fewer epochs than the best trial saw.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from budgetnet.budget import count_flops
from budgetnet.config import ConfigError, DataConfig, ResNetConfig, RunConfig, TrainConfig
from budgetnet.data import DeviceData, load_data
from budgetnet.device import resolve_precision, set_memory_share
from budgetnet.files import write_atomic
from budgetnet.recipe import prime_optimizers
from budgetnet.search.clock import (
    AUTO_SEARCH_MIN,
    CLOCK_SAVE_MAX_S,
    CLOCK_SAVE_MIN_S,
    CLOCK_SAVE_SHARE,
    PROBE_MAX_S,
    PROBE_MIN_S,
    PROBE_SHARE,
    STAGNANT_TRIALS,
    WRITE_RESERVE_S,
    Clock,
    clamp,
    slice_fits,
    slice_seconds,
    trial_deadline,
)
from budgetnet.search.final import (
    final_too_short,
    final_training,
    keep_if_best,
    near_chance,
)
from budgetnet.search.report import Reporter
from budgetnet.search.space import suggest_config, suggest_grid_config, warm_start
from budgetnet.search.trial import MIN_EPOCHS_PER_TRIAL, REPORT_STEPS, run_trial
from budgetnet.search.workers import (
    LEASE_TTL_S,
    Lease,
    Workers,
    fail_orphans,
    new_session,
    split_resources,
    wait_ready,
)
from budgetnet.train import measure_rate


@dataclass
class SearchOptions:
    max_params: float
    budget_seconds: float
    dataset: str = "cifar100"
    image_size: int | None = None  # folder datasets: the side images are resized to (None: 32 px)
    data_dir: str | None = None
    storage: str = "sqlite:///studies/budgetnet.db"
    study_name: str | None = None
    out: str = "best.pt"
    seed: int = 0
    pruner: str = "median"
    sampler: str = "tpe"
    grid: tuple[dict, dict] | None = None  # (base config dict, grid) for sampler="grid"
    # The CLI's default is --final-fraction auto (final_auto, 0.25); these are the library's fixed share.
    final_fraction: float = 0.35  # with final_auto: the least the final phase gets
    final_auto: bool = False  # --final-fraction auto: the search ends early once its best value stagnates
    trial_seconds: float | None = None  # None: the search phase divided into TRIALS_PER_SEARCH slices
    device: str = "cpu"
    artifact_dir: str = "studies/artifacts"
    download: bool = False
    warm_start: bool = True
    precision: str = "auto"  # auto (the device's best, decided on this machine), fp32, bf16 or fp16
    workers: int = 1  # local worker processes on the study (the leader is one of them)
    teacher: str | None = None  # a checkpoint the final model is distilled from (its forward passes are timed)
    backend: str = "optuna"  # "ray": the search phase runs as a Ray Tune experiment (search/ray_backend.py)
    ray_address: str | None = None  # an existing Ray cluster to join; None starts a local one
    gpus_per_trial: float | None = None  # Ray's share of a GPU per trial; None: 1/workers on CUDA, 0 on a CPU
    ray_scheduler: str = "median"  # median (MedianStoppingRule) or asha, on the shared progress axis
    compile: str = "auto"  # torch.compile of trials and the final run: auto (tried in long runs only, kept if
    # measured faster), on, off


class StudyMismatch(ConfigError):
    """A resume asked for a different cap or dataset than the study was started with (a user mistake)."""


class StorageError(ConfigError):
    """``--storage`` names something Optuna cannot use: a database without its driver installed, a file
    that is not a study database or journal, a damaged one (a user mistake)."""


def default_study_name(dataset: str, max_params: float, hours: float) -> str:
    def short(x: float) -> str:
        for div, s in ((1e6, "M"), (1e3, "k")):
            if x >= div:
                return f"{x / div:g}{s}"
        return f"{x:g}"

    return f"{dataset}-{short(max_params)}params-{hours * 60:g}min"


class Interrupt:
    """First Ctrl-C (or SIGTERM): stop gracefully, keep best-so-far. Second Ctrl-C: stop at once.
    Each signal is passed on to ``forward`` (the leader's workers, which run in sessions of their own)."""

    def __init__(self):
        self.event = threading.Event()
        self.forward: Workers | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.forward is not None:
            self.forward.signal(signum)
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def make_sampler(name: str, seed: int, grid: dict | None = None) -> optuna.samplers.BaseSampler:
    """Each worker passes its own ``seed`` (the study's seed plus its index), or they would all propose
    the same random start-up points."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid, seed=seed)
    # group=True: the space is conditional (per-family knobs), so TPE models each sub-space jointly.
    # constant_liar: trials other workers are running count as bad ones, so workers spread out.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=6, multivariate=True, group=True,
                                      constant_liar=True)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=10, max_resource=REPORT_STEPS, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    # Short budgets: 3 complete trials give a usable median; no verdict before 30% of a slice, when
    # warm-up has ended and rankings start to mean something; then check at every report (10% apart).
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=30, interval_steps=10)


def make_storage(url: str, *, create: bool = True) -> optuna.storages.BaseStorage:
    """An RDB URL (sqlite:///..., postgresql://...) or a path to a journal file (several local workers).
    ``create=False`` (readers: report, dashboard's check) creates nothing: no folder, and no Optuna tables in
    a database that lacks them (Optuna's ``RDBStorage`` adds its schema to any database it opens), which
    then fails to open instead."""
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        if create:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    kwargs: dict = {"skip_table_creation": not create}
    if url.startswith("sqlite:///"):
        if create:
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # Several workers write to one file: wait up to 30 s for its lock instead of sqlite's 5 s.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 30}}
    return optuna.storages.RDBStorage(url, **kwargs)


class Objective:
    """The Optuna adapter of one trial: sample (or grid) a config, run ``trial.run_trial`` (guard → slice →
    reports), and record its outcome: a value, or ``TrialPruned`` with the reason and state."""

    def __init__(self, opts: SearchOptions, data: DeviceData, clock: Clock, search_end: float,
                 slice_s: float, interrupt: Interrupt, reporter: Reporter, study: optuna.Study,
                 max_flops: float | None = None, precision: str = "fp32", worker: int = 0,
                 lease: Lease | None = None, before_trial=None):
        self.opts, self.data, self.clock, self.max_flops = opts, data, clock, max_flops
        self.search_end, self.slice_s, self.precision = search_end, slice_s, precision
        self.interrupt, self.reporter, self.study = interrupt, reporter, study
        self.worker, self.lease, self.before_trial = worker, lease, before_trial
        self.lost: int | None = None  # the number of a trial that another process ended while this one ran it
        self.shape = data.info.shape
        self.base_data = DataConfig(dataset=opts.dataset, image_size=opts.image_size)

    def __call__(self, trial: optuna.Trial) -> float:
        row = {"number": trial.number, "family": None, "n_params": None, "flops": None, "progress": None,
               "val_acc": None, "seconds": 0.0}
        if self.opts.workers > 1:
            row["worker"] = self.worker
        t0 = time.perf_counter()
        if self.lease is not None:
            self.lease.hold(trial._trial_id)
        trial.set_user_attr("worker", self.worker)
        try:
            if self.before_trial is not None:
                self.before_trial()
            return self._run(trial, row)
        except optuna.TrialPruned:
            raise
        except optuna.exceptions.UpdateFinishedTrialError:  # failed as an orphan meanwhile: it keeps that reason
            self.lost = trial.number
            row.update(state="failed", reason="ended by another worker while this one ran it")
            raise
        except Exception as e:  # a bug or a broken config: record it, let the search go on
            row.update(state="failed", reason=f"{type(e).__name__}: {e}"[:300])
            trial.set_user_attr("reason", row["reason"])
            raise
        finally:
            if self.lease is not None:
                self.lease.release()
            row["seconds"] = time.perf_counter() - t0
            if self.lost != trial.number:
                trial.set_user_attr("state", row.get("state", "failed"))
            self.clock.save()
            self.reporter.trial(row, self.clock.used(), self.clock.total)

    def sample(self, trial: optuna.Trial) -> RunConfig:
        """The trial's config: sampled from the space, or the grid's next point (any backend)."""
        opts = self.opts
        if opts.grid is not None:
            cfg = suggest_grid_config(trial, *opts.grid, seed=opts.seed + trial.number)
            return cfg.replace(data=dataclasses.replace(cfg.data, dataset=opts.dataset, image_size=opts.image_size))
        return suggest_config(trial, self.shape, opts.max_params, self.base_data, seed=opts.seed + trial.number,
                              max_flops=self.max_flops)

    def _run(self, trial: optuna.Trial, row: dict) -> float:
        opts = self.opts
        cfg = self.sample(trial)
        row["family"] = cfg.model.family
        # Every trial trains for the full slice, so that all of them are ranked on equal terms. One that
        # would not fit before the search phase ends is not started: that time goes to the final phase.
        deadline = trial_deadline(self.search_end, self.slice_s, opts.budget_seconds)  # the net behind the slice

        def report(progress: float, val_acc: float) -> bool:
            row.update(progress=progress, val_acc=val_acc)
            trial.report(val_acc, step=round(progress * REPORT_STEPS))
            self.clock.save()
            return trial.should_prune()

        out = run_trial(cfg, self.data, max_params=opts.max_params, slice_s=self.slice_s, device=opts.device,
                        precision=self.precision, set_attr=trial.set_user_attr, report=report,
                        fits=lambda: slice_fits(self.clock.used(), self.slice_s, self.search_end, opts.budget_seconds),
                        stop=lambda: (self.interrupt.event.is_set() or self.clock.used() > deadline
                                      or self.clock.tick()),
                        sampled=opts.grid is None, interrupted=self.interrupt.event.is_set, compile=opts.compile)
        row.update(n_params=out.n_params, flops=out.flops, progress=out.progress, val_acc=out.val_acc,
                   state=out.state)
        if out.result is not None:
            self.learn_speed(trial.number, out.result.images_per_s, out.flops, out.result.steps)
        if out.constraint is not None:
            trial.set_constraint("params", out.constraint)
        if out.state != "complete":
            row["reason"] = out.reason
            trial.set_user_attr("reason", out.reason)
            raise optuna.TrialPruned(out.reason)
        keep_if_best(opts.out, self.study.study_name, trial.number, cfg, out.result, out.value, out.n_params,
                     out.flops, self.data.classes, self.data.info)
        return out.value


    def learn_speed(self, number: int, images_per_s: float, flops: int | None, steps: int) -> None:
        """Raise the time-feasible FLOP cap to what trial ``number`` showed this device can do (``images_per_s``
        of a model of ``flops`` per image, over ``steps`` steps), on either backend. The probe is one short
        measurement: taken in a busy moment (35-71 images/s against ~700 idle on the 2-core machine), it
        would keep the whole search among tiny models. The cap only rises; a model that then trains too
        slowly still ends at its own speed check, early in its slice."""
        if self.max_flops is None or not flops or steps < 2 or not images_per_s > 0:
            return
        cap = feasible_flops(images_per_s, flops, len(self.data.train), self.slice_s)
        if cap > 1.25 * self.max_flops:
            self.reporter.message(f"trial {number} trained {images_per_s:,.0f} images/s: models up to "
                                  f"{cap / 1e6:,.0f} MFLOPs/image are time-feasible (was {self.max_flops / 1e6:,.0f})")
            self.max_flops = cap
            self.study.set_user_attr("time_feasible_flops", cap)


PROBE_MODEL = ResNetConfig(depths=(2, 2, 2))  # a small reference net: 16-32-64 channels, 14 convs


def probe_speed(data: DeviceData, device: str, seconds: float, *, precision: str = "auto",
                stop=None) -> float | None:
    """This device's training throughput (images/s, after the first step) of ``PROBE_MODEL`` at batch
    128, measured for at most ``seconds`` of wall time, start-up included. ``stop()`` ends it early.
    None if it could not finish one step."""
    ref = RunConfig(model=PROBE_MODEL, train=TrainConfig(batch_size=128), data=DataConfig(dataset=data.info.name))
    return measure_rate(ref, data, device=device, seconds=seconds, stop=stop, precision=precision)


def feasible_flops(images_per_s: float, flops_per_image: float, train_images: int, slice_s: float) -> float:
    """Forward FLOPs per image a model may have so that one trial slice covers ``MIN_EPOCHS_PER_TRIAL``
    of the training split, scaled from a measured rate (``images_per_s`` of a model of ``flops_per_image``:
    the probe net, or a trial's). A FLOP-based guess; ``train_run(min_epochs=)`` then checks each trial's
    real speed. On a GPU it is far above any net under a 1M-parameter cap; on a CPU it keeps the search
    among nets that can learn something in a slice."""
    return images_per_s * flops_per_image * slice_s / (MIN_EPOCHS_PER_TRIAL * train_images)


def _counts(study: optuna.Study) -> dict:
    """Trials by Optuna state (rejected apart from pruned), and ``pruned_by``: the pruned ones by budgetnet's
    reason (pruned by the pruner, too slow, diverged, out of memory, stopped), as ``budgetnet report`` counts."""
    counts = {"complete": 0, "pruned": 0, "rejected": 0, "failed": 0}
    pruned_by: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            counts["complete"] += 1
        elif t.state == TrialState.PRUNED:
            state = t.user_attrs.get("state") or "pruned"
            counts["rejected" if state == "rejected" else "pruned"] += 1
            if state != "rejected":
                pruned_by[state] = pruned_by.get(state, 0) + 1
        elif t.state == TrialState.FAIL:
            counts["failed"] += 1
    counts["pruned_by"] = dict(sorted(pruned_by.items(), key=lambda kv: -kv[1]))
    return counts


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(done, key=lambda t: t.value) if done else None


def check_journal(url: str) -> None:
    """A ``--storage`` path (no ``://``) that exists must be an Optuna journal: Optuna would append to any
    file (a run's text log, say). An SQLite database given so is named with the URL it needs."""
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


def stored_study_attrs(url: str, name: str) -> dict | None:
    """The user attrs of study ``name`` in storage ``url``; None when it holds no such study. Nothing is
    created: a local storage file that does not exist yet holds no study. A storage Optuna cannot use is
    a one-line ``StorageError``."""
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url if "://" not in url else None
    if path is not None and not Path(path).exists():
        return None
    check_journal(url)
    try:
        with storage_errors(url):
            storage = make_storage(url)
            return storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    except KeyError:  # a new study
        return None


def _check_same_study(url: str, name: str, opts: SearchOptions) -> None:
    """A resume must search the same problem: another cap, dataset or image size would rank (and final-train) models
    against trials they cannot be compared with. Checked before the data is loaded or anything written."""
    attrs = stored_study_attrs(url, name)
    if attrs is None:  # a new study
        return
    for key, new in (("max_params", opts.max_params), ("dataset", opts.dataset), ("image_size", opts.image_size)):
        if key not in attrs:  # a study from before the attr was recorded
            continue
        old = attrs[key]
        if (math.isclose(old, new) if key == "max_params" else old == new):
            continue
        flag = "--" + key.replace("_", "-")
        old_s, new_s = (f"{old:.0f}", f"{new:.0f}") if key == "max_params" else (old or "its default", new or "its default")
        raise StudyMismatch(f"study {name!r} was started with {flag} {old_s}, not {new_s}; resume it with "
                            f"{flag} {old_s}, or give a new --study-name")


def error_line(e: BaseException) -> str:
    """The first line of an error (or of the error that caused it), at most 200 characters: what a one-line
    message quotes of a library's exception."""
    cause = e.__cause__ or e
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]


@contextlib.contextmanager
def storage_errors(url: str):
    """Whatever opening ``--storage`` raises, but a KeyError (no such study), as one-line ``StorageError``:
    no driver for a server database, a file that is not a study database, a damaged journal."""
    try:
        yield
    except KeyError:
        raise
    except Exception as e:  # noqa: BLE001 - each is the user's to fix, in one line
        kind = "an Optuna journal file" if "://" not in url else "a study database"
        raise StorageError(f"cannot use --storage {url} as {kind}: {error_line(e)}") from None


def _open_study(opts: SearchOptions, study_name: str, seed: int) -> optuna.Study:
    sampler = make_sampler(opts.sampler, seed, opts.grid[1] if opts.grid else None)
    with storage_errors(opts.storage):
        return optuna.create_study(study_name=study_name, storage=make_storage(opts.storage), direction="maximize",
                                   sampler=sampler, pruner=make_pruner(opts.pruner), load_if_exists=True)


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def final_share(opts: SearchOptions) -> str:
    if opts.final_auto:
        return (f"what the search leaves (it ends when it stagnates, between {AUTO_SEARCH_MIN:.0%} and "
                f"{1 - opts.final_fraction:.0%} of the budget)")
    return f"{opts.final_fraction:.0%} of the budget"


def trials_since_best(study: optuna.Study) -> int | None:
    """Judged trials, in trial order, since the best complete one (a tie does not beat it); None before any
    complete trial. Judged: complete, or stopped by the pruner (state ``pruned``: below the median, or
    Ray's scheduler), which found it worse than the median of its peers at the same point, let alone the
    best. Optuna's ``BestValueStagnationEvaluator`` (deprecated with ``optuna.terminator`` in 4.9) counts
    complete trials only; under a median pruner most trials end pruned, and a search on the whole of a
    2-core CPU then ran to the 75% limit with 1-2 complete trials after its best (docs/benchmarks.md).
    Trials too slow for their slice, diverged, rejected or interrupted say nothing about the space's
    best and are not counted."""
    best, since = None, 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                      optuna.trial.TrialState.PRUNED)):
        if t.state == optuna.trial.TrialState.COMPLETE and (best is None or t.value > best):
            best, since = t.value, 0
        elif t.state == optuna.trial.TrialState.COMPLETE or t.user_attrs.get("state") == "pruned":
            since += 1
    return None if best is None else since


def search_fits(opts: SearchOptions, study: optuna.Study, clock: Clock, slice_s: float,
                reporter: Reporter | None = None):
    """``fits(extra=0)``: whether another trial starts, in the leader and in every worker. Its full slice
    must fit before the search phase ends (give or take ``SLICE_GRACE``). With ``final_auto`` the phase
    also ends, once past ``AUTO_SEARCH_MIN`` of the budget, when the best value has not improved in
    ``STAGNANT_TRIALS`` judged trials in a row (``trials_since_best``); the final phase gets the rest."""
    search_end = opts.budget_seconds * (1 - opts.final_fraction)

    def stagnant() -> bool:
        if "search_ended" in study.user_attrs:  # another worker (or an earlier run) decided
            return True
        if not opts.final_auto or clock.used() < AUTO_SEARCH_MIN * opts.budget_seconds:
            return False
        if (trials_since_best(study) or 0) < STAGNANT_TRIALS:  # (never before a complete trial)
            return False
        share = 1 - clock.used() / opts.budget_seconds
        study.set_user_attr("search_ended", round(clock.used(), 1))
        if reporter is not None:
            reporter.message(f"search ends at {clock.used():.0f} s: its best value has not improved in "
                             f"{STAGNANT_TRIALS} judged trials (complete, or pruned below the median); the "
                             f"final phase gets {share:.0%} of the budget")
        return True

    def fits(extra: float = 0.0) -> bool:
        return slice_fits(clock.used() + extra, slice_s, search_end, opts.budget_seconds) and not stagnant()

    return fits


def _search_phase(study: optuna.Study, objective: Objective, fits, interrupt: Interrupt) -> None:
    """Run trials until no full slice fits or a stop; the same loop in the leader and in every worker."""
    def enough_time(study: optuna.Study, _trial=None) -> None:
        # Start a trial only if its full slice fits; the rest goes to the final phase.
        if interrupt.event.is_set() or not fits():
            study.stop()

    while fits() and not interrupt.event.is_set():
        try:
            study.optimize(objective, callbacks=[enough_time], catch=(Exception,), gc_after_trial=False)
            return
        except ValueError:  # Optuna's "Cannot tell a FAIL trial": one it ran was ended by another process
            if objective.lost is None:
                raise
            objective.lost = None  # that trial is recorded (failed, with the other's reason): go on


def run_search(opts: SearchOptions, reporter: Reporter | None = None, started: float | None = None) -> dict:
    """Run (or resume) a budgeted search and the final training; return the summary dict.

    ``started`` is the perf_counter time the command began (the budget covers everything after it).
    With ``opts.workers > 1`` this process is the leader: it starts the other workers after the probe,
    searches as worker 0, waits for them all, and alone runs the final phase (``search/workers.py``).
    A summary with an ``error`` says, in one line, why nothing could be trained.
    """
    started = time.perf_counter() if started is None else started
    reporter = reporter or Reporter()
    _quiet_optuna()
    hours = opts.budget_seconds / 3600
    study_name = opts.study_name or default_study_name(opts.dataset, opts.max_params, hours)

    _check_same_study(opts.storage, study_name, opts)
    # Load the data before touching storage: a missing dataset leaves no empty study behind.
    data = load_data(DataConfig(dataset=opts.dataset, image_size=opts.image_size), opts.data_dir, opts.device,
                     download=opts.download)
    train_images, final_images = len(data.train), len(data.train) + (len(data.val) if data.val else 0)
    num_classes = data.info.num_classes
    study = _open_study(opts, study_name, opts.seed)
    attrs = study.user_attrs
    used_before = float(attrs.get("seconds_used", 0.0))
    if "budget_seconds" in attrs and not math.isclose(attrs["budget_seconds"], opts.budget_seconds):
        reporter.message(f"note: this study was started with a {attrs['budget_seconds']:.0f} s budget; "
                         f"using the new {opts.budget_seconds:.0f} s")
    precision = resolve_precision(opts.device, opts.precision)
    for key, value in (("budget_seconds", opts.budget_seconds), ("max_params", opts.max_params),
                       ("dataset", opts.dataset), ("image_size", opts.image_size), ("precision", precision)):
        study.set_user_attr(key, value)
    # A study that is over, with its best.pt in place: its final phase done, or its search over with no
    # final phase to come (--final-fraction 0, or one skipped as too short, under the same budget). This run
    # has nothing to do and spends none of the budget (a rerun to see the result must not add its start-up
    # to the time used, nor save the clock). Otherwise the clock counts from the command's start and is
    # saved at once, so that a kill -9 in the first seconds loses no more than one save interval of it.
    same_budget = math.isclose(attrs.get("budget_seconds", -1.0), opts.budget_seconds)
    no_final = attrs.get("phase") == "final" and same_budget and (opts.final_fraction == 0 or "final_skipped" in attrs)
    finished = bool(attrs.get("final_done") or no_final) and Path(opts.out).is_file()
    clock = Clock(opts.budget_seconds, used_before, time.perf_counter() if finished else started,
                  None if finished else study,
                  save_every=clamp(CLOCK_SAVE_SHARE * opts.budget_seconds, CLOCK_SAVE_MIN_S, CLOCK_SAVE_MAX_S))
    clock.save()
    # A new session: no process of it runs a trial yet, so every RUNNING trial is a killed one's.
    orphans = fail_orphans(study, stale_only=False)
    session = new_session(study, clock.anchor(), used_before, opts.workers)
    phase = attrs.get("phase", "search")
    if used_before or orphans:
        reporter.message(f"resuming study {study_name!r} in its {phase} phase: {len(study.trials)} trials, "
                         f"{used_before:.0f} s used" + (f", {orphans} interrupted trial(s) marked failed"
                                                        if orphans else ""))
    if opts.warm_start and opts.grid is None and not study.trials:
        study.enqueue_trial(warm_start(data.info.shape, opts.max_params,
                                       DataConfig(dataset=opts.dataset, image_size=opts.image_size)),
                            skip_if_exists=True)

    search_end = opts.budget_seconds * (1 - opts.final_fraction)
    sample = opts.grid is None
    probe_s = clamp(PROBE_SHARE * opts.budget_seconds, PROBE_MIN_S, PROBE_MAX_S) if sample else 0.0
    # The slice is fixed once per study, so that trials of a resumed search compare on equal terms.
    slice_s = opts.trial_seconds or attrs.get("slice_seconds") or slice_seconds(search_end, clock.used() + probe_s)
    study.set_user_attr("slice_seconds", slice_s)

    fits = search_fits(opts, study, clock, slice_s, reporter)

    import torch

    threads = torch.get_num_threads()
    with Interrupt() as interrupt:
        searching = phase == "search" and fits(probe_s)
        max_flops = images_per_s = None
        workers = None
        if searching:
            split_resources(opts.device, opts.workers)  # before the probe: it measures one worker's share
            if opts.workers > 1 and opts.backend == "optuna":  # they start up while this process probes
                interrupt.forward = workers = Workers(opts, study_name, opts.workers, session, reporter.mode)
        if searching and not sample:  # no probe to pay the first steps' one-off cost: the first trial would
            prime_optimizers()
        if searching and sample:  # the speed probe only matters when trials will be sampled
            images_per_s = probe_speed(data, opts.device, probe_s, precision=precision,
                                       stop=lambda: interrupt.event.is_set() or clock.tick())
            if images_per_s:
                max_flops = feasible_flops(images_per_s, count_flops(PROBE_MODEL, data.info.shape), train_images,
                                           slice_s)
            study.set_user_attr("probe_images_per_s", images_per_s or 0.0)
            study.set_user_attr("time_feasible_flops", max_flops or 0.0)
        study.set_user_attr("ready", session)  # the workers wait for the probe's numbers
        lease = Lease(study._storage)
        lease.start()
        if searching and fits() and not interrupt.event.is_set():  # re-checked after the probe
            reporter.message(f"study {study_name!r}: {opts.sampler} sampler, {opts.pruner} pruner, "
                             f"{slice_s:.0f} s per trial, final training {final_share(opts)}, "
                             f"device {opts.device} in {precision}"
                             + (f" ({opts.precision})" if opts.precision != "auto" else " (auto)")
                             + (f", {images_per_s:,.0f} images/s on the probe net, models up to "
                                f"{max_flops / 1e6:,.0f} MFLOPs/image (time-feasible on this device)"
                                if max_flops else "")
                             + (f", {opts.workers} workers" if opts.workers > 1 else ""))

        def before_trial() -> None:
            if workers is not None:
                for line in workers.reap(study):
                    reporter.message(line)
            fail_orphans(study, stale_only=True)

        objective = Objective(opts, data, clock, search_end, slice_s, interrupt, reporter, study, max_flops,
                              precision, lease=lease, before_trial=before_trial)
        if searching and opts.backend == "ray":  # the same trials, as a Ray Tune experiment
            from budgetnet.search.ray_backend import ray_search_phase

            ray_search_phase(objective, fits)
        elif searching:
            _search_phase(study, objective, fits, interrupt)
        if workers is not None:
            # past the trials' own deadline and a lease's lifetime (the budget at the latest), a worker still
            # running is stuck
            overdue_at = min(trial_deadline(search_end, slice_s, opts.budget_seconds) + LEASE_TTL_S, opts.budget_seconds)
            workers.wait(study, interrupt.event.is_set, reporter.message, overdue=lambda: clock.used() > overdue_at)
            # Every worker has ended: a trial still RUNNING is one that a dead process left behind.
            fail_orphans(study, stale_only=False)
        lease.stop()
        if opts.workers > 1:  # the final phase has the machine to itself
            torch.set_num_threads(threads)
            set_memory_share(opts.device, 1.0)
        if not interrupt.event.is_set():  # a Ctrl-C'd search resumes searching, if a slice still fits
            study.set_user_attr("phase", "final")
        clock.save()

        best = _best_trial(study)
        checkpoint_phase = "search" if best is not None else None
        if best is not None and (warning := near_chance(best, num_classes)):
            reporter.warning(warning)
        final_metrics: dict = {}
        if finished:  # an earlier run of this command finished; nothing left to do
            checkpoint_phase = "final" if study.user_attrs.get("final_done") else checkpoint_phase
        elif best is not None and opts.final_fraction > 0 and not interrupt.event.is_set():
            too_short = final_too_short(best, clock.left() - WRITE_RESERVE_S, final_images, opts.out)
            if too_short:
                reporter.message(too_short)
                study.set_user_attr("final_skipped", too_short)
            else:
                objective.data = data = None  # free the search split before loading train+validation
                gc.collect()
                checkpoint_phase, final_metrics = final_training(opts, study, best, clock, interrupt.event.is_set,
                                                                 reporter, precision)
        clock.save()

    counts = _counts(study)
    summary = {
        "study": study_name,
        "storage": opts.storage,
        "trials": counts,
        "seconds_used": clock.used(),
        "budget_seconds": opts.budget_seconds,
        "overshoot_s": max(0.0, clock.used() - opts.budget_seconds),
        "precision": precision,
        "slice_seconds": slice_s,
        "workers": opts.workers,
        "backend": opts.backend,
        "probe_images_per_s": study.user_attrs.get("probe_images_per_s"),
        "best_trial": best.number if best else None,
        "best_val_acc": best.value if best else None,
        "family": best.user_attrs.get("family") if best else None,
        "n_params": best.user_attrs.get("n_params") if best else None,
        "flops": best.user_attrs.get("flops") if best else None,
        "config": json.loads(best.user_attrs["config"]) if best else None,
        "checkpoint": str(opts.out) if checkpoint_phase else None,
        "checkpoint_phase": checkpoint_phase,
        "final_metrics": final_metrics,
        "interrupted": interrupt.event.is_set(),
        "dashboard_command": dashboard_command(opts.storage, opts.artifact_dir),
    }
    if best is None and not interrupt.event.is_set():
        summary["error"] = nothing_trained(study, opts, slice_s, search_end, train_images, precision)
    if checkpoint_phase:
        summary_path = Path(opts.out).with_name(Path(opts.out).stem + ".json")
        write_atomic(summary_path, lambda f: f.write(json.dumps(summary, indent=2, default=str).encode()))
        summary["summary_json"] = str(summary_path)
    reporter.summary(summary)
    return summary


def run_worker(opts: SearchOptions, study_name: str, index: int, n: int, leader: int, session: str,
               mode: str = "text") -> int:
    """Worker ``index`` of ``n`` (a process the leader started): join session ``session`` of the study and
    search until no full slice fits, its leader is gone, or a stop. It never runs the final phase."""
    _quiet_optuna()
    split_resources(opts.device, n)
    with Interrupt() as interrupt:
        study = _open_study(opts, study_name, opts.seed + index)
        attrs = study.user_attrs
        if attrs.get("session") != session:  # a newer command owns the study now
            return 0
        save_every = clamp(CLOCK_SAVE_SHARE * opts.budget_seconds, CLOCK_SAVE_MIN_S, CLOCK_SAVE_MAX_S)
        clock = Clock.from_anchor(opts.budget_seconds, attrs["session_used_before"], attrs["session_started_at"],
                                  study, save_every=save_every)
        data = load_data(DataConfig(dataset=opts.dataset, image_size=opts.image_size), opts.data_dir, opts.device, download=opts.download)
        prime_optimizers()  # while the leader probes: not out of this worker's first slice
        attrs = wait_ready(study, session, leader, stop=interrupt.event.is_set)
        if attrs is None:  # the leader is gone, a stop, or a newer command owns the study
            return 0
        search_end = opts.budget_seconds * (1 - opts.final_fraction)
        slice_s = attrs["slice_seconds"]
        fits = search_fits(opts, study, clock, slice_s)

        def orphaned() -> None:  # the leader is gone: stop, and leave the clock to the next command
            clock.study = None
            interrupt.event.set()

        lease = Lease(study._storage, leader=leader, on_orphaned=orphaned)
        lease.start()
        objective = Objective(opts, data, clock, search_end, slice_s, interrupt, Reporter(mode), study,
                              attrs.get("time_feasible_flops") or None, attrs["precision"], worker=index,
                              lease=lease, before_trial=lambda: fail_orphans(study, stale_only=True))
        _search_phase(study, objective, fits, interrupt)
        lease.stop()
    return 0


def nothing_trained(study: optuna.Study, opts: SearchOptions, slice_s: float, search_end: float,
                    train_images: int, precision: str) -> str:
    """One line: why a search completed no trial, and what to change."""
    trials = study.get_trials(deepcopy=False)
    states = [t.user_attrs.get("state") for t in trials]
    more = "give more --hours or a smaller --max-params"
    if all(s in (None, "stopped") for s in states):  # nothing trained (None: the queued warm start)
        return (f"no trial could run: the {search_end:.0f} s search phase cannot hold one {slice_s:.0f} s trial "
                f"slice after start-up; give more --hours (or a smaller --trial-seconds)")
    if "too slow" in states and all(s in ("too slow", "stopped", "rejected") for s in states):
        rate = study.user_attrs.get("probe_images_per_s") or 0.0
        return (f"no model could learn in its slice: this {opts.device} trains {rate:,.0f} images/s in {precision} "
                f"(a reference ResNet-14), so a {slice_s:.0f} s slice cannot show a sampled model "
                f"{MIN_EPOCHS_PER_TRIAL:g} epoch of the {train_images:,} training images; {more}")
    if all(s in ("rejected", "stopped") for s in states):
        return f"every sampled model was over the {opts.max_params:,.0f}-parameter cap; raise --max-params"
    seen = ", ".join(f"{n} {s}" for s, n in sorted(
        {s: states.count(s) for s in set(states) if s}.items(), key=lambda kv: -kv[1]))
    return f"no trial completed ({seen}); see the reasons in the study (budgetnet dashboard); {more}"


def dashboard_command(storage: str, artifact_dir: str) -> str:
    return f"optuna-dashboard {storage} --artifact-dir {artifact_dir}"
