"""``budgetnet search``: the flags checked, then one search under the budget."""

from __future__ import annotations

import sys
from pathlib import Path

from budgetnet.cli.checks import (
    _check_not_someone_elses,
    _check_ray_flags,
    _check_storage,
    _check_writable,
    _device,
)
from budgetnet.cli.parser import UserError


def _init_source(args):
    """search --init: the checkpoint, read and checked against the data and the cap before anything starts."""
    from budgetnet.config import is_folder
    from budgetnet.datasets.read import dataset_info
    from budgetnet.finetune import check_target, load_source

    for flag, given in (("--grid", args.grid is not None), ("--backend ray", args.backend == "ray"),
                        ("--teacher", args.teacher != "none"), ("--image-size", args.image_size is not None)):
        if given:
            raise UserError(f"--init and {flag} do not go together (the checkpoint fixes the net and its image "
                            f"side; fine-tuning searches run on --backend optuna)")
    source = load_source(args.init)
    check_target(source, dataset_info(args.dataset, source.info.image_size if is_folder(args.dataset) else None),
                 args.max_params, args.max_flops)
    return source


def cmd_search(args) -> int:
    from budgetnet.cli import STARTED  # the budget counts from the command line's import
    from budgetnet.config import ConfigError, is_folder
    from budgetnet.search.clock import AUTO_SEARCH_MAX
    from budgetnet.search.options import SearchOptions, default_study_name
    from budgetnet.search.progress import Reporter
    from budgetnet.search.session import run_search
    from budgetnet.search.space import load_grid

    if (args.sampler == "grid") != (args.grid is not None):
        raise UserError("--sampler grid and --grid FILE go together")
    grid = None
    if args.grid is not None:
        try:
            grid = load_grid(Path(args.grid).read_text())
        except OSError as e:
            raise UserError(f"cannot read --grid {args.grid}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"--grid {args.grid} is not a JSON text file") from None
        except ConfigError as e:
            raise UserError(f"bad --grid {args.grid}: {e}") from None
    if args.image_size is not None and not is_folder(args.dataset):
        raise UserError(f"--image-size applies to folder:PATH datasets only; {args.dataset} has its own size")
    device = str(_device(args.device))  # a flag's mistake before any file's
    latency_device = str(_device(args.latency_device, "--latency-device"))
    _check_ray_flags(args, device)
    if Path(args.out).suffix.lower() == ".json":  # the summary goes to <stem>.json: it would replace the model
        raise UserError(f"--out {args.out} ends in .json, the name of the search's summary beside the model; "
                        f"give a .pt path such as {Path(args.out).with_suffix('.pt')}")
    _check_writable(args.out)
    _check_storage(args.storage)
    source = _init_source(args) if args.init is not None else None
    named = args.dataset + (f"-{args.image_size}px" if args.image_size else "")  # another size: another study
    named += f"-from-{source.sha256[:8]}" if source is not None else ""  # another checkpoint: another study
    study_name = args.study_name or default_study_name(named, args.max_params, args.hours, args.max_flops,
                                                       args.max_latency_ms)
    _check_not_someone_elses(args.out, study_name, args.storage)
    teacher = None if args.teacher == "none" else args.teacher
    if teacher not in (None, "auto"):  # a wrong teacher is refused now, not after the search
        from budgetnet.datasets.read import dataset_info
        from budgetnet.search.teacher import load_teacher

        load_teacher(args.teacher, args.dataset, dataset_info(args.dataset, args.image_size).shape, "cpu")
    opts = SearchOptions(
        max_params=args.max_params, budget_seconds=args.hours * 3600, dataset=args.dataset,
        image_size=args.image_size,
        data_dir=args.data_dir, storage=args.storage, study_name=study_name, out=args.out,
        seed=args.seed, pruner=args.pruner, sampler=args.sampler, grid=grid,
        final_fraction=1 - AUTO_SEARCH_MAX if args.final_fraction == "auto" else args.final_fraction,
        final_auto=args.final_fraction == "auto", trial_seconds=args.trial_seconds,
        device=device, artifact_dir=args.artifact_dir, download=args.download,
        warm_start=not args.no_warm_start, precision=args.precision, pick=args.pick, tta=args.tta, teacher=teacher, workers=args.workers,
        backend=args.backend, ray_address=args.ray_address, gpus_per_trial=args.gpus_per_trial,
        ray_scheduler=args.ray_scheduler or "median", compile=args.compile, max_flops=args.max_flops,
        max_latency_ms=args.max_latency_ms, latency_device=latency_device, latency_threads=args.latency_threads,
        init=source.path if source is not None else None, normalise_with=args.normalise_with,
    )
    if opts.backend == "ray" and opts.device.startswith("cuda") and opts.gpus_per_trial == 0:
        raise UserError("--gpus-per-trial 0 on CUDA: a Ray trial without a GPU share sees no GPU; give a share "
                        "above 0, or leave the flag out (1/--workers)")
    mode = "json" if args.json else "quiet" if args.quiet else "text"
    summary = run_search(opts, Reporter(mode), started=STARTED)
    if summary.get("error"):
        print(f"budgetnet: nothing trained: {summary['error']}", file=sys.stderr)
    return 0 if summary["checkpoint"] or summary["interrupted"] or summary.get("joined") else 1
