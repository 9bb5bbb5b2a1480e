"""``budgetnet search``: one command's session of a study, open → probe → search → final → summarise.

The budget bounds the whole command from its first second; the seconds used live in the study
(``search/clock.py``), so the same command run again resumes with what is left, in any phase. The command
that opens a session leads it: it alone probes, waits for its workers (``--workers N``) and for the trials
of commands that joined it, and runs the final phase. A command that finds the study's session live joins
it instead (``search/join.py``): it adds trials until the search phase ends.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from budgetnet.budget import count_flops
from budgetnet.config import TTA_VIEWS, DataConfig
from budgetnet.data import DeviceData, load_data
from budgetnet.device import set_memory_share
from budgetnet.files import write_atomic
from budgetnet.recipe import prime_optimizers
from budgetnet.search import attrs as A
from budgetnet.search.clock import WRITE_RESERVE_S, Clock, slice_seconds
from budgetnet.search.final import check_caps, final_too_short, final_training, near_chance, restore_best
from budgetnet.search.join import (
    JOIN_POLL_S,
    joined_line,
    joined_summary,
    joiner_id,
    joiner_options,
    joining_line,
    shared_artifact_dir,
    wait_for_others,
)
from budgetnet.search.objective import Objective
from budgetnet.search.options import Plan, SearchOptions, default_study_name, final_share, plan_budget
from budgetnet.search.outcome import (
    best_trial,
    caps_note,
    counts,
    dashboard_command,
    nothing_trained,
    over_caps,
    pick_summary,
    picked_trial,
)
from budgetnet.search.phase import Interrupt, search_fits, search_phase
from budgetnet.search.pick import KEEP_ESTIMATES, Choice, choose
from budgetnet.search.probe import PROBE_MODEL, feasible_flops, probe_speed
from budgetnet.search.progress import Reporter
from budgetnet.search.record import guard_overhead
from budgetnet.search.resume import check_same_study, decide_precision, finished
from budgetnet.search.source import init_source, study_data
from budgetnet.search.space import finetune_warm_start, sampling_flops, warm_start
from budgetnet.search.storage import (
    exclusive,
    fresh_study_attrs,
    make_sampler,
    open_study,
    quiet_optuna,
    shown_url,
    storage_of,
)
from budgetnet.search.trial import Caps
from budgetnet.search.workers import (
    LEASE_INTERVAL_S,
    LEASE_TTL_S,
    Lease,
    Workers,
    fail_orphans,
    live_session,
    new_session,
    split_resources,
    wait_ready,
)


@dataclass
class Session:
    """What one command holds while it runs: its study, data, clock and budget plan."""

    opts: SearchOptions
    reporter: Reporter
    study: optuna.Study
    data: DeviceData | None
    clock: Clock
    plan: Plan
    precision: str | None  # a joiner's comes from the session once its leader has probed
    session: str
    phase: str
    finished: bool  # an earlier run finished the study: nothing to do
    train_images: int
    final_images: int
    num_classes: int
    lease: Lease
    joined: str | None = None  # this command's id when it joined another's session; None: it leads
    reuse_probe: bool = False  # the probe's figures were measured on this machine already
    searching: bool = False
    max_flops: float | None = None
    workers: Workers | None = None
    objective: Objective | None = None
    fits: object = None


def run_search(opts: SearchOptions, reporter: Reporter | None = None, started: float | None = None) -> dict:
    """Run (or resume, or join) a budgeted search and the final training; return the summary dict.

    ``started`` is the perf_counter time the command began (the budget covers everything after it).
    A summary with an ``error`` says, in one line, why nothing could be trained; a joiner's has ``joined``.
    """
    started = time.perf_counter() if started is None else started
    reporter = reporter or Reporter()
    quiet_optuna()
    s = open_session(opts, reporter, started)
    threads = torch.get_num_threads()
    try:
        with Interrupt() as interrupt:
            probe(s, interrupt)
            search(s, interrupt, threads)
            if s.joined is not None:
                summary = joined_summary(s.study, s.opts, s.joined, s.clock.used(), interrupt.event.is_set())
                reporter.joined(summary, joined_line(summary))
                return summary
            checkpoint_phase, final_metrics = final(s, interrupt)
        return summarise(s, checkpoint_phase, final_metrics, interrupt.event.is_set())
    finally:
        s.lease.stop(release=True)


def open_session(opts: SearchOptions, reporter: Reporter, started: float) -> Session:
    """Load the data and open the study; then, in one step no other command can interleave with, join its
    session if it is live, or else open a new one (resuming the study where it was)."""
    study_name = opts.study_name or default_study_name(opts.dataset, opts.max_params, opts.budget_seconds / 3600,
                                                       opts.max_flops, opts.max_latency_ms)
    check_same_study(opts.storage, study_name, opts)
    # Load the data before touching storage: a missing dataset leaves no empty study behind.
    data = study_data(opts) if opts.init is not None else load_data(
        DataConfig(dataset=opts.dataset, image_size=opts.image_size), opts.data_dir, opts.device,
        download=opts.download)
    study = open_study(opts, study_name, opts.seed)
    with exclusive(opts.storage, f"budgetnet session {study_name}"):
        attrs = fresh_study_attrs(study)
        if live_session(attrs):
            return _join(opts, reporter, study, data, attrs)
        plan = plan_budget(opts)
        used_before = float(A.SECONDS_USED.of(attrs, 0.0))
        done = finished(opts, attrs)
        # A finished study spends none of the budget (a rerun to see the result adds nothing to the time
        # used); otherwise the clock counts from the command's start, saved at once against a kill -9.
        clock = Clock(opts.budget_seconds, used_before, time.perf_counter() if done else started,
                      None if done else study, save_every=plan.save_every)
        session = new_session(study, clock.anchor(), used_before, opts)
    lease = Lease(storage_of(study), study=study, session=session)
    lease.start()
    clock.save()
    return _lead(opts, reporter, study, data, attrs, Session(
        opts, reporter, study, data, clock, plan, None, session, A.PHASE.of(attrs, "search"), done,
        train_images=len(data.train), final_images=len(data.train) + (len(data.val) if data.val else 0),
        num_classes=data.info.num_classes, lease=lease))


def _lead(opts: SearchOptions, reporter: Reporter, study: optuna.Study, data: DeviceData, attrs: dict,
          s: Session) -> Session:
    """The leader's start: the study's attributes, the precision (decided once), the orphans of an earlier
    session failed, the warm start queued, the slice fixed."""
    if A.BUDGET_SECONDS in attrs and not math.isclose(A.BUDGET_SECONDS.of(attrs), opts.budget_seconds):
        reporter.message(f"note: this study was started with a {A.BUDGET_SECONDS.of(attrs):.0f} s budget; "
                         f"using the new {opts.budget_seconds:.0f} s")
    for attr, value in ((A.BUDGET_SECONDS, opts.budget_seconds), (A.MAX_PARAMS, opts.max_params),
                        (A.MAX_FLOPS, opts.max_flops), (A.MAX_LATENCY_MS, opts.max_latency_ms),
                        (A.LATENCY_DEVICE, opts.latency_device), (A.LATENCY_THREADS, opts.latency_threads),
                        (A.DATASET, opts.dataset), (A.IMAGE_SIZE, opts.image_size),
                        (A.ARTIFACT_DIR, str(Path(opts.artifact_dir).absolute()))):
        attr.set(study, value)
    Path(opts.artifact_dir).mkdir(parents=True, exist_ok=True)  # so that joiners that reach it find it
    source = init_source(opts)
    if source is not None:
        A.INIT.set(study, source.path)
        A.INIT_SHA256.set(study, source.sha256)
    s.precision, s.reuse_probe = decide_precision(study, attrs, opts, reporter)
    # A new session: every RUNNING trial no live lease holds (a joiner of the last session may still run
    # its own) is a killed process's.
    orphans = fail_orphans(study, stale_only=False)
    used_before = s.clock.used_before
    if used_before or orphans:
        reporter.message(f"resuming study {study.study_name!r} in its {s.phase} phase: {len(study.trials)} trials, "
                         f"{used_before:.0f} s used" + (f", {orphans} interrupted trial(s) marked failed"
                                                        if orphans else ""))
    if opts.warm_start and opts.grid is None and not study.trials:
        study.enqueue_trial(finetune_warm_start(source.cfg) if source is not None else
                            warm_start(data.info.shape, opts.max_params,
                                       DataConfig(dataset=opts.dataset, image_size=opts.image_size),
                                       sampling_flops(None, opts.max_flops)),
                            skip_if_exists=True)
    # The slice is fixed once per study, so that trials of a resumed search compare on equal terms.
    s.plan = s.plan.with_slice(opts.trial_seconds or A.SLICE_SECONDS.of(attrs)
                               or slice_seconds(s.plan.search_end, s.clock.used() + s.plan.probe_s))
    A.SLICE_SECONDS.set(study, s.plan.slice_s)
    s.fits = search_fits(opts, study, s.clock, s.plan.slice_s, reporter)
    return s


def _join(opts: SearchOptions, reporter: Reporter, study: optuna.Study, data: DeviceData, attrs: dict) -> Session:
    """A joiner's start: the session's options, its clock counted from the session's anchor, a sampler
    seeded apart from the leader's. It writes nothing to the study but its own trials and the clock."""
    opts, notes = joiner_options(opts, attrs)
    for note in notes:
        reporter.message(note)
    reporter.message(joining_line(study, attrs))
    study.sampler = make_sampler(opts.sampler, opts.seed, opts.grid[1] if opts.grid else None)
    plan = plan_budget(opts)
    clock = Clock.from_anchor(opts.budget_seconds, A.SESSION_USED_BEFORE.of(attrs), A.SESSION_STARTED_AT.of(attrs),
                              study, save_every=plan.save_every)
    lease = Lease(storage_of(study), study=study)
    lease.start()
    return Session(opts, reporter, study, data, clock, plan, None, A.SESSION.of(attrs), A.PHASE.of(attrs, "search"),
                   False, train_images=len(data.train), final_images=len(data.train), num_classes=data.info.num_classes,
                   lease=lease, joined=joiner_id())


def probe(s: Session, interrupt: Interrupt) -> None:
    """Measure the device's speed (sampled trials only), start the workers, and mark the session ready; a
    joiner waits for the leader's figures instead."""
    opts, study, clock, plan = s.opts, s.study, s.clock, s.plan
    if s.joined is not None:
        _take_session(s, interrupt)
        return
    s.searching = s.phase == "search" and s.fits(plan.probe_s)
    images_per_s = None
    if s.searching:
        split_resources(opts.device, opts.workers)  # before the probe: it measures one worker's share
        if opts.workers > 1 and opts.backend == "optuna":  # they start up while this process probes
            interrupt.forward = s.workers = Workers(opts, study.study_name, opts.workers, s.session,
                                                    s.reporter.mode)
    sampled = opts.grid is None and opts.init is None  # a grid, or a fixed net (--init), needs no FLOP cap
    if s.searching and (not sampled or s.reuse_probe):  # no probe pays the first steps' one-off cost: the
        prime_optimizers()  # first trial would
    if s.searching and sampled and s.reuse_probe:
        s.max_flops = A.TIME_FEASIBLE_FLOPS.of(study) or None
        images_per_s = A.PROBE_IMAGES_PER_S.of(study)
        s.reporter.message(f"precision {s.precision} and the speed probe's figures as measured on this machine "
                           "before (decided once per study and machine)")
    elif s.searching and sampled:  # the speed probe only matters when architectures will be sampled
        images_per_s = probe_speed(s.data, opts.device, plan.probe_s, precision=s.precision,
                                   stop=lambda: interrupt.event.is_set() or clock.tick())
        if images_per_s:
            s.max_flops = feasible_flops(images_per_s, count_flops(PROBE_MODEL, s.data.info.shape), s.train_images,
                                         plan.slice_s)
        A.PROBE_IMAGES_PER_S.set(study, images_per_s or 0.0)
        A.TIME_FEASIBLE_FLOPS.set(study, s.max_flops or 0.0)
    A.READY.set(study, s.session)  # the workers and joiners wait for the probe's numbers
    if s.searching and s.fits() and not interrupt.event.is_set():  # re-checked after the probe
        s.reporter.message(f"study {study.study_name!r}: {opts.sampler} sampler, {opts.pruner} pruner, "
                           f"{plan.slice_s:.0f} s per trial, final training {final_share(opts)}, "
                           f"device {opts.device} in {s.precision}"
                           + (f" ({opts.precision})" if opts.precision != "auto" else " (auto)")
                           + (f", {images_per_s:,.0f} images/s on the probe net, models up to "
                              f"{s.max_flops / 1e6:,.0f} MFLOPs/image (time-feasible on this device)"
                              if s.max_flops else "")
                           + (f", {opts.workers} workers" if opts.workers > 1 else "")
                           + f"; caps: {caps_note(opts)}")


def _take_session(s: Session, interrupt: Interrupt) -> None:
    """A joiner waits until the leader has probed, then takes its precision, slice and FLOP cap."""
    attrs = wait_ready(s.study, s.session, gone=lambda a: not live_session(a), stop=interrupt.event.is_set,
                       poll_s=JOIN_POLL_S)
    if attrs is None:
        s.reporter.message(f"the session of study {s.study.study_name!r} ended before its leader's probe did: "
                           "nothing joined; run the command again to resume the study")
        return
    s.precision, s.max_flops = A.PRECISION.of(attrs), A.TIME_FEASIBLE_FLOPS.of(attrs) or None
    s.opts = dataclasses.replace(s.opts, artifact_dir=shared_artifact_dir(attrs, s.opts.artifact_dir))
    s.plan = s.plan.with_slice(A.SLICE_SECONDS.of(attrs))
    s.fits = search_fits(s.opts, s.study, s.clock, s.plan.slice_s, s.reporter)
    s.searching = A.PHASE.of(attrs, "search") == "search" and s.fits()
    if not s.searching:
        s.reporter.message(f"study {s.study.study_name!r} has no full {s.plan.slice_s:.0f} s slice left in its search "
                           f"phase: nothing to add (its leader writes best.pt to {A.SESSION_OUT.of(attrs)})")
    elif s.opts.workers > 1:
        split_resources(s.opts.device, s.opts.workers)
        interrupt.forward = s.workers = Workers(s.opts, s.study.study_name, s.opts.workers, s.session,
                                                s.reporter.mode, joined=s.joined)


def search(s: Session, interrupt: Interrupt, threads: int) -> None:
    """The search phase on the chosen backend, then every worker's end; the leader also waits for the
    trials that joined commands still run, and moves the study to its final phase."""
    opts, study, clock, workers = s.opts, s.study, s.clock, s.workers

    def before_trial() -> None:
        if workers is not None:
            for line in workers.reap(study):
                s.reporter.message(line)
        fail_orphans(study, stale_only=True)

    s.objective = Objective(opts, s.data, clock, s.plan.search_end, s.plan.slice_s, interrupt, s.reporter, study,
                            s.max_flops, s.precision, lease=s.lease, before_trial=before_trial, joined=s.joined)
    if s.searching and opts.backend == "ray":  # the same trials, as a Ray Tune experiment
        from budgetnet.search.ray_backend import ray_search_phase  # ray loads only for --backend ray

        ray_search_phase(s.objective, s.fits)
    elif s.searching:
        search_phase(study, s.objective, s.fits, interrupt)
    if workers is not None:
        # past the trials' deadline and a lease's lifetime (the budget at the latest), a worker is stuck
        overdue_at = min(s.plan.deadline + LEASE_TTL_S, opts.budget_seconds)
        workers.wait(study, interrupt.event.is_set, s.reporter.message, overdue=lambda: clock.used() > overdue_at)
    if s.joined is None:
        # the joiners' last trials end by the deadline: the best is picked with them in
        wait_for_others(study, s.plan.deadline + LEASE_INTERVAL_S, clock, interrupt.event.is_set)
        # Every worker has ended: a trial still RUNNING that no live lease holds is a dead process's.
        fail_orphans(study, stale_only=False)
    if opts.workers > 1:  # the final phase has the machine to itself
        torch.set_num_threads(threads)
        set_memory_share(opts.device, 1.0)
    if s.joined is None and not interrupt.event.is_set():  # a Ctrl-C'd search resumes searching, if a slice fits
        A.PHASE.set(study, "final")
    clock.save()


def final(s: Session, interrupt: Interrupt) -> tuple[str | None, dict]:
    """The final phase, when it is worth its time: the phase ``best.pt`` holds then, and its metrics."""
    opts, study, clock = s.opts, s.study, s.clock
    best = best_trial(study)
    checkpoint_phase = "search" if best is not None else None
    if best is not None and (warning := near_chance(best, s.num_classes)):
        s.reporter.warning(warning)
    final_metrics: dict = {}
    if best is not None and not s.finished:  # the search's best at --out, wherever it ran
        restore_best(opts.out, study, best, s.reporter)
    if s.finished:  # an earlier run of this command finished; nothing left to do
        checkpoint_phase = "final" if A.FINAL_DONE.of(study) else checkpoint_phase
    elif best is not None and opts.final_fraction > 0 and not interrupt.event.is_set():
        choice = pick_final(study, opts.pick, clock.left() - WRITE_RESERVE_S, s.final_images, s.reporter)
        too_short = final_too_short(choice.trial, clock.left() - WRITE_RESERVE_S, s.final_images, opts.out)
        if too_short:
            s.reporter.message(too_short)
            A.FINAL_SKIPPED.set(study, too_short)
        else:
            # the finalists' legs train on the search split; otherwise it is freed before train+validation loads
            split = s.data if len(choice.finalists) > 1 and opts.init is None else None
            s.objective.data = s.data = None
            gc.collect()
            checkpoint_phase, final_metrics = final_training(opts, study, choice, clock, interrupt.event.is_set,
                                                             s.reporter, s.precision, split, s.plan.slice_s)
    clock.save()
    return checkpoint_phase, final_metrics


def pick_final(study: optuna.Study, asked: str, seconds: float, images: int, reporter: Reporter) -> Choice:
    """The pick (``--pick``), kept in the study with the leading estimates at the final phase's real time;
    one line when it is not the observed best."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    choice, est = choose(done, asked, seconds, images)
    choice.estimates = {n: e.as_attr() for n, e in sorted(est.items(), key=lambda kv: -kv[1].value)[:KEEP_ESTIMATES]}
    for n in (choice.trial.number, choice.observed_best):
        choice.estimates[n] = est[n].as_attr()
    A.PICK.set(study, choice.as_attr())
    if choice.trial.number != choice.observed_best:
        e, o = est[choice.trial.number], est[choice.observed_best]
        reporter.message(f"pick by estimate: trial {choice.trial.number} ({e.observed:.4f} observed, {e.value:.4f} "
                         f"estimated at {e.final_epochs:.1f} epochs) over trial {choice.observed_best} "
                         f"({o.observed:.4f}, {o.value:.4f} at {o.final_epochs:.1f})")
    return choice


def summarise(s: Session, checkpoint_phase: str | None, final_metrics: dict, interrupted: bool) -> dict:
    """The command's summary: printed, returned, and beside ``best.pt`` as ``best.json``."""
    opts, study, clock = s.opts, s.study, s.clock
    best = best_trial(study)
    pick = A.PICK.of(study) if checkpoint_phase == "final" else None
    model = picked_trial(study, pick) or best  # the trial whose config the model at --out has
    check = check_caps(opts.out, Caps.of(opts), study) if checkpoint_phase else None
    clock.save()  # the check's seconds are the budget's too
    views = TTA_VIEWS[check.get("tta", "none")] if check else 1  # a flip-averaged model runs its net twice
    summary = {
        "study": study.study_name,
        "storage": shown_url(opts.storage),
        "trials": counts(study),
        "seconds_used": clock.used(),
        "budget_seconds": opts.budget_seconds,
        "overshoot_s": max(0.0, clock.used() - opts.budget_seconds),
        "precision": s.precision,
        "slice_seconds": s.plan.slice_s,
        "workers": opts.workers,
        "backend": opts.backend,
        "probe_images_per_s": A.PROBE_IMAGES_PER_S.of(study),
        "best_trial": best.number if best else None,
        "best_val_acc": best.value if best else None,
        "picked_trial": model.number if model else None,
        "pick": pick_summary(pick, A.RACE.of(study), A.TTA.of(study)),
        "family": A.FAMILY.of(model) if model else None,
        "n_params": A.N_PARAMS.of(model) if model else None,
        "tta": check.get("tta", "none") if check else None,
        "flops": A.FLOPS.of(model) * views if model and A.FLOPS.of(model) is not None else None,
        "macs": A.FLOPS.of(model) * views // 2 if model and A.FLOPS.of(model) is not None else None,
        "latency_ms": A.LATENCY_MS.of(model) if model else None,  # measured by the guard, under a latency cap
        "caps": {"max_params": opts.max_params, "max_flops": opts.max_flops, "max_flops_unit": "MACs",
                 "max_latency_ms": opts.max_latency_ms, "latency_device": opts.latency_device,
                 "latency_threads": opts.latency_threads},
        "guard": guard_overhead(study.get_trials(deepcopy=False), opts.budget_seconds),
        "config": json.loads(A.CONFIG.of(model)) if model else None,
        "checkpoint": str(opts.out) if checkpoint_phase else None,
        "checkpoint_phase": checkpoint_phase,
        "final_metrics": final_metrics,
        "interrupted": interrupted,
        "dashboard_command": dashboard_command(opts.storage, opts.artifact_dir),
    }
    if best is None and not interrupted:
        summary["error"] = nothing_trained(study, opts, s.plan.slice_s, s.plan.search_end, s.train_images,
                                           s.precision)
    if checkpoint_phase:
        summary["final_check"] = check
        if check["over"]:
            s.reporter.warning(f"the model at {opts.out} measured over its cap ({over_caps(check, opts)}): "
                               "its trial measured under it, so the machine was likely busier now")
        summary_path = Path(opts.out).with_name(Path(opts.out).stem + ".json")
        write_atomic(summary_path, lambda f: f.write(json.dumps(summary, indent=2, default=str).encode()))
        summary["summary_json"] = str(summary_path)
    s.reporter.summary(summary)
    return summary
