"""A worker process of ``--workers N`` (``python -m budgetnet.search.worker``, its JSON spec on stdin): it
joins its command's session and searches until no full slice fits, its command is gone, or a stop. It
never runs the final phase."""

from __future__ import annotations

import json
import os
import sys

from budgetnet.config import DataConfig
from budgetnet.data import load_data
from budgetnet.device import tune_cpu_allocator
from budgetnet.recipe import prime_optimizers
from budgetnet.search import attrs as A
from budgetnet.search.clock import Clock
from budgetnet.search.objective import Objective
from budgetnet.search.options import SearchOptions, plan_budget
from budgetnet.search.phase import Interrupt, search_fits, search_phase
from budgetnet.search.progress import Reporter
from budgetnet.search.source import study_data
from budgetnet.search.storage import open_study, quiet_optuna, storage_of
from budgetnet.search.workers import Lease, fail_orphans, split_resources, wait_ready


def run_worker(opts: SearchOptions, study_name: str, index: int, n: int, leader: int, session: str,
               mode: str = "text", joined: str | None = None) -> int:
    """Worker ``index`` of ``n`` (a process its command started; ``joined``: that command's id when it
    joined another's session) in session ``session`` of the study."""
    quiet_optuna()
    split_resources(opts.device, n)
    with Interrupt() as interrupt:
        study = open_study(opts, study_name, opts.seed + index)
        attrs = study.user_attrs
        if A.SESSION.of(attrs) != session:  # a newer command owns the study now
            return 0
        plan = plan_budget(opts)
        clock = Clock.from_anchor(opts.budget_seconds, A.SESSION_USED_BEFORE.of(attrs),
                                  A.SESSION_STARTED_AT.of(attrs), study, save_every=plan.save_every)
        data = (study_data(opts) if opts.init is not None else
                load_data(DataConfig(dataset=opts.dataset, image_size=opts.image_size), opts.data_dir, opts.device,
                          download=opts.download))
        prime_optimizers()  # while the leader probes: not out of this worker's first slice
        attrs = wait_ready(study, session, gone=lambda _: os.getppid() != leader, stop=interrupt.event.is_set)
        if attrs is None:  # the leader is gone, a stop, or a newer command owns the study
            return 0
        plan = plan.with_slice(A.SLICE_SECONDS.of(attrs))
        fits = search_fits(opts, study, clock, plan.slice_s)

        def orphaned() -> None:  # the leader is gone: stop, and leave the clock to the next command
            clock.study = None
            interrupt.event.set()

        lease = Lease(storage_of(study), leader=leader, on_orphaned=orphaned)
        lease.start()
        objective = Objective(opts, data, clock, plan.search_end, plan.slice_s, interrupt, Reporter(mode), study,
                              A.TIME_FEASIBLE_FLOPS.of(attrs) or None, A.PRECISION.of(attrs), worker=index,
                              lease=lease, before_trial=lambda: fail_orphans(study, stale_only=True), joined=joined)
        search_phase(study, objective, fits, interrupt)
        lease.stop()
    return 0


def worker_main(spec: dict) -> int:
    """A worker process from the leader's JSON ``spec`` (``Workers``)."""
    opts_dict = spec["opts"]
    if opts_dict.get("grid") is not None:
        opts_dict["grid"] = tuple(opts_dict["grid"])
    return run_worker(SearchOptions(**opts_dict), spec["study"], spec["index"], spec["workers"], spec["leader"],
                      spec["session"], spec["mode"], spec.get("joined"))


if __name__ == "__main__":
    tune_cpu_allocator()
    try:
        sys.exit(worker_main(json.loads(sys.stdin.read())))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the worker could install its handler
        sys.exit(130)
