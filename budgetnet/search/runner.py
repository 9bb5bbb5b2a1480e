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

import dataclasses
import gc
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from budgetnet.budget import BudgetExceeded, check_params, count_flops
from budgetnet.checkpoint import save_checkpoint
from budgetnet.config import ConfigError, DataConfig, ResNetConfig, RunConfig, TrainConfig
from budgetnet.data import DeviceData, load_data
from budgetnet.device import resolve_precision
from budgetnet.search.clock import (
    CLOCK_SAVE_MAX_S,
    CLOCK_SAVE_MIN_S,
    CLOCK_SAVE_SHARE,
    PROBE_MAX_S,
    PROBE_MIN_S,
    PROBE_SHARE,
    SLICE_GRACE,
    Clock,
    clamp,
    slice_seconds,
)
from budgetnet.search.report import Reporter
from budgetnet.search.space import WARM_START, suggest_config, suggest_grid_config
from budgetnet.train import COMPLETE, DIVERGED, OOM, STOPPED, TOO_SLOW, train_run

REPORT_STEPS = 100  # intermediate values are reported on a 0..100 (percent of the trial's slice) axis
WRITE_RESERVE_S = 3.0  # kept back at the end for the FLOP count, checkpoint write and artifact upload


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
    final_fraction: float = 0.35
    trial_seconds: float | None = None  # None: the search phase divided into TRIALS_PER_SEARCH slices
    device: str = "cpu"
    artifact_dir: str = "studies/artifacts"
    download: bool = False
    warm_start: bool = True
    precision: str = "auto"  # auto (the device's best, decided on this machine), fp32, bf16 or fp16


class StudyMismatch(ConfigError):
    """A resume asked for a different cap or dataset than the study was started with (a user mistake)."""


MIN_EPOCHS_PER_TRIAL = 0.5  # the FLOP cap lets every sampled model see half its training split per slice
# Runs that ended without a result worth ranking: recorded as PRUNED with this state and the run's reason.
FAILED_RUN_STATES = {DIVERGED: "diverged", OOM: "out of memory", TOO_SLOW: "too slow"}


def default_study_name(dataset: str, max_params: float, hours: float) -> str:
    def short(x: float) -> str:
        for div, s in ((1e6, "M"), (1e3, "k")):
            if x >= div:
                return f"{x / div:g}{s}"
        return f"{x:g}"

    return f"{dataset}-{short(max_params)}params-{hours * 60:g}min"


class Interrupt:
    """First Ctrl-C (or SIGTERM): stop gracefully, keep best-so-far. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.event = threading.Event()
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def make_sampler(name: str, seed: int, grid: dict | None = None) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid, seed=seed)
    # group=True: the space is conditional (per-family knobs), so TPE models each sub-space jointly.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=6, multivariate=True, group=True)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=10, max_resource=REPORT_STEPS, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    # Short budgets: 3 complete trials give a usable median; no verdict before 30% of a slice, when
    # warm-up has ended and rankings start to mean something; then check at every report (10% apart).
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=30, interval_steps=10)


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB URL (sqlite:///..., postgresql://...) or a path to a journal file (several local workers)."""
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url)


def fail_orphans(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a killed process as FAIL (one search process per study)."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "reason", "interrupted: its process ended")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        n += 1
    return n


class Objective:
    """One trial: sample (or grid) a config, guard it, train it for a slice, report, record attrs."""

    def __init__(self, opts: SearchOptions, data: DeviceData, clock: Clock, search_end: float,
                 slice_s: float, interrupt: Interrupt, reporter: Reporter, study: optuna.Study,
                 max_flops: float | None = None, precision: str = "fp32"):
        self.opts, self.data, self.clock, self.max_flops = opts, data, clock, max_flops
        self.search_end, self.slice_s, self.precision = search_end, slice_s, precision
        self.interrupt, self.reporter, self.study = interrupt, reporter, study
        self.shape = data.info.shape
        self.base_data = DataConfig(dataset=opts.dataset, image_size=opts.image_size)

    def __call__(self, trial: optuna.Trial) -> float:
        row = {"number": trial.number, "family": None, "n_params": None, "flops": None, "progress": None,
               "val_acc": None, "seconds": 0.0}
        t0 = time.perf_counter()
        try:
            return self._run(trial, row)
        except optuna.TrialPruned:
            raise
        except Exception as e:  # a bug or a broken config: record it, let the search go on
            row.update(state="failed", reason=f"{type(e).__name__}: {e}"[:300])
            trial.set_user_attr("reason", row["reason"])
            raise
        finally:
            row["seconds"] = time.perf_counter() - t0
            trial.set_user_attr("state", row.get("state", "failed"))
            self.clock.save()
            self.reporter.trial(row, self.clock.used(), self.clock.total)

    def _prune(self, trial: optuna.Trial, row: dict, state: str, reason: str) -> None:
        row.update(state=state, reason=reason)
        trial.set_user_attr("reason", reason)
        raise optuna.TrialPruned(reason)

    def _run(self, trial: optuna.Trial, row: dict) -> float:
        opts = self.opts
        if opts.grid is not None:
            cfg = suggest_grid_config(trial, *opts.grid, seed=opts.seed + trial.number)
            cfg = cfg.replace(data=dataclasses.replace(cfg.data, dataset=opts.dataset, image_size=opts.image_size))
        else:
            cfg = suggest_config(trial, self.shape, opts.max_params, self.base_data, seed=opts.seed + trial.number,
                                 max_flops=self.max_flops)
        row["family"] = cfg.model.family
        trial.set_user_attr("family", cfg.model.family)
        trial.set_user_attr("config", cfg.to_json(indent=None))
        # The guard: parameters and FLOPs on the meta device, before any real allocation.
        try:
            n_params = check_params(cfg.model, self.shape, opts.max_params)
        except BudgetExceeded as e:
            row["n_params"] = int(e.value)
            trial.set_user_attr("n_params", int(e.value))
            trial.set_constraint("params", float(e.value - opts.max_params))
            self._prune(trial, row, "rejected", str(e))
        flops = count_flops(cfg.model, self.shape)
        row.update(n_params=n_params, flops=flops)
        trial.set_user_attr("n_params", n_params)
        trial.set_user_attr("flops", flops)
        trial.set_constraint("params", float(n_params - opts.max_params))

        # Every trial trains for the full slice, so that all of them are ranked on equal terms. One that
        # would not fit before the search phase ends is not started: that time goes to the final phase.
        slice_s, grace = self.slice_s, SLICE_GRACE * self.slice_s
        if self.clock.used() + slice_s > self.search_end + grace:
            self._prune(trial, row, "stopped", "no full slice left in the search phase")
        deadline = self.search_end + 2 * grace  # the safety net behind the slice

        def hook(progress: float, metrics: dict) -> bool:
            row.update(progress=progress, val_acc=metrics["val_acc"])
            trial.report(metrics["val_acc"], step=round(progress * REPORT_STEPS))
            self.clock.save()
            return trial.should_prune()

        # Sampled trials must be able to see MIN_EPOCHS_PER_TRIAL of their data in the slice; the run
        # measures its own speed early in the slice and ends "too slow" otherwise. FLOPs predict speed
        # poorly on a CPU (depthwise convs, norms and activations are memory-bound): this is the real test.
        result = train_run(cfg, self.data, device=opts.device, seconds=slice_s, hook=hook,
                           stop=lambda: (self.interrupt.event.is_set() or self.clock.used() > deadline
                                         or self.clock.tick()),
                           min_epochs=MIN_EPOCHS_PER_TRIAL if opts.grid is None else None,
                           precision=self.precision)
        trial.set_user_attr("seconds", round(result.seconds, 2))
        trial.set_user_attr("images_per_s", round(result.images_per_s, 1))
        trial.set_user_attr("epochs", round(result.metrics.get("epoch", 0.0), 2))
        if result.status in FAILED_RUN_STATES:
            self._prune(trial, row, FAILED_RUN_STATES[result.status], result.reason)
        if result.status == STOPPED:
            if result.reason == "stopped by hook":
                self._prune(trial, row, "pruned", f"below the median at {row['progress']:.0%}")
            self._prune(trial, row, "stopped", "interrupted" if self.interrupt.event.is_set()
                        else "search budget exhausted")
        assert result.status == COMPLETE
        value = result.metrics["val_acc"]
        row.update(state="complete", val_acc=value)
        self._keep_if_best(trial, cfg, result, value, n_params, flops)
        return value

    def _keep_if_best(self, trial, cfg, result, value, n_params, flops) -> None:
        """Write best.pt as soon as a trial beats every completed one: best-so-far is never lost."""
        done = [t.value for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if done and value <= max(done):
            return
        save_checkpoint(self.opts.out, cfg, result.state_dict, metrics={"val_acc": value, **_numbers(result.metrics)},
                        n_params=n_params, flops=flops, classes=self.data.classes, train_seconds=result.seconds,
                        precision=result.precision,
                        extra={"phase": "search", "study": self.study.study_name, "trial": trial.number})


PROBE_MODEL = ResNetConfig(depths=(2, 2, 2))  # a small reference net: 16-32-64 channels, 14 convs


def probe_speed(data: DeviceData, device: str, seconds: float, *, precision: str = "auto",
                stop=None) -> float | None:
    """This device's training throughput (images/s, after the first step) of ``PROBE_MODEL`` at batch
    128, measured for at most ``seconds`` of wall time, start-up included. ``stop()`` ends it early.
    None if it could not finish one step."""
    ref = RunConfig(model=PROBE_MODEL, train=TrainConfig(batch_size=128, eval_points=1),
                    data=DataConfig(dataset=data.info.name))
    probe = DeviceData(data.info, data.classes, data.train, None)
    result = train_run(ref, probe, device=device, seconds=seconds, stop=stop, precision=precision)
    if result.status not in (COMPLETE, STOPPED) or result.steps < 1 or not result.images_per_s > 0:
        return None
    return result.images_per_s


def feasible_flops(images_per_s: float, shape, train_images: int, slice_s: float) -> float:
    """Forward FLOPs per image a model may have so that one trial slice covers ``MIN_EPOCHS_PER_TRIAL``
    of the training split, scaled from the probe's rate (a FLOP-based guess; ``train_run(min_epochs=)``
    then checks each trial's real speed). On a GPU it is far above any net under a 1M-parameter cap; on
    a CPU it keeps the search among nets that can learn something in a slice."""
    rate = images_per_s * count_flops(PROBE_MODEL, shape)  # forward FLOPs per second
    return rate * slice_s / (MIN_EPOCHS_PER_TRIAL * train_images)


def _numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _counts(study: optuna.Study) -> dict:
    counts = {"complete": 0, "pruned": 0, "rejected": 0, "failed": 0}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            counts["complete"] += 1
        elif t.state == TrialState.PRUNED:
            counts["rejected" if t.user_attrs.get("state") == "rejected" else "pruned"] += 1
        elif t.state == TrialState.FAIL:
            counts["failed"] += 1
    return counts


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(done, key=lambda t: t.value) if done else None


def _check_same_study(url: str, name: str, opts: SearchOptions) -> None:
    """A resume must search the same problem: another cap or dataset would rank (and final-train) models
    against trials they cannot be compared with. Checked before the data is loaded or anything written:
    a local storage file that does not exist yet holds no study, and is not created here."""
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url if "://" not in url else None
    if path is not None and not Path(path).exists():
        return
    storage = make_storage(url)
    try:
        attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    except KeyError:  # a new study
        return
    for key, new in (("max_params", opts.max_params), ("dataset", opts.dataset)):
        old = attrs.get(key)
        if old is None or (math.isclose(old, new) if key == "max_params" else old == new):
            continue
        flag = "--" + key.replace("_", "-")
        old_s, new_s = (f"{old:.0f}", f"{new:.0f}") if key == "max_params" else (old, new)
        raise StudyMismatch(f"study {name!r} was started with {flag} {old_s}, not {new_s}; resume it with "
                            f"{flag} {old_s}, or give a new --study-name")


def run_search(opts: SearchOptions, reporter: Reporter | None = None, started: float | None = None) -> dict:
    """Run (or resume) a budgeted search and the final training; return the summary dict.

    ``started`` is the perf_counter time the command began (the budget covers everything after it).
    A summary with an ``error`` says, in one line, why nothing could be trained.
    """
    started = time.perf_counter() if started is None else started
    reporter = reporter or Reporter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    hours = opts.budget_seconds / 3600
    study_name = opts.study_name or default_study_name(opts.dataset, opts.max_params, hours)

    _check_same_study(opts.storage, study_name, opts)
    # Load the data before touching storage: a missing dataset leaves no empty study behind.
    data = load_data(DataConfig(dataset=opts.dataset, image_size=opts.image_size), opts.data_dir, opts.device,
                     download=opts.download)
    train_images, final_images = len(data.train), len(data.train) + (len(data.val) if data.val else 0)
    storage = make_storage(opts.storage)
    sampler = make_sampler(opts.sampler, opts.seed, opts.grid[1] if opts.grid else None)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                sampler=sampler, pruner=make_pruner(opts.pruner), load_if_exists=True)
    attrs = study.user_attrs
    used_before = float(attrs.get("seconds_used", 0.0))
    if "budget_seconds" in attrs and not math.isclose(attrs["budget_seconds"], opts.budget_seconds):
        reporter.message(f"note: this study was started with a {attrs['budget_seconds']:.0f} s budget; "
                         f"using the new {opts.budget_seconds:.0f} s")
    precision = resolve_precision(opts.device, opts.precision)
    for key, value in (("budget_seconds", opts.budget_seconds), ("max_params", opts.max_params),
                       ("dataset", opts.dataset), ("precision", precision)):
        study.set_user_attr(key, value)
    clock = Clock(opts.budget_seconds, used_before, started, study,
                  save_every=clamp(CLOCK_SAVE_SHARE * opts.budget_seconds, CLOCK_SAVE_MIN_S, CLOCK_SAVE_MAX_S))
    orphans = fail_orphans(study)
    phase = attrs.get("phase", "search")
    if used_before or orphans:
        reporter.message(f"resuming study {study_name!r} in its {phase} phase: {len(study.trials)} trials, "
                         f"{used_before:.0f} s used" + (f", {orphans} interrupted trial(s) marked failed"
                                                        if orphans else ""))
    if opts.warm_start and opts.grid is None and not study.trials:
        study.enqueue_trial(WARM_START, skip_if_exists=True)

    search_end = opts.budget_seconds * (1 - opts.final_fraction)
    sample = opts.grid is None
    probe_s = clamp(PROBE_SHARE * opts.budget_seconds, PROBE_MIN_S, PROBE_MAX_S) if sample else 0.0
    # The slice is fixed once per study, so that trials of a resumed search compare on equal terms.
    slice_s = opts.trial_seconds or attrs.get("slice_seconds") or slice_seconds(search_end, clock.used() + probe_s)
    study.set_user_attr("slice_seconds", slice_s)

    def fits(extra: float = 0.0) -> bool:  # a full slice (give or take SLICE_GRACE) fits in the search phase
        return clock.used() + extra + slice_s <= search_end + SLICE_GRACE * slice_s

    with Interrupt() as interrupt:
        searching = phase == "search" and fits(probe_s)
        max_flops = images_per_s = None
        if searching and sample:  # the speed probe only matters when trials will be sampled
            images_per_s = probe_speed(data, opts.device, probe_s, precision=precision,
                                       stop=lambda: interrupt.event.is_set() or clock.tick())
            if images_per_s:
                max_flops = feasible_flops(images_per_s, data.info.shape, train_images, slice_s)
            study.set_user_attr("probe_images_per_s", images_per_s or 0.0)
            study.set_user_attr("time_feasible_flops", max_flops or 0.0)
        objective = Objective(opts, data, clock, search_end, slice_s, interrupt, reporter, study, max_flops,
                              precision)

        def enough_time(study: optuna.Study, _trial=None) -> None:
            # Start a trial only if its full slice fits; the rest goes to the final phase.
            if interrupt.event.is_set() or not fits():
                study.stop()

        if searching and fits() and not interrupt.event.is_set():  # re-checked after the probe
            reporter.message(f"study {study_name!r}: {opts.sampler} sampler, {opts.pruner} pruner, "
                             f"{slice_s:.0f} s per trial, final training {opts.final_fraction:.0%} of the budget, "
                             f"device {opts.device} in {precision}"
                             + (f" ({opts.precision})" if opts.precision != "auto" else " (auto)")
                             + (f", {images_per_s:,.0f} images/s on the probe net, models up to "
                                f"{max_flops / 1e6:,.0f} MFLOPs/image (time-feasible on this device)"
                                if max_flops else ""))
            study.optimize(objective, callbacks=[enough_time], catch=(Exception,), gc_after_trial=False)
        study.set_user_attr("phase", "final")
        clock.save()

        best = _best_trial(study)
        checkpoint_phase = "search" if best is not None else None
        final_metrics: dict = {}
        if study.user_attrs.get("final_done") and Path(opts.out).is_file():
            checkpoint_phase = "final"  # an earlier run of this command finished; nothing left to do
        elif best is not None and opts.final_fraction > 0 and not interrupt.event.is_set():
            too_short = _final_too_short(best, clock.left() - WRITE_RESERVE_S, final_images, opts.out)
            if too_short:
                reporter.message(too_short)
            else:
                objective.data = data = None  # free the search split before loading train+validation
                gc.collect()
                checkpoint_phase, final_metrics = _final_training(opts, study, best, clock, interrupt, reporter,
                                                                  precision)
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
        _atomic_write_text(summary_path, json.dumps(summary, indent=2, default=str))
        summary["summary_json"] = str(summary_path)
    reporter.summary(summary)
    return summary


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


def _final_too_short(best: optuna.trial.FrozenTrial, seconds: float, images: int, out: str) -> str | None:
    """Why a final phase of ``seconds`` is not worth running, or None. It must show the best config's data
    at least as many epochs as its trial did: a shorter run from scratch would end below that trial."""
    rate, trial_epochs = best.user_attrs.get("images_per_s", 0.0), best.user_attrs.get("epochs", 0.0)
    epochs = rate * max(seconds, 0.0) / max(images, 1)
    if seconds >= 1.0 and epochs >= trial_epochs:
        return None
    return (f"final training skipped: {max(seconds, 0):.0f} s left would train trial {best.number}'s config for "
            f"about {epochs:.2f} epochs, fewer than its {trial_epochs:.2f} in the search; {out} keeps that "
            f"trial's model")


def _final_training(opts: SearchOptions, study, best, clock: Clock, interrupt: Interrupt,
                    reporter: Reporter, precision: str) -> tuple[str, dict]:
    cfg = RunConfig.from_json(best.user_attrs["config"])
    cfg = cfg.replace(seed=opts.seed)
    runs = int(study.user_attrs.get("final_runs", 0)) + 1
    study.set_user_attr("final_runs", runs)
    again = " (again: an earlier run of it was interrupted)" if runs > 1 else ""
    reporter.message(f"final training{again}: trial {best.number}'s config on train+validation for "
                     f"{clock.left() - WRITE_RESERVE_S:.0f} s")
    data = load_data(cfg.data, opts.data_dir, opts.device, merge_val=True, download=opts.download)
    seconds = clock.left() - WRITE_RESERVE_S  # what is left once the data is loaded
    if seconds < 1.0:
        reporter.message(f"final training skipped: loading the data left {seconds:.1f} s; "
                         f"keeping trial {best.number}'s model in {opts.out}")
        return "search", {}
    deadline = opts.budget_seconds - WRITE_RESERVE_S + 1.0
    result = train_run(cfg, data, device=opts.device, seconds=seconds, precision=precision,
                       stop=lambda: interrupt.event.is_set() or clock.used() > deadline or clock.tick())
    if result.status != COMPLETE:
        reporter.message(f"final training ended early ({result.status}: {result.reason}); "
                         f"keeping trial {best.number}'s model in {opts.out}")
        return "search", {}
    metrics = {"best_trial_val_acc": best.value, **_numbers(result.metrics)}
    n_params, flops = best.user_attrs["n_params"], best.user_attrs["flops"]
    path = save_checkpoint(opts.out, cfg, result.state_dict, metrics=metrics, n_params=n_params, flops=flops,
                           classes=data.classes, train_seconds=result.seconds, precision=result.precision,
                           extra={"phase": "final", "study": study.study_name, "trial": best.number})
    _upload_artifact(study, path, opts.artifact_dir, reporter)
    study.set_user_attr("final_done", True)
    return "final", metrics


def _upload_artifact(study: optuna.Study, path: Path, artifact_dir: str, reporter: Reporter) -> None:
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    try:
        Path(artifact_dir).mkdir(parents=True, exist_ok=True)  # FileSystemArtifactStore does not create it
        store = FileSystemArtifactStore(artifact_dir)
        artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study,
                                      mimetype="application/octet-stream")
        study.set_user_attr("best_artifact_id", artifact_id)
    except OSError as e:  # the model is already safe on disk; a full artifact folder must not lose it
        reporter.message(f"warning: could not attach {path} to the study as an artifact ({e})")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def dashboard_command(storage: str, artifact_dir: str) -> str:
    return f"optuna-dashboard {storage} --artifact-dir {artifact_dir}"
