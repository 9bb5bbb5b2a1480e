"""``budgetnet search``: one command's session of a study, open → probe → search → final → summarise.

The budget bounds the whole command from its first second; the seconds used live in the study
(``search/clock.py``), so the same command run again resumes with what is left, in any phase. With
``--workers N`` this process is the leader: it alone probes, waits for its workers and runs the final
phase (``search/workers.py``).
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from budgetnet.budget import count_flops
from budgetnet.config import DataConfig
from budgetnet.data import DeviceData, load_data
from budgetnet.device import resolve_precision, set_memory_share
from budgetnet.files import write_atomic
from budgetnet.latency import thread_label
from budgetnet.recipe import prime_optimizers
from budgetnet.search import attrs as A
from budgetnet.search.attrs import State
from budgetnet.search.clock import WRITE_RESERVE_S, Clock, slice_seconds
from budgetnet.search.final import check_caps, final_too_short, final_training, near_chance
from budgetnet.search.objective import Objective
from budgetnet.search.options import (
    Plan,
    SearchOptions,
    StudyMismatch,
    default_study_name,
    final_share,
    plan_budget,
)
from budgetnet.search.phase import Interrupt, search_fits, search_phase
from budgetnet.search.probe import PROBE_MODEL, feasible_flops, probe_speed
from budgetnet.search.progress import Reporter
from budgetnet.search.record import guard_overhead
from budgetnet.search.source import init_source, study_data
from budgetnet.search.space import finetune_warm_start, sampling_flops, warm_start
from budgetnet.search.storage import open_study, quiet_optuna, shown_url, storage_of, stored_study_attrs
from budgetnet.search.trial import MIN_EPOCHS_PER_TRIAL, Caps
from budgetnet.search.workers import LEASE_TTL_S, Lease, Workers, fail_orphans, new_session, split_resources


@dataclass
class Session:
    """What one command holds while it runs: its study, data, clock and budget plan."""

    opts: SearchOptions
    reporter: Reporter
    study: optuna.Study
    data: DeviceData | None
    clock: Clock
    plan: Plan
    precision: str
    session: str
    phase: str
    finished: bool  # an earlier run finished the study: nothing to do
    train_images: int
    final_images: int
    num_classes: int
    searching: bool = False
    max_flops: float | None = None
    workers: Workers | None = None
    objective: Objective | None = None
    fits: object = None


def run_search(opts: SearchOptions, reporter: Reporter | None = None, started: float | None = None) -> dict:
    """Run (or resume) a budgeted search and the final training; return the summary dict.

    ``started`` is the perf_counter time the command began (the budget covers everything after it).
    A summary with an ``error`` says, in one line, why nothing could be trained.
    """
    started = time.perf_counter() if started is None else started
    reporter = reporter or Reporter()
    quiet_optuna()
    s = open_session(opts, reporter, started)
    threads = torch.get_num_threads()
    with Interrupt() as interrupt:
        probe(s, interrupt)
        search(s, interrupt, threads)
        checkpoint_phase, final_metrics = final(s, interrupt)
    return summarise(s, checkpoint_phase, final_metrics, interrupt.event.is_set())


def open_session(opts: SearchOptions, reporter: Reporter, started: float) -> Session:
    """Load the data, open (or resume) the study, start the clock and a new session, fix the slice."""
    study_name = opts.study_name or default_study_name(opts.dataset, opts.max_params, opts.budget_seconds / 3600,
                                                       opts.max_flops, opts.max_latency_ms)
    _check_same_study(opts.storage, study_name, opts)
    # Load the data before touching storage: a missing dataset leaves no empty study behind.
    source = init_source(opts)
    data = study_data(opts) if source is not None else load_data(
        DataConfig(dataset=opts.dataset, image_size=opts.image_size), opts.data_dir, opts.device,
        download=opts.download)
    study = open_study(opts, study_name, opts.seed)
    attrs = study.user_attrs
    used_before = float(A.SECONDS_USED.of(attrs, 0.0))
    if A.BUDGET_SECONDS in attrs and not math.isclose(A.BUDGET_SECONDS.of(attrs), opts.budget_seconds):
        reporter.message(f"note: this study was started with a {A.BUDGET_SECONDS.of(attrs):.0f} s budget; "
                         f"using the new {opts.budget_seconds:.0f} s")
    precision = resolve_precision(opts.device, opts.precision)
    for attr, value in ((A.BUDGET_SECONDS, opts.budget_seconds), (A.MAX_PARAMS, opts.max_params),
                        (A.MAX_FLOPS, opts.max_flops), (A.MAX_LATENCY_MS, opts.max_latency_ms),
                        (A.LATENCY_DEVICE, opts.latency_device), (A.LATENCY_THREADS, opts.latency_threads),
                        (A.DATASET, opts.dataset), (A.IMAGE_SIZE, opts.image_size), (A.PRECISION, precision)):
        attr.set(study, value)
    if source is not None:
        A.INIT.set(study, source.path)
        A.INIT_SHA256.set(study, source.sha256)
    plan = plan_budget(opts)
    finished = _finished(opts, attrs)
    # A finished study spends none of the budget (a rerun to see the result adds nothing to the time
    # used); otherwise the clock counts from the command's start, saved at once against a kill -9.
    clock = Clock(opts.budget_seconds, used_before, time.perf_counter() if finished else started,
                  None if finished else study, save_every=plan.save_every)
    clock.save()
    # A new session: no process of it runs a trial yet, so every RUNNING trial is a killed one's.
    orphans = fail_orphans(study, stale_only=False)
    session = new_session(study, clock.anchor(), used_before, opts.workers)
    phase = A.PHASE.of(attrs, "search")
    if used_before or orphans:
        reporter.message(f"resuming study {study_name!r} in its {phase} phase: {len(study.trials)} trials, "
                         f"{used_before:.0f} s used" + (f", {orphans} interrupted trial(s) marked failed"
                                                        if orphans else ""))
    if opts.warm_start and opts.grid is None and not study.trials:
        study.enqueue_trial(finetune_warm_start(source.cfg) if source is not None else
                            warm_start(data.info.shape, opts.max_params,
                                       DataConfig(dataset=opts.dataset, image_size=opts.image_size),
                                       sampling_flops(None, opts.max_flops)),
                            skip_if_exists=True)
    # The slice is fixed once per study, so that trials of a resumed search compare on equal terms.
    plan = plan.with_slice(opts.trial_seconds or A.SLICE_SECONDS.of(attrs)
                           or slice_seconds(plan.search_end, clock.used() + plan.probe_s))
    A.SLICE_SECONDS.set(study, plan.slice_s)
    train_images = len(data.train)
    return Session(opts, reporter, study, data, clock, plan, precision, session, phase, finished,
                   train_images=train_images, final_images=train_images + (len(data.val) if data.val else 0),
                   num_classes=data.info.num_classes, fits=search_fits(opts, study, clock, plan.slice_s, reporter))


def _finished(opts: SearchOptions, attrs: dict) -> bool:
    """Whether the study is over with its best.pt in place: its final phase done, or its search over with
    no final phase to come (--final-fraction 0, or one skipped as too short, under the same budget)."""
    same_budget = math.isclose(A.BUDGET_SECONDS.of(attrs, -1.0), opts.budget_seconds)
    no_final = A.PHASE.of(attrs) == "final" and same_budget and (opts.final_fraction == 0 or A.FINAL_SKIPPED in attrs)
    return bool(A.FINAL_DONE.of(attrs) or no_final) and Path(opts.out).is_file()


def probe(s: Session, interrupt: Interrupt) -> None:
    """Measure the device's speed (sampled trials only), start the workers, and mark the session ready."""
    opts, study, clock, plan = s.opts, s.study, s.clock, s.plan
    s.searching = s.phase == "search" and s.fits(plan.probe_s)
    images_per_s = None
    if s.searching:
        split_resources(opts.device, opts.workers)  # before the probe: it measures one worker's share
        if opts.workers > 1 and opts.backend == "optuna":  # they start up while this process probes
            interrupt.forward = s.workers = Workers(opts, study.study_name, opts.workers, s.session,
                                                    s.reporter.mode)
    sampled = opts.grid is None and opts.init is None  # a grid, or a fixed net (--init), needs no FLOP cap
    if s.searching and not sampled:  # no probe pays the first steps' one-off cost: the first trial would
        prime_optimizers()
    if s.searching and sampled:  # the speed probe only matters when architectures will be sampled
        images_per_s = probe_speed(s.data, opts.device, plan.probe_s, precision=s.precision,
                                   stop=lambda: interrupt.event.is_set() or clock.tick())
        if images_per_s:
            s.max_flops = feasible_flops(images_per_s, count_flops(PROBE_MODEL, s.data.info.shape), s.train_images,
                                         plan.slice_s)
        A.PROBE_IMAGES_PER_S.set(study, images_per_s or 0.0)
        A.TIME_FEASIBLE_FLOPS.set(study, s.max_flops or 0.0)
    A.READY.set(study, s.session)  # the workers wait for the probe's numbers
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


def search(s: Session, interrupt: Interrupt, threads: int) -> None:
    """The search phase on the chosen backend, then every worker's end; the study moves to its final phase."""
    opts, study, clock, workers = s.opts, s.study, s.clock, s.workers
    lease = Lease(storage_of(study))
    lease.start()

    def before_trial() -> None:
        if workers is not None:
            for line in workers.reap(study):
                s.reporter.message(line)
        fail_orphans(study, stale_only=True)

    s.objective = Objective(opts, s.data, clock, s.plan.search_end, s.plan.slice_s, interrupt, s.reporter, study,
                            s.max_flops, s.precision, lease=lease, before_trial=before_trial)
    if s.searching and opts.backend == "ray":  # the same trials, as a Ray Tune experiment
        from budgetnet.search.ray_backend import ray_search_phase  # ray loads only for --backend ray

        ray_search_phase(s.objective, s.fits)
    elif s.searching:
        search_phase(study, s.objective, s.fits, interrupt)
    if workers is not None:
        # past the trials' deadline and a lease's lifetime (the budget at the latest), a worker is stuck
        overdue_at = min(s.plan.deadline + LEASE_TTL_S, opts.budget_seconds)
        workers.wait(study, interrupt.event.is_set, s.reporter.message, overdue=lambda: clock.used() > overdue_at)
        # Every worker has ended: a trial still RUNNING is one that a dead process left behind.
        fail_orphans(study, stale_only=False)
    lease.stop()
    if opts.workers > 1:  # the final phase has the machine to itself
        torch.set_num_threads(threads)
        set_memory_share(opts.device, 1.0)
    if not interrupt.event.is_set():  # a Ctrl-C'd search resumes searching, if a slice still fits
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
    if s.finished:  # an earlier run of this command finished; nothing left to do
        checkpoint_phase = "final" if A.FINAL_DONE.of(study) else checkpoint_phase
    elif best is not None and opts.final_fraction > 0 and not interrupt.event.is_set():
        too_short = final_too_short(best, clock.left() - WRITE_RESERVE_S, s.final_images, opts.out)
        if too_short:
            s.reporter.message(too_short)
            A.FINAL_SKIPPED.set(study, too_short)
        else:
            s.objective.data = s.data = None  # free the search split before loading train+validation
            gc.collect()
            checkpoint_phase, final_metrics = final_training(opts, study, best, clock, interrupt.event.is_set,
                                                             s.reporter, s.precision)
    clock.save()
    return checkpoint_phase, final_metrics


def summarise(s: Session, checkpoint_phase: str | None, final_metrics: dict, interrupted: bool) -> dict:
    """The command's summary: printed, returned, and beside ``best.pt`` as ``best.json``."""
    opts, study, clock = s.opts, s.study, s.clock
    best = best_trial(study)
    check = check_caps(opts.out, Caps.of(opts), study) if checkpoint_phase else None
    clock.save()  # the check's seconds are the budget's too
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
        "family": A.FAMILY.of(best) if best else None,
        "n_params": A.N_PARAMS.of(best) if best else None,
        "flops": A.FLOPS.of(best) if best else None,
        "macs": A.FLOPS.of(best) // 2 if best and A.FLOPS.of(best) is not None else None,
        "latency_ms": A.LATENCY_MS.of(best) if best else None,  # measured by the guard, under a latency cap
        "caps": {"max_params": opts.max_params, "max_flops": opts.max_flops, "max_flops_unit": "MACs",
                 "max_latency_ms": opts.max_latency_ms, "latency_device": opts.latency_device,
                 "latency_threads": opts.latency_threads},
        "guard": guard_overhead(study.get_trials(deepcopy=False), opts.budget_seconds),
        "config": json.loads(A.CONFIG.of(best)) if best else None,
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


CAPS = {A.MAX_PARAMS: "{:.0f}".format, A.MAX_FLOPS: "{:.0f}".format, A.MAX_LATENCY_MS: "{:g}".format}  # as shown


def _check_same_study(url: str, name: str, opts: SearchOptions) -> None:
    """A resume must search the same problem: another cap, dataset or image size would rank (and final-train)
    models against trials they cannot be compared with. Checked before the data is loaded or anything written."""
    attrs = stored_study_attrs(url, name)
    if attrs is None:  # a new study
        return
    was, now = A.INIT_SHA256.of(attrs), init_source(opts).sha256 if opts.init else None
    if was != now:
        started = f"--init {A.INIT.of(attrs)} (SHA-256 {was[:12]})" if was else "no --init"
        raise StudyMismatch(f"study {name!r} was started with {started}, not "
                            f"{'--init ' + opts.init if now else 'without it'}; resume it with the same "
                            f"checkpoint, or give a new --study-name")
    asked = [(A.MAX_PARAMS, opts.max_params), (A.MAX_FLOPS, opts.max_flops), (A.MAX_LATENCY_MS, opts.max_latency_ms),
             (A.DATASET, opts.dataset), (A.IMAGE_SIZE, opts.image_size)]
    if opts.max_latency_ms is not None:  # the same cap measured elsewhere is another cap
        asked += [(A.LATENCY_DEVICE, opts.latency_device), (A.LATENCY_THREADS, opts.latency_threads)]
    for attr, new in asked:
        if attr not in attrs:  # a study from before the attr was recorded
            continue
        old = attr.of(attrs)
        if old == new or (isinstance(old, float) and isinstance(new, float) and math.isclose(old, new)):
            continue
        flag = "--" + attr.replace("_", "-")
        shown = CAPS.get(attr, lambda v: v or "its default")
        if attr in CAPS and (old is None or new is None):  # a cap given to one of the two commands only
            was, now = ((f"without {flag}", f"with {flag} {shown(new)}") if old is None
                        else (f"with {flag} {shown(old)}", "without it"))
            raise StudyMismatch(f"study {name!r} was started {was}, not {now}; resume it {was}, or give a new "
                                f"--study-name")
        raise StudyMismatch(f"study {name!r} was started with {flag} {shown(old)}, not {shown(new)}; resume it with "
                            f"{flag} {shown(old)}, or give a new --study-name")


def caps_note(opts: SearchOptions) -> str:
    """The caps a search holds its models to, with their units."""
    said = [f"{opts.max_params:,.0f} parameters"]
    if opts.max_flops is not None:
        said.append(f"{opts.max_flops / 1e6:,.4g} M MACs per image ({2 * opts.max_flops / 1e6:,.4g} MFLOPs)")
    if opts.max_latency_ms is not None:
        said.append(f"{opts.max_latency_ms:g} ms at batch 1 on {opts.latency_device} "
                    f"({thread_label(opts.latency_threads)})")
    return ", ".join(said)


def cap_flags(opts: SearchOptions) -> list[str]:
    return ["--max-params"] + ["--max-flops"] * (opts.max_flops is not None) + \
        ["--max-latency-ms"] * (opts.max_latency_ms is not None)


def over_caps(check: dict, opts: SearchOptions) -> str:
    """The caps ``check`` (``final.check_caps``) breaks, with the figures."""
    said = {"n_params": f"{check['n_params']:,} parameters, cap {opts.max_params:,.0f}",
            "macs": f"{check['macs']:,} MACs, cap {opts.max_flops or 0:,.0f}",
            "latency_ms": f"{check['latency_ms']:.3f} ms, cap {opts.max_latency_ms or 0:g} ms"}
    return "; ".join(said[k] for k in check["over"])


def counts(study: optuna.Study) -> dict:
    """Trials by Optuna state (rejected apart from pruned), and ``pruned_by``: the pruned ones by budgetnet's
    state (pruned by the pruner, too slow, diverged, out of memory, stopped), as ``budgetnet report`` counts."""
    counted = {"complete": 0, "pruned": 0, "rejected": 0, "failed": 0}
    pruned_by: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            counted["complete"] += 1
        elif t.state == TrialState.PRUNED:
            state = A.STATE.of(t) or State.PRUNED
            counted["rejected" if state == State.REJECTED else "pruned"] += 1
            if state != State.REJECTED:
                pruned_by[state] = pruned_by.get(state, 0) + 1
        elif t.state == TrialState.FAIL:
            counted["failed"] += 1
    counted["pruned_by"] = dict(sorted(pruned_by.items(), key=lambda kv: -kv[1]))
    return counted


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(done, key=lambda t: t.value) if done else None


def nothing_trained(study: optuna.Study, opts: SearchOptions, slice_s: float, search_end: float,
                    train_images: int, precision: str) -> str:
    """One line: why a search completed no trial, and what to change."""
    states = [A.STATE.of(t) for t in study.get_trials(deepcopy=False)]
    more = "give more --hours or a smaller --max-params"
    if all(s in (None, State.STOPPED) for s in states):  # nothing trained (None: the queued warm start)
        return (f"no trial could run: the {search_end:.0f} s search phase cannot hold one {slice_s:.0f} s trial "
                f"slice after start-up; give more --hours (or a smaller --trial-seconds)")
    if State.TOO_SLOW in states and all(s in (State.TOO_SLOW, State.STOPPED, State.REJECTED) for s in states):
        rate = A.PROBE_IMAGES_PER_S.of(study) or 0.0
        return (f"no model could learn in its slice: this {opts.device} trains {rate:,.0f} images/s in {precision} "
                f"(a reference ResNet-14), so a {slice_s:.0f} s slice cannot show a sampled model "
                f"{MIN_EPOCHS_PER_TRIAL:g} epoch of the {train_images:,} training images; {more}")
    if all(s in (State.REJECTED, State.STOPPED) for s in states):
        return f"every sampled model was over a cap ({caps_note(opts)}); raise {' or '.join(cap_flags(opts))}"
    seen = ", ".join(f"{n} {s}" for s, n in sorted(
        {s: states.count(s) for s in set(states) if s}.items(), key=lambda kv: -kv[1]))
    return f"no trial completed ({seen}); see the reasons in the study (budgetnet dashboard); {more}"


def dashboard_command(storage: str, artifact_dir: str) -> str:
    return f"optuna-dashboard {shown_url(storage, resolve=True)} --artifact-dir {artifact_dir}"
