"""``budgetnet search --backend ray``: the search phase as a Ray Tune experiment, a thin adapter over the
backend-free ``trial.run_trial``. Everything before and after the search phase is ``session.run_search``'s.

Where it departs from Tune's defaults, and why (docs/search.md, "Ray backend"):
- The guard runs in the driver (``BudgetSearch.suggest``): an oversized config is recorded ``rejected``
  and never starts an actor.
- Trials end in budgetnet's states (``record.record``, as on the optuna backend); a scheduler's stop is
  ``pruned``, and trials the experiment's end stopped are ``stopped``: none stays RUNNING.
- No ``TuneConfig(time_budget_s)`` (it leaves trials RUNNING): the searcher stops proposing when a full
  slice no longer fits, trials poll the deadline, and a ``Stopper`` ends the experiment on Ctrl-C.
- The scheduler judges on the shared progress axis: one report per 10% of a slice, from 30%.
- Resume: the experiment lives under ``studies/ray/<study>`` (the name made safe: ``files.safe_name``) and is
  restored by the same command. Live objects are never pickled into Tune's state: searcher, stopper and
  callback hold a key into ``_LIVE``.
This is the only module that imports ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import ray
import torch
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import Searcher, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from budgetnet.config import RunConfig
from budgetnet.data import DeviceData
from budgetnet.device import set_memory_share
from budgetnet.files import inside, safe_name
from budgetnet.recipe import prime_optimizers
from budgetnet.search.attrs import (
    CONFIG,
    GUARD_SECONDS,
    IMAGES_PER_S,
    RAY_EXPERIMENT,
    RAY_NODE,
    RAY_SCHEDULER,
    RAY_TRIAL,
    SECONDS,
    STEPS,
    State,
)
from budgetnet.search.clock import REPORT_STEPS, SLICE_GRACE, Clock, slice_fits, trial_deadline
from budgetnet.search.final import keep_if_best
from budgetnet.search.ray_cluster import start_ray, trial_resources
from budgetnet.search.record import failure_reason, new_row, optuna_state, record
from budgetnet.search.storage import live_trial, make_sampler, storage_of, trial_id_of
from budgetnet.search.trial import Caps, guard, run_trial

METRIC = "val_acc"  # what every report carries and the scheduler compares
MARKS = 10  # reports per full trial: TrainConfig.eval_points, at 10%, 20%, ... 100% of the slice
GRACE_REPORTS = 3  # no scheduler verdict before 30% of a slice (the optuna backend's n_warmup_steps=30)
MIN_SAMPLES = 3  # other trials the median needs (the optuna backend's n_startup_trials=3)
REJECTIONS_PER_SUGGEST = 16  # rejected configs told in one suggest() before Tune's loop gets control back
OUTCOME_KEY = "budgetnet_outcome"  # in a trial's last report: its outcome, as JSON
CONFIG_KEY = "budgetnet_config"  # in a Tune trial's config: the RunConfig, as JSON
NUMBER_KEY = "budgetnet_trial"  # in a Tune trial's config: its Optuna trial number

_LIVE: dict[str, _Live] = {}  # experiment name -> what its searcher, stopper and callback need here


def experiment_dir(study: optuna.Study, artifact_dir: str) -> Path:
    """Where the study's Ray Tune experiment lives: the one recorded in the study (user attr
    ``ray_experiment``), else ``studies/ray/<safe_name(study)>`` beside ``studies/artifacts`` (with a suffix
    when another storage's study of that name has it), recorded for the next session. A new one is always
    inside that ``ray`` folder (``files.inside``)."""
    recorded = RAY_EXPERIMENT.of(study)
    if recorded:
        return Path(recorded)
    root = Path(artifact_dir).absolute().parent / "ray"
    name = safe_name(study.study_name)
    path = inside(root, name)
    while path.exists():
        path = inside(root, f"{name}-{uuid.uuid4().hex[:6]}")
    RAY_EXPERIMENT.set(study, str(path))
    return path


# -- the trial (runs in a Ray actor) ----------------------------------------------------------------

@dataclass(frozen=True)
class TrialContext:
    """What a Ray trial needs besides its config and the data, shipped once per experiment."""

    study: str
    out: str
    caps: Caps
    slice_s: float
    search_end: float
    budget_seconds: float
    final: tuple[float, int]  # the final phase's planned seconds and images (a trial's estimate)
    used_before: float  # the session's clock: ``Clock.from_anchor(budget, used_before, anchor)``
    anchor: float
    device: str
    precision: str
    sampled: bool
    cpus: float
    gpus: float
    compile: str = "auto"
    mirror: bool = False  # a complete trial scores its flip average too (--tta auto)


def ray_trial(config: dict, data: DeviceData | None = None, ctx: TrialContext | None = None) -> None:
    """One Ray Tune trial: ``run_trial`` on this actor's share of the machine. It reports validation accuracy
    at 10%, ... 90% of its slice through ``tune.report`` (a report blocks until the driver has judged it;
    a scheduler's stop ends this thread inside it), and the 100% mark together with its outcome. A
    complete trial writes its model to ``best.pt`` through ``keep_if_best`` (one flock on the folder: the
    driver and the trials must share that folder)."""
    torch.set_num_threads(max(1, int(ctx.cpus)))
    prime_optimizers()  # an actor's first trial would pay it out of its slice (later ones: nothing)
    device = ctx.device
    if device.startswith("cuda"):
        device = "cuda"  # Ray shows the trial only the GPU it was given
        set_memory_share(device, ctx.gpus)
    data = data.to(device)
    clock = Clock.from_anchor(ctx.budget_seconds, ctx.used_before, ctx.anchor)  # the session's deadline
    deadline = trial_deadline(ctx.search_end, ctx.slice_s, ctx.budget_seconds)
    attrs: dict = {RAY_NODE: ray.util.get_node_ip_address()}

    def report(progress: float, val_acc: float) -> bool:
        if progress < 1.0:  # the last mark goes with the outcome, so that a verdict on it changes nothing
            tune.report({METRIC: val_acc, "progress": progress})
        return False  # stopping is the scheduler's: it ends this thread in tune.report

    out = None
    try:
        cfg = RunConfig.from_json(config[CONFIG_KEY])
        caps = dataclasses.replace(ctx.caps, max_latency_ms=None)  # the driver's guard measured it already
        out = run_trial(cfg, data, caps=caps, slice_s=ctx.slice_s, device=device,
                        precision=ctx.precision, set_attr=attrs.__setitem__, report=report,
                        fits=lambda: slice_fits(clock.used(), ctx.slice_s, ctx.search_end, ctx.budget_seconds),
                        stop=lambda: clock.used() > deadline, sampled=ctx.sampled,
                        compile=ctx.compile, final=ctx.final, mirror=ctx.mirror)
        if out.state == State.COMPLETE:
            keep_if_best(ctx.out, ctx.study, config[NUMBER_KEY], cfg, out.result, out.value, out.n_params,
                         out.flops, data.classes, data.info)
        outcome = {"state": out.state, "reason": out.reason, "value": out.value}
    except Exception as e:  # a bug or a broken config: recorded as FAIL with the reason; the search goes on
        outcome = {"state": State.FAILED, "reason": failure_reason(e)}
    attrs.pop(CONFIG, None)  # the driver recorded it, and the guard's time
    attrs.pop(GUARD_SECONDS, None)
    outcome["attrs"] = attrs
    progress = out.progress if out is not None and out.progress is not None else 0.0
    val_acc = out.val_acc if out is not None and out.val_acc is not None else 0.0
    # Every report must carry the metric. A trial that never reached a mark reports 0.0 at iteration 1,
    # before the grace period: no scheduler reads it.
    tune.report({METRIC: val_acc, "progress": progress, OUTCOME_KEY: json.dumps(outcome)})


# -- the driver -------------------------------------------------------------------------------------

@dataclass
class _Live:
    """The driver's side of one experiment: the optuna backend's ``Objective`` (options, study, clock,
    data, reporter, interrupt), the ``fits`` rule, and the trials' rows for the Reporter."""

    objective: object
    fits: object
    concurrent: int
    hard_deadline: float
    scheduler: str
    rows: dict = field(default_factory=dict)  # Optuna trial number -> the Reporter's row
    steps: dict = field(default_factory=dict)  # Optuna trial number -> the last step reported to the study

    def stopping(self) -> bool:
        return self.objective.interrupt.event.is_set() or not self.fits()

    def record(self, study: optuna.Study, trial: optuna.Trial, state: str, reason: str = "",
               value: float | None = None, attrs: dict | None = None) -> None:
        """Tell the study how ``trial`` ended, with budgetnet's user attrs, and print its line."""
        attrs = attrs or {}
        row = self.rows.pop(trial.number, {"number": trial.number})
        for key, v in attrs.items():
            trial.set_user_attr(key, v)
        row["seconds"] = attrs.get(SECONDS, row.get("seconds", 0.0))
        if IMAGES_PER_S in attrs:  # the trial trained: its speed may raise the driver's FLOP cap
            self.objective.learn_speed(trial.number, attrs[IMAGES_PER_S], row.get("flops"), attrs.get(STEPS, 0))

        def tell() -> None:
            try:
                study.tell(trial, value if state == State.COMPLETE else None, state=optuna_state(state))
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
                pass  # finished meanwhile (a new session failed it as interrupted)

        record(trial, row, state, reason, self.objective.clock, self.objective.reporter, tell=tell)

    def result(self, trial: optuna.Trial, result: dict) -> None:
        """An evaluation mark: the study's intermediate value on the optuna backend's 0..100 axis."""
        progress = result.get("progress")
        if progress is None or not progress > 0 or self.steps.get(trial.number) == round(progress * REPORT_STEPS):
            return  # nothing evaluated yet, or told already (a last report reaches the searcher twice)
        self.steps[trial.number] = round(progress * REPORT_STEPS)
        row = self.rows.setdefault(trial.number, {"number": trial.number})
        row.update(progress=progress, val_acc=result[METRIC], seconds=result.get("time_total_s", 0.0))
        try:
            trial.report(result[METRIC], step=round(progress * REPORT_STEPS))
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            pass
        self.objective.clock.save()

    def ended(self, study: optuna.Study, trial: optuna.Trial, result: dict | None, error: bool) -> None:
        """A Ray trial ended: with its outcome (its last report), stopped by the scheduler (a mark with no
        outcome), with an error (its actor or node died), or stopped before it reported anything."""
        result = result or {}
        if OUTCOME_KEY in result:
            outcome = json.loads(result[OUTCOME_KEY])
            self.result(trial, result)
            self.record(study, trial, outcome["state"], outcome.get("reason", ""), outcome.get("value"),
                        outcome.get("attrs"))
        elif error:
            self.record(study, trial, State.FAILED, "its Ray trial failed (its actor or node died; Ray's error "
                        "is in the experiment folder)", attrs={"seconds": round(result.get("time_total_s", 0.0), 2)})
        elif METRIC in result and result.get("progress"):
            self.result(trial, result)
            self.record(study, trial, State.PRUNED, f"stopped by Ray's {self.scheduler} at {result['progress']:.0%}",
                        attrs={"seconds": round(result.get("time_total_s", 0.0), 2)})
        else:
            self.stopped(study, trial)

    def stopped(self, study: optuna.Study, trial: optuna.Trial) -> None:
        interrupted = self.objective.interrupt.event.is_set()
        self.record(study, trial, State.STOPPED, "interrupted" if interrupted else "search budget exhausted")

    def end(self, study: optuna.Study) -> None:
        """Record the trials Tune stopped without telling the searcher (the experiment's end, Ctrl-C; it
        never does for them) as PRUNED, state stopped: none stays RUNNING."""
        for number in list(self.rows):
            if storage_of(study).get_trial(trial_id_of(study, number)).state == TrialState.RUNNING:
                self.stopped(study, live_trial(study, number))
            self.rows.pop(number, None)


class BudgetSearch(OptunaSearch):
    """OptunaSearch over budgetnet's space (``Objective.sample`` as its define-by-run function) and study,
    with the guard before a config becomes a Ray trial, budgetnet's trial states, at most ``concurrent``
    trials at once, and no proposals once a full slice no longer fits. Pickled (Tune's experiment state)
    as its key alone; the study in storage is its state."""

    def __init__(self, key: str):
        self._key = key
        live = _LIVE.get(key)
        if live is None:  # unpickled outside the command that runs it (reading an experiment's files)
            Searcher.__init__(self, metric=METRIC, mode="max")
            self._ot_trials, self._completed_trials = {}, set()
            return
        opts, study = live.objective.opts, live.objective.study
        super().__init__(space=lambda trial: {CONFIG_KEY: live.objective.sample(trial).to_json(indent=None)},
                         metric=METRIC, mode="max", study_name=study.study_name, storage=storage_of(study),
                         sampler=make_sampler(opts.sampler, opts.seed, opts.grid[1] if opts.grid else None))

    def __getstate__(self) -> dict:
        return {"_key": self._key}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["_key"])

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"study": self._key}))  # the study holds the state

    def restore(self, checkpoint_path: str) -> None:
        pass

    def suggest(self, trial_id: str):
        live = _LIVE[self._key]
        for _ in range(REJECTIONS_PER_SUGGEST):
            if live.stopping():
                return Searcher.FINISHED
            if len(self._ot_trials) >= live.concurrent:
                return None
            try:
                params = super().suggest(trial_id)  # ask (a queued warm start first), then sample the space
                trial = self._ot_trials[trial_id]
                cfg = RunConfig.from_json(params[CONFIG_KEY])
                out = guard(cfg, live.objective.shape, Caps.of(live.objective.opts), trial.set_user_attr)
            except Exception as e:  # noqa: BLE001 - a config that cannot be sampled or built: recorded, the search goes on
                trial = self._ot_trials.pop(trial_id, None)
                if trial is None:  # not even asked: nothing to record, nothing to retry
                    raise
                live.record(self._ot_study, trial, State.FAILED, failure_reason(e))
                continue
            for key, over in out.constraints.items():
                trial.set_constraint(key, over)
            live.rows[trial.number] = new_row(trial.number, family=cfg.model.family, n_params=out.n_params,
                                              flops=out.flops, latency_ms=out.latency_ms)
            if out.state == State.REJECTED:  # told now; never a Ray trial
                del self._ot_trials[trial_id]
                live.record(self._ot_study, trial, State.REJECTED, out.reason)
                continue
            return {**params, NUMBER_KEY: trial.number}
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials:
            _LIVE[self._key].result(self._ot_trials[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self._ot_trials.pop(trial_id, None)
        if trial is not None:
            _LIVE[self._key].ended(self._ot_study, trial, result, error)


class _Generator(SearchGenerator):
    """Tune's wrapper of the searcher, except that a restored experiment is not finished: whether a trial
    still fits is the budget's call (``BudgetSearch.suggest``), not how the last session ended."""

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._finished = False


class _Deadline(tune.Stopper):
    """Ends the experiment on Ctrl-C/SIGTERM or past the hard deadline (trials stop themselves earlier)."""

    def __init__(self, key: str):
        self._key = key

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        live = _LIVE.get(self._key)
        return live is None or live.objective.interrupt.event.is_set() or \
            live.objective.clock.used() > live.hard_deadline


class _Watch(tune.Callback):
    """Saves the clock as Tune's loop turns, and marks each Optuna trial that Ray started (user attr
    ``ray_trial``, Tune's trial id): a rejected config never gets one."""

    def __init__(self, key: str):
        self._key = key

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._key in _LIVE:
            _LIVE[self._key].objective.clock.tick()

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        live = _LIVE.get(self._key)
        if live is None or NUMBER_KEY not in trial.config:
            return
        study = live.objective.study
        try:
            RAY_TRIAL.set_in(storage_of(study), trial_id_of(study, trial.config[NUMBER_KEY]), trial.trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


SCHEDULER_NAMES = {"median": "median stopping rule", "asha": "ASHA scheduler"}


def kept_scheduler(study: optuna.Study, asked: str, restored: bool, message) -> str:
    """The scheduler of the study's experiment (study attr ``ray_scheduler``): ``asked`` for a new one. A
    restored experiment keeps the scheduler it was created with (``Tuner.restore`` restores it), so a
    resume that asks for another is told so, and its trials' reasons name the one that judges them."""
    kept = RAY_SCHEDULER.of(study) if restored else None
    if kept is None:
        RAY_SCHEDULER.set(study, asked)
        return asked
    if kept != asked:
        message(f"--ray-scheduler {asked} not applied: the restored experiment keeps its "
                f"{SCHEDULER_NAMES[kept]} (give a new --study-name to search with another)")
    return kept


def make_scheduler(name: str):
    """Ray's scheduler on the shared progress axis: a report per 10% of a slice, judged from 30%."""
    if name == "asha":
        return tune.schedulers.ASHAScheduler(time_attr="training_iteration", metric=METRIC, mode="max",
                                             max_t=MARKS, grace_period=GRACE_REPORTS, reduction_factor=3)
    # min_time_slice=inf: never PAUSE a trial for want of samples (a paused function trial would lose
    # its slice); Ray pauses one whenever another is PENDING, which every trial is while its actor starts.
    return tune.schedulers.MedianStoppingRule(time_attr="training_iteration", metric=METRIC, mode="max",
                                              grace_period=GRACE_REPORTS, min_samples_required=MIN_SAMPLES,
                                              min_time_slice=math.inf)


def ray_search_phase(objective, fits) -> None:
    """The search phase on Ray Tune: start or join Ray, run the experiment (restored if this study has
    one) until no full slice fits or a stop, record every trial, and shut Ray down for the final phase."""
    opts, clock, study = objective.opts, objective.clock, objective.study
    t0 = time.perf_counter()
    start_ray(opts.ray_address)
    live = None
    try:
        resources = trial_resources(str(opts.device), opts.workers, opts.gpus_per_trial)
        grace = SLICE_GRACE * objective.slice_s
        key = study.study_name
        path = experiment_dir(study, opts.artifact_dir)
        restored = tune.Tuner.can_restore(str(path))
        scheduler = kept_scheduler(study, opts.ray_scheduler, restored, objective.reporter.message)
        _LIVE[key] = live = _Live(objective, fits, opts.workers,
                                  objective.plan.deadline + grace + 5.0,
                                  SCHEDULER_NAMES[scheduler])
        ctx = TrialContext(study=key, out=str(Path(opts.out).absolute()), caps=Caps.of(opts),
                           slice_s=objective.slice_s, search_end=objective.search_end,
                           budget_seconds=opts.budget_seconds, final=objective.final_plan(), used_before=clock.used_before,
                           anchor=clock.anchor(), device=str(opts.device), precision=objective.precision,
                           sampled=opts.grid is None, cpus=resources["cpu"], gpus=resources["gpu"],
                           compile=opts.compile, mirror=opts.tta == "auto")
        trainable = tune.with_parameters(tune.with_resources(ray_trial, resources),
                                         data=objective.data.to("cpu"), ctx=ctx)
        if restored:
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=False, resume_errored=False,
                                       restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=_Generator(BudgetSearch(key)),
                                            scheduler=make_scheduler(scheduler), num_samples=-1,
                                            reuse_actors=True),
                run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), stop=_Deadline(key),
                                          callbacks=[_Watch(key)], verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=0)))
        cluster = ray.cluster_resources()
        objective.reporter.message(
            f"ray {ray.__version__}: {'joined ' + opts.ray_address if opts.ray_address else 'a local cluster'} "
            f"({cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs) in {time.perf_counter() - t0:.1f} s; "
            f"{opts.workers} trial(s) at once, each {resources['cpu']:g} CPU(s)"
            + (f" and {resources['gpu']:g} GPU" if resources["gpu"] else "")
            + f"; {live.scheduler}; experiment {'restored from' if restored else 'in'} {path}")
        if not live.stopping():
            tuner.fit()
    finally:
        if live is not None:  # whatever ended the experiment, no trial of it stays RUNNING
            live.end(study)
        _LIVE.pop(study.study_name, None)
        ray.shutdown()  # the final phase gets the machine (a joined cluster stays up)
        clock.save()

