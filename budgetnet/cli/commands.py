"""The commands other than search: train, evaluate, report, datasets, prune, export and dashboard.

Each takes the parsed flags and returns the exit code; heavy imports wait inside each command.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from budgetnet.cli.checks import _check_writable, _device
from budgetnet.cli.parser import UserError


def cmd_train(args) -> int:
    from budgetnet.budget import check_flops, check_memory, check_params, count_flops
    from budgetnet.checkpoint import save_checkpoint
    from budgetnet.compile import compile_note
    from budgetnet.config import EVAL_SUBSET, ConfigError, RunConfig, is_folder
    from budgetnet.data import load_data
    from budgetnet.datasets.read import dataset_info
    from budgetnet.train import COMPLETE, train_run

    if (args.seconds is None) == (args.epochs is None):
        raise UserError("give exactly one of --seconds S or --epochs E")
    if args.config is None:
        raise UserError("give --config FILE (a config to train from scratch) or --init CKPT (a checkpoint to "
                        "fine-tune)")
    for flag, value, default in (("--freeze", args.freeze, "none"), ("--backbone-lr-scale", args.backbone_lr_scale, 1.0),
                                 ("--lr", args.lr, None), ("--normalise-with", args.normalise_with, "checkpoint")):
        if value != default:
            raise UserError(f"{flag} applies to fine-tuning only (--init CKPT)")
    try:
        text = Path(args.config).read_text()
        try:  # a search's best.json holds the best config under "config": train it as it is
            held = json.loads(text)
            if isinstance(held, dict) and isinstance(held.get("config"), dict) and "best_trial" in held:
                text = json.dumps(held["config"])
        except ValueError:
            pass  # not JSON: from_json says so
        cfg = RunConfig.from_json(text)
    except OSError as e:
        raise UserError(f"cannot read --config {args.config}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"--config {args.config} is not a JSON text file (a checkpoint? a search's best.json "
                        f"beside it holds its config)") from None
    except ConfigError as e:
        raise UserError(f"bad --config {args.config}: {e}") from None
    if cfg.train.distill > 0:  # a distilled search's best.json: its teacher is not in the file
        print(f"budgetnet: note: train.distill {cfg.train.distill:g} needs the teacher that search trained, which "
              f"train does not take: training on the labels alone", file=sys.stderr)
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, distill=0.0))
    if cfg.train.freeze != "none" or cfg.train.backbone_lr_scale != 1.0:  # a fine-tuning search's best.json
        print(f"budgetnet: note: train.freeze {cfg.train.freeze} applies to fine-tuning (--init CKPT); from scratch "
              f"every layer trains at the lr", file=sys.stderr)
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, freeze="none", backbone_lr_scale=1.0))
    if args.dataset is not None or args.image_size is not None:  # the flags override the config's data
        dataset = args.dataset or cfg.data.dataset
        size = args.image_size or (cfg.data.image_size if is_folder(dataset) else None)  # a folder's kept
        try:
            cfg = cfg.replace(data=dataclasses.replace(cfg.data, dataset=dataset, image_size=size))
        except ConfigError as e:
            raise UserError(f"--dataset/--image-size: {e}") from None
    if args.seed is not None:
        cfg = cfg.replace(seed=args.seed)
    _check_writable(args.out)
    shape = dataset_info(cfg.data.dataset, cfg.data.image_size).shape  # a folder is scanned (and cached) here
    if args.max_params:
        check_params(cfg.model, shape, args.max_params)
    if args.max_flops:
        check_flops(cfg.model, shape, args.max_flops)
    device = _device(args.device)
    n_params = check_memory(cfg.model, cfg.train, shape, device)  # before the data and the model are loaded
    data = load_data(cfg.data, args.data_dir, device, merge_val=args.full, download=args.download)

    result = train_run(cfg, data, device=device, seconds=args.seconds, epochs=args.epochs, hook=print_progress,
                       precision=args.precision, compile=args.compile, fit_images=EVAL_SUBSET if args.full else 0)
    if result.status != COMPLETE:
        print(f"budgetnet: training ended: {result.status} ({result.reason})", file=sys.stderr)
        return 1
    save_checkpoint(args.out, cfg, result.state_dict, metrics=result.metrics, n_params=n_params,
                    flops=count_flops(cfg.model, shape), classes=data.classes, train_seconds=result.seconds,
                    precision=result.precision, extra={"phase": "train"}, info=data.info)
    note = compile_note(result.compile)
    compiled = f", {note}" if note else ""
    print(f"wrote {args.out} ({n_params:,} params, {result.seconds:.1f} s in {result.precision}{compiled}); "
          f"evaluate with: budgetnet evaluate {args.out}")
    return 0


def print_progress(progress: float, m: dict) -> bool:
    """A training run's hook: one line per evaluation mark."""
    acc = f"  val acc {m['val_acc']:.4f}" if "val_acc" in m else ""
    acc += f"  fit acc {m['fit_acc']:.4f} (training images)" if "fit_acc" in m else ""
    print(f"{progress:>4.0%}  epoch {m['epoch']:.1f}  train loss {m['train_loss']:.4f}{acc}  "
          f"{m['images_per_s']:,.0f} images/s", flush=True)
    return False


def cmd_evaluate(args) -> int:
    from budgetnet.evaluate import evaluate_checkpoint, format_report, save_evaluation

    if args.plots is not None and Path(args.plots).exists() and not Path(args.plots).is_dir():
        raise UserError(f"--plots {args.plots} is a file; give a folder for confusion.png and predictions.png")
    report = evaluate_checkpoint(args.checkpoint, args.data_dir, _device(args.device), plots=args.plots,
                                 download=args.download, precision=args.precision, dataset=args.dataset,
                                 latency_device=_device(args.latency_device, "--latency-device"),
                                 latency_threads=args.latency_threads)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    try:  # kept for `budgetnet report`; the evaluation itself is already printed
        saved = save_evaluation(report)
        if not args.json:
            print(f"  saved: {saved}")
    except OSError as e:
        print(f"budgetnet: note: could not save the evaluation beside {args.checkpoint} ({e.strerror or e})",
              file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from budgetnet.checkpoint import CheckpointError
    from budgetnet.files import write_atomic
    from budgetnet.report.pages import write_report
    from budgetnet.report.study import checkpoint_info, open_study, study_summary, trials_frame

    if args.csv == "-" and args.json:
        raise UserError("--csv - and --json both print on stdout; choose one")
    out = args.out or (None if args.csv == "-" or args.json else "report")
    if args.csv not in (None, "-"):  # checked before the page is written, and named as the user gave it
        _check_writable(args.csv, "--csv")
    study = open_study(args.storage, args.study_name)
    checkpoint, note = None, None
    path = args.checkpoint or "best.pt"  # the search's default --out
    if args.checkpoint or Path(path).exists():
        try:
            checkpoint = checkpoint_info(path, study.study_name)
        except CheckpointError as e:
            if args.checkpoint:  # asked for by name: a mistake to report
                raise UserError(str(e)) from None
            note = f"{path} is not shown: {e}"
    df = trials_frame(study)
    summary = study_summary(study, df, checkpoint, note)
    if out is not None:
        summary = write_report(study, df, summary, out)
    if args.csv not in (None, "-"):
        write_atomic(args.csv, lambda f: df.to_csv(f, index=False))
    if args.csv == "-":
        df.to_csv(sys.stdout, index=False)
    elif args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        best = summary["best"]
        counts = ", ".join(f"{n} {state}" for state, n in summary["trials"].items())
        n = summary["n_trials"]
        print(f"study {summary['study']!r}: {n} trial{'' if n == 1 else 's'} ({counts or 'none'})")
        if best:
            params = "?" if best["n_params"] is None else f"{best['n_params']:,}"
            latency = f", {best['latency_ms']:.3f} ms at batch 1" if best.get("latency_ms") is not None else ""
            freeze = f", freeze {best['params']['freeze']}" if "freeze" in (best.get("params") or {}) else ""
            print(f"best trial {best['trial']}: {best['family'] or 'family not recorded'}, {params} params{latency}, "
                  f"val acc {best['val_acc']:.4f}{freeze}")
        if (summary.get("pick") or {}).get("line"):
            print(summary["pick"]["line"])
        if checkpoint and checkpoint.get("fine_tuned"):
            print(f"{checkpoint['path']}: {checkpoint['fine_tuned']}")
        check = (summary.get("checkpoint") or {}).get("final_check")
        if check:
            print(f"{summary['checkpoint']['path']}: {check['n_params']:,} params, {check['macs']:,} MACs, "
                  f"{check['latency_ms']:.3f} ms at batch 1 on {check['latency_device']}: "
                  + (f"over {', '.join(check['over'])}" if check["over"] else "within every cap"))
        print(f"wrote {summary['files']['index']} (open it in a browser; it needs no network) and "
              f"{summary['files']['csv']}")
    return 0


def cmd_datasets(args) -> int:
    """List the built-in datasets and where each is looked for, or describe one (a folder: its classes,
    counts per split, image size and cache state). Reads only: nothing is decoded or written."""
    from budgetnet.config import DATASETS, FOLDER_IMAGE_SIZE, is_folder
    from budgetnet.datasets.builtin import builtin_found, builtin_locations
    from budgetnet.datasets.info import DATASET_INFO

    if args.dataset is not None and is_folder(args.dataset):
        from budgetnet.datasets.folder import describe

        d = describe(args.dataset, args.image_size)
        if args.json:
            print(json.dumps(d, indent=2))
            return 0
        n = {split: sum(c) for split, c in d["counts"].items()}
        print(f"{d['dataset']}  ({d['layout']} layout, {len(d['classes'])} classes, {n['train']:,} train and "
              f"{n['test']:,} test images, at {d['image_size']} px)")
        width = max(len(c) for c in d["classes"])
        print(f"  {'class':<{width}}  {'train':>7}  {'test':>7}")
        for c, tr, te in zip(d["classes"], d["counts"]["train"], d["counts"]["test"]):
            print(f"  {c:<{width}}  {tr:>7,}  {te:>7,}")
        cache = {"fresh": "up to date", "stale": "stale (the files changed; the next run rebuilds it)",
                 "missing": "not built yet (the first run builds it)"}[d["cache"]]
        print(f"  cache: {cache}" + (f", {d['cache_path']}" if d["cache_path"] else "")
              + (f"; {d['channels']} channel(s), {d['skipped']} unreadable image(s) skipped"
                 if d["cache"] == "fresh" else ""))
        return 0
    if args.image_size is not None:
        raise UserError("--image-size describes a folder:PATH dataset only")
    rows = []
    for name in [args.dataset] if args.dataset else DATASETS:
        info, where = DATASET_INFO[name], builtin_locations(name, args.data_dir)
        found = builtin_found(name, args.data_dir)
        rows.append({"dataset": name, "classes": info.num_classes, "channels": info.channels,
                     "image_size": info.image_size, "train_images": info.train_size,
                     "looked_for_in": [str(p) for p in where],
                     "found": (str(found) if found else None) if where else "generated"})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['dataset']:<14} {r['classes']:>3} classes, {r['channels']}x{r['image_size']}x{r['image_size']}, "
              f"{r['train_images']:,} training images: "
              + ("generated in memory" if not r["looked_for_in"] else
                 f"looked for in {', '.join(r['looked_for_in'])}: "
                 + (f"found in {r['found']}" if r["found"] else "not found")))
    print(f"folder:PATH    your own images: PATH/train/<class>/ and PATH/test/<class>/, or one PATH/<class>/ "
          f"tree (a test split is kept out); resized to --image-size (default {FOLDER_IMAGE_SIZE} px)")
    return 0


def cmd_prune(args) -> int:
    from budgetnet.prune import PruneError, format_prune_report, prune_checkpoint

    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise UserError(f"--out {args.out} is the checkpoint being pruned; choose another path")
    _check_writable(args.out)
    try:
        report = prune_checkpoint(args.checkpoint, args.out, amount=args.amount, max_params=args.max_params,
                                  max_macs=args.max_flops,
                                  seconds=args.seconds, data_dir=args.data_dir, device=_device(args.device),
                                  precision=args.precision, download=args.download,
                                  log=(lambda line: None) if args.json else print)
    except PruneError as e:
        raise UserError(str(e)) from None
    print(json.dumps(report, indent=2) if args.json else format_prune_report(report))
    return 0


def cmd_export(args) -> int:
    from budgetnet.export import ExportCheckFailed, ExportError, export_checkpoint, format_export_report

    _check_writable(args.out)
    try:
        report = export_checkpoint(args.checkpoint, args.out, fmt=args.format, int8=args.int8, images=args.images,
                                   calibration_images=args.calibration_images, int8_max_drop=args.int8_max_drop,
                                   int8_for=args.int8_for, data_dir=args.data_dir, dataset=args.dataset,
                                   threads=args.threads, log=lambda line: print(f"budgetnet: {line}", file=sys.stderr))
    except ExportError as e:
        raise UserError(str(e)) from None
    except ExportCheckFailed as e:  # not a mistake of the user's: exit code 1
        print(f"budgetnet: export check failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else format_export_report(report))
    return 0


def cmd_dashboard(args) -> int:
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    from budgetnet.report.study import study_names
    from budgetnet.search.storage import make_storage, shown_url

    # read only, as report: a storage with no study (or no Optuna tables) is refused, not created or written
    if not study_names(args.storage):
        raise UserError(f"--storage {shown_url(args.storage)} holds no study")
    Path(args.artifact_dir).mkdir(parents=True, exist_ok=True)
    print(f"optuna-dashboard on http://{args.host}:{args.port}/  (Ctrl-C stops it)", flush=True)
    optuna_dashboard.run_server(make_storage(args.storage), host=args.host, port=args.port,
                                artifact_store=FileSystemArtifactStore(args.artifact_dir))
    return 0
