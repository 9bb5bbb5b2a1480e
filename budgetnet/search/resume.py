"""What a command takes from the study it opens, before it searches: the same problem (a resume or a join
must give the same caps, dataset and checkpoint), whether the study is already over, and what is decided
once per study and machine (the precision, the speed probe's figures).
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna

from budgetnet.device import machine_id, resolve_precision
from budgetnet.search import attrs as A
from budgetnet.search.options import SearchOptions, StudyMismatch
from budgetnet.search.progress import Reporter
from budgetnet.search.source import init_source
from budgetnet.search.storage import stored_study_attrs


def finished(opts: SearchOptions, attrs: dict) -> bool:
    """Whether the study is over with its best.pt in place: its final phase done, or its search over with
    no final phase to come (--final-fraction 0, or one skipped as too short, under the same budget)."""
    same_budget = math.isclose(A.BUDGET_SECONDS.of(attrs, -1.0), opts.budget_seconds)
    no_final = A.PHASE.of(attrs) == "final" and same_budget and (opts.final_fraction == 0 or A.FINAL_SKIPPED in attrs)
    return bool(A.FINAL_DONE.of(attrs) or no_final) and Path(opts.out).is_file()


CAPS = {A.MAX_PARAMS: "{:.0f}".format, A.MAX_FLOPS: "{:.0f}".format, A.MAX_LATENCY_MS: "{:g}".format}  # as shown


def check_same_study(url: str, name: str, opts: SearchOptions) -> None:
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


def decide_precision(study: optuna.Study, attrs: dict, opts: SearchOptions, reporter: Reporter) -> tuple[str, bool]:
    """The precision trials train in, decided once per study and machine: a resume on the machine that
    decided it reuses it (and the probe's figures: the second value says so); a new study, or a resume on
    another machine, measures (``device.resolve_precision``); ``--precision`` other than auto overrides."""
    # the probe measures one worker's share: another --workers count is another measurement
    here = machine_id(opts.device) + (f", {opts.workers} workers" if opts.workers > 1 else "")
    was = A.MACHINE.of(attrs)
    same = was == here and A.PRECISION in attrs
    if was is not None and was != here:
        reporter.message(f"resumed on another machine ({here}; the study's precision and speed were measured on "
                         f"{was}): measuring them again")
    if opts.precision == "auto" and same:
        precision = A.PRECISION.of(attrs)
    else:
        precision = resolve_precision(opts.device, opts.precision)
    A.MACHINE.set(study, here)
    A.PRECISION.set(study, precision)
    return precision, same and bool(A.PROBE_IMAGES_PER_S.of(attrs))
