"""The Optuna backend's trial: sample a config, run ``trial.run_trial``, record its outcome.

Every trial trains for the full slice, so that all of them are ranked on equal terms; one that would not
fit before the search phase ends is not started, and its time goes to the final phase.
"""

from __future__ import annotations

import dataclasses
import time

import optuna

from budgetnet.config import DataConfig, RunConfig
from budgetnet.data import DeviceData
from budgetnet.finetune import group_names, target_data
from budgetnet.search.attrs import JOINED, TIME_FEASIBLE_FLOPS, WORKER, State
from budgetnet.search.clock import REPORT_STEPS, WRITE_RESERVE_S, Clock
from budgetnet.search.final import keep_artifact_if_best, keep_if_best
from budgetnet.search.options import Plan, SearchOptions, plan_budget
from budgetnet.search.phase import Interrupt
from budgetnet.search.probe import learned_cap
from budgetnet.search.progress import Reporter
from budgetnet.search.record import failure_reason, new_row, record
from budgetnet.search.source import init_source, trial_start
from budgetnet.search.space import (
    sampling_flops,
    suggest_config,
    suggest_finetune_config,
    suggest_grid_config,
)
from budgetnet.search.storage import trial_id
from budgetnet.search.trial import Caps, run_trial
from budgetnet.search.workers import Lease


class Objective:
    """One trial per call: a value, or ``TrialPruned`` with budgetnet's state and reason recorded. Also the
    driver's side of the Ray backend (``sample``, ``learn_speed``, the clock and reporter it records with)."""

    def __init__(self, opts: SearchOptions, data: DeviceData, clock: Clock, search_end: float,
                 slice_s: float, interrupt: Interrupt, reporter: Reporter, study: optuna.Study,
                 max_flops: float | None = None, precision: str = "fp32", worker: int = 0,
                 lease: Lease | None = None, before_trial=None, joined: str | None = None):
        self.opts, self.data, self.clock, self.max_flops = opts, data, clock, max_flops
        self.precision = precision
        self.plan: Plan = dataclasses.replace(plan_budget(opts), search_end=search_end, slice_s=slice_s)
        self.interrupt, self.reporter, self.study = interrupt, reporter, study
        self.worker, self.lease, self.before_trial = worker, lease, before_trial
        self.joined = joined  # a joining command's id: its trials say so, and it never writes --out
        self.lost: int | None = None  # the number of a trial that another process ended while this one ran it
        self.shape = data.info.shape
        self.base_data = DataConfig(dataset=opts.dataset, image_size=opts.image_size)
        self.source = init_source(opts)  # search --init: the net is the checkpoint's
        if self.source is not None:
            self.base_data = target_data(self.source, opts.dataset)
            self.n_groups = len(group_names(self.source))

    @property
    def search_end(self) -> float:
        return self.plan.search_end

    @property
    def slice_s(self) -> float:
        return self.plan.slice_s

    def __call__(self, trial: optuna.Trial) -> float:
        row = new_row(trial.number, **({"worker": self.worker} if self.opts.workers > 1 else {}))
        state, reason = State.FAILED, ""
        t0 = time.perf_counter()
        WORKER.set(trial, self.worker)  # who runs it, written before its lease names the process
        if self.joined is not None:
            JOINED.set(trial, self.joined)
        if self.lease is not None:
            self.lease.hold(trial_id(trial))
        try:
            if self.before_trial is not None:
                self.before_trial()
            state, reason, value = self._run(trial, row)
            if state != State.COMPLETE:
                raise optuna.TrialPruned(reason)
            return value
        except optuna.TrialPruned:
            raise
        except optuna.exceptions.UpdateFinishedTrialError:  # failed as an orphan meanwhile: it keeps that reason
            self.lost = trial.number
            state, reason = State.FAILED, "ended by another worker while this one ran it"
            raise
        except Exception as e:  # a bug or a broken config: record it, let the search go on
            state, reason = State.FAILED, failure_reason(e)
            raise
        finally:
            if self.lease is not None:
                self.lease.release()
            row["seconds"] = time.perf_counter() - t0
            record(trial, row, state, reason, self.clock, self.reporter, write=self.lost != trial.number)

    def sample(self, trial: optuna.Trial) -> RunConfig:
        """The trial's config: sampled from the space, or the grid's next point (any backend)."""
        opts = self.opts
        if opts.grid is not None:
            cfg = suggest_grid_config(trial, *opts.grid, seed=opts.seed + trial.number)
            return cfg.replace(data=dataclasses.replace(cfg.data, dataset=opts.dataset, image_size=opts.image_size))
        if self.source is not None:
            return suggest_finetune_config(trial, self.source.cfg, self.n_groups, self.base_data, self.shape,
                                           seed=opts.seed + trial.number)
        return suggest_config(trial, self.shape, opts.max_params, self.base_data, seed=opts.seed + trial.number,
                              max_flops=sampling_flops(self.max_flops, opts.max_flops))

    def _run(self, trial: optuna.Trial, row: dict) -> tuple[str, str, float | None]:
        """Train the trial; its state, reason and value. A complete one's model may become ``best.pt``."""
        opts, clock = self.opts, self.clock
        cfg = self.sample(trial)
        row["family"] = cfg.model.family
        init_state, extra = trial_start(opts, cfg, self.data) if self.source is not None else (None, {})

        def report(progress: float, val_acc: float) -> bool:
            row.update(progress=progress, val_acc=val_acc)
            trial.report(val_acc, step=round(progress * REPORT_STEPS))
            clock.save()
            return trial.should_prune()

        out = run_trial(cfg, self.data, caps=Caps.of(opts), slice_s=self.slice_s, device=opts.device,
                        precision=self.precision, set_attr=trial.set_user_attr, report=report,
                        fits=lambda: self.plan.fits(clock.used()),
                        stop=lambda: (self.interrupt.event.is_set() or clock.used() > self.plan.deadline
                                      or clock.tick()),
                        sampled=opts.grid is None, interrupted=self.interrupt.event.is_set, compile=opts.compile,
                        init_state=init_state, final=self.final_plan(), mirror=opts.tta == "auto")
        row.update(n_params=out.n_params, flops=out.flops, progress=out.progress, val_acc=out.val_acc,
                   latency_ms=out.latency_ms)
        if out.result is not None:
            self.learn_speed(trial.number, out.result.images_per_s, out.flops, out.result.steps)
        for key, over in out.constraints.items():
            trial.set_constraint(key, over)
        if out.state == State.COMPLETE:
            model = (cfg, out.result, out.value, out.n_params, out.flops, self.data.classes, self.data.info)
            if self.joined is None:
                keep_if_best(opts.out, self.study.study_name, trial.number, *model, extra=extra)
            keep_artifact_if_best(self.study, trial, opts.artifact_dir, *model, extra=extra)
        return out.state, out.reason, out.value

    def final_plan(self) -> tuple[float, int]:
        """The final phase's least planned seconds and its images (train+validation): a trial's estimate."""
        images = len(self.data.train) + (len(self.data.val) if self.data.val is not None else 0)
        return max(self.clock.total - self.plan.search_end - WRITE_RESERVE_S, 0.0), images

    def learn_speed(self, number: int, images_per_s: float, flops: int | None, steps: int) -> None:
        """Raise the time-feasible FLOP cap to what trial ``number`` showed this device can do (either
        backend); see ``probe.learned_cap``."""
        cap = learned_cap(self.max_flops, images_per_s, flops, steps, len(self.data.train), self.slice_s)
        if cap is None:
            return
        self.reporter.message(f"trial {number} trained {images_per_s:,.0f} images/s: models up to "
                              f"{cap / 1e6:,.0f} MFLOPs/image are time-feasible (was {self.max_flops / 1e6:,.0f})")
        self.max_flops = cap
        TIME_FEASIBLE_FLOPS.set(self.study, cap)
