"""``budgetnet`` command line: thin flag parsing over library functions.

A user mistake prints one line (``budgetnet: error: ...``) and exits with code 2, never a traceback.
Only this module resolves ``--device auto``.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from budgetnet import __version__

STARTED = time.perf_counter()  # the wall-clock budget covers the command from here (imports included)

DEFAULT_STORAGE = "sqlite:///studies/budgetnet.db"
DEFAULT_ARTIFACTS = "studies/artifacts"


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise UserError(f"{message} (see '{self.prog} --help')")


def parse_count(text: str) -> float:
    """'1e6', '1M', '250k', '1,000,000' -> a positive number."""
    m = re.fullmatch(r"\s*([0-9][0-9_,]*\.?[0-9]*(?:e[+-]?[0-9]+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (try 1e6, 1M or 250k)")
    value = float(m.group(1).replace(",", "").replace("_", "")) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[
        m.group(2).lower()]
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _number(text: str, ok, wanted: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
    return value


MAX_WORKERS = 1_024  # local worker processes (each imports torch and holds its share of the device)
MAX_SAMPLER_SEED = 2**32 - 1 - MAX_WORKERS  # numpy's seeds end at 2**32-1; worker k samples with seed + k


def worker_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_WORKERS}, got {text!r}")
    return value


def _whole(text: str, lo: int, hi: int, what: str) -> int:
    """A whole number from ``lo`` to ``hi``, both included (``what`` names it in the error)."""
    if not text.strip().isdigit() or not lo <= int(text) <= hi:
        raise argparse.ArgumentTypeError(f"must be {what} from {lo} to {hi}, got {text!r}")
    return int(text)


def sampler_seed(text: str) -> int:
    return _whole(text, 0, MAX_SAMPLER_SEED, "a whole number")


def port_number(text: str) -> int:
    return _whole(text, 1, 65535, "a TCP port")


def positive_float(text: str) -> float:
    return _number(text, lambda v: v > 0, "a positive number")


MAX_HOURS = 8_760.0  # a year: a budget must stay a finite number of seconds (1e308 hours were inf)


def hours(text: str) -> float:
    return _number(text, lambda v: 0 < v <= MAX_HOURS, f"more than 0 and at most {MAX_HOURS:,.0f} (a year)")


def positive_int(text: str) -> int:
    value = _number(text, lambda v: v >= 1 and v == int(v), "a whole number of at least 1")
    return int(value)


def fraction(text: str) -> float:
    return _number(text, lambda v: 0 <= v < 1, "between 0 and 1 (1 excluded)")


def final_share(text: str) -> float | str:
    return "auto" if text.strip().lower() == "auto" else fraction(text)


def dataset_name(text: str) -> str:
    """The dataset as users type it: fashion_mnist, fashion-mnist, FashionMNIST, CIFAR-100, ..., or
    folder:PATH (an image folder; PATH is made absolute, so the name means the same from any folder)."""
    from budgetnet.config import DATASETS, FOLDER_PREFIX

    if text.lower().startswith(FOLDER_PREFIX):
        path = text[len(FOLDER_PREFIX):]
        if not path.strip():
            raise argparse.ArgumentTypeError("folder: needs a path, e.g. folder:~/photos")
        return FOLDER_PREFIX + str(Path(path).expanduser().absolute())
    key = re.sub(r"[-_\s]", "", text.lower())
    for name in DATASETS:
        if name.replace("_", "") == key:
            return name
    raise argparse.ArgumentTypeError(f"unknown dataset {text!r} (choose from {', '.join(DATASETS)}, "
                                     f"or folder:PATH for a folder of class folders of images)")


def image_size(text: str) -> int:
    """--image-size: a side in pixels within config.IMAGE_SIZE_RANGE."""
    from budgetnet.config import IMAGE_SIZE_RANGE

    return _whole(text, *IMAGE_SIZE_RANGE, "a whole number of pixels")


def _device(name: str):
    import torch

    from budgetnet.device import resolve_device

    try:
        device = resolve_device(name)
    except RuntimeError as e:
        raise UserError(f"bad --device {name!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):  # torch parses meta, mps, xpu...: budgetnet trains on neither
        raise UserError(f"--device {name} is not one budgetnet runs on: auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available (use --device cpu)")
    return device


def _check_writable(path: str, flag: str = "--out") -> None:
    p = Path(path)
    if p.is_dir():
        example = p / {"--out": "best.pt", "--csv": "trials.csv"}.get(flag, "budgetnet.db")
        raise UserError(f"{flag} {path} is a directory; give a file path such as {example}")
    # Tried in the nearest folder that exists: the folders still missing are made when the file is written,
    # and a command refused later (a bad flag after this one) leaves none of them behind.
    folder = p.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".budgetnet-write-test"):
            pass
    except OSError as e:
        raise UserError(f"cannot write {flag} {path}: {e.strerror or e}") from None


def _check_not_someone_elses(out: str, study_name: str, storage: str) -> None:
    """Never overwrite a model that another study (or something else) left at --out, nor one that an
    earlier study of the same name left there: a study deleted from the storage (to start over) and
    begun again would otherwise rank its trials against that model, and keep it while its best.json
    named the new study's trials."""
    from budgetnet.checkpoint import CheckpointError, load_checkpoint
    from budgetnet.search.storage import stored_study_attrs

    if not Path(out).exists():
        return
    try:
        owner = load_checkpoint(out)["extra"].get("study")
    except CheckpointError:
        raise UserError(f"--out {out} exists and is not a budgetnet checkpoint; move it or choose another "
                        f"--out") from None
    if owner != study_name:
        resume = (f"--study-name {owner} goes on with that study (a new --hours or other flags name a new "
                  "one by default), or " if stored_study_attrs(storage, owner) is not None else "")
        raise UserError(f"--out {out} holds the model of study {owner!r}, not {study_name!r}; {resume}move it "
                        f"or choose another --out")
    if stored_study_attrs(storage, study_name) is None:
        raise UserError(f"--out {out} holds the model of an earlier study {study_name!r} that --storage {storage} "
                        f"no longer holds; move it or choose another --out")


def _check_storage(url: str) -> None:
    """Reject a malformed storage before anything is created."""
    from budgetnet.search.storage import check_journal, parse_url

    check_journal(url)  # an existing file given as a path: a journal, or an SQLite file that needs sqlite:///
    if url.endswith((".log", ".jsonl")) and "://" not in url:
        _check_writable(url, "--storage")
        return
    parsed = parse_url(url)
    if parsed.drivername == "sqlite" and parsed.database:
        _check_writable(parsed.database, "--storage")


def _check_ray_flags(args, device: str) -> None:
    """The Ray flags go with --backend ray; a cluster address must answer before anything is created.
    ``device``: --device resolved (auto is cuda or cpu by now)."""
    if args.backend != "ray":
        for flag, value in (("--ray-address", args.ray_address), ("--gpus-per-trial", args.gpus_per_trial),
                            ("--ray-scheduler", args.ray_scheduler)):
            if value is not None:
                raise UserError(f"{flag} applies to --backend ray only")
        return
    if args.sampler == "grid":
        raise UserError("--sampler grid runs on --backend optuna only")
    if args.gpus_per_trial and not device.startswith("cuda"):  # --device auto on a machine without CUDA too
        raise UserError(f"--gpus-per-trial {args.gpus_per_trial:g} needs a CUDA device, and --device {args.device} "
                        f"is {device}")
    if args.ray_address is not None:
        import socket

        host, _, port = args.ray_address.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UserError(f"--ray-address {args.ray_address!r} must be HOST:PORT, the head node's GCS address "
                            f"(what 'ray start --head' prints)")
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
        except OSError as e:
            raise UserError(f"cannot reach the Ray cluster at {args.ray_address} ({e.strerror or e}); start one "
                            f"with 'ray start --head --port {port}', or drop --ray-address for a local one") from None


def cmd_search(args) -> int:
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
    _check_ray_flags(args, device)
    if Path(args.out).suffix.lower() == ".json":  # the summary goes to <stem>.json: it would replace the model
        raise UserError(f"--out {args.out} ends in .json, the name of the search's summary beside the model; "
                        f"give a .pt path such as {Path(args.out).with_suffix('.pt')}")
    _check_writable(args.out)
    _check_storage(args.storage)
    named = args.dataset + (f"-{args.image_size}px" if args.image_size else "")  # another size: another study
    study_name = args.study_name or default_study_name(named, args.max_params, args.hours)
    _check_not_someone_elses(args.out, study_name, args.storage)
    teacher = None if args.teacher == "none" else args.teacher
    if teacher not in (None, "auto"):  # a wrong teacher is refused now, not after the search
        from budgetnet.data import dataset_info
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
        warm_start=not args.no_warm_start, precision=args.precision, teacher=teacher, workers=args.workers,
        backend=args.backend, ray_address=args.ray_address, gpus_per_trial=args.gpus_per_trial,
        ray_scheduler=args.ray_scheduler or "median", compile=args.compile,
    )
    if opts.backend == "ray" and opts.device.startswith("cuda") and opts.gpus_per_trial == 0:
        raise UserError("--gpus-per-trial 0 on CUDA: a Ray trial without a GPU share sees no GPU; give a share "
                        "above 0, or leave the flag out (1/--workers)")
    mode = "json" if args.json else "quiet" if args.quiet else "text"
    summary = run_search(opts, Reporter(mode), started=STARTED)
    if summary.get("error"):
        print(f"budgetnet: nothing trained: {summary['error']}", file=sys.stderr)
    return 0 if summary["checkpoint"] or summary["interrupted"] else 1


def cmd_train(args) -> int:
    from budgetnet.budget import check_memory, check_params, count_flops
    from budgetnet.checkpoint import save_checkpoint
    from budgetnet.config import ConfigError, RunConfig, is_folder
    from budgetnet.data import dataset_info, load_data
    from budgetnet.train import COMPLETE, EVAL_SUBSET, compile_note, train_run

    if (args.seconds is None) == (args.epochs is None):
        raise UserError("give exactly one of --seconds S or --epochs E")
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
    if args.dataset is not None or args.image_size is not None:  # the flags override the config's data
        dataset = args.dataset or cfg.data.dataset
        size = args.image_size or (cfg.data.image_size if is_folder(dataset) else None)  # a folder's kept
        try:
            cfg = cfg.replace(data=dataclasses.replace(cfg.data, dataset=dataset, image_size=size))
        except ConfigError as e:
            raise UserError(f"--dataset/--image-size: {e}") from None
    _check_writable(args.out)
    shape = dataset_info(cfg.data.dataset, cfg.data.image_size).shape  # a folder is scanned (and cached) here
    if args.max_params:
        check_params(cfg.model, shape, args.max_params)
    device = _device(args.device)
    n_params = check_memory(cfg.model, cfg.train, shape, device)  # before the data and the model are loaded
    data = load_data(cfg.data, args.data_dir, device, merge_val=args.full, download=args.download)

    def hook(progress: float, m: dict) -> bool:
        acc = f"  val acc {m['val_acc']:.4f}" if "val_acc" in m else ""
        acc += f"  fit acc {m['fit_acc']:.4f} (training images)" if "fit_acc" in m else ""
        print(f"{progress:>4.0%}  epoch {m['epoch']:.1f}  train loss {m['train_loss']:.4f}{acc}  "
              f"{m['images_per_s']:,.0f} images/s", flush=True)
        return False

    result = train_run(cfg, data, device=device, seconds=args.seconds, epochs=args.epochs, hook=hook,
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


def cmd_evaluate(args) -> int:
    from budgetnet.evaluate import evaluate_checkpoint, format_report, save_evaluation

    if args.plots is not None and Path(args.plots).exists() and not Path(args.plots).is_dir():
        raise UserError(f"--plots {args.plots} is a file; give a folder for confusion.png and predictions.png")
    report = evaluate_checkpoint(args.checkpoint, args.data_dir, _device(args.device), plots=args.plots,
                                 download=args.download, precision=args.precision, dataset=args.dataset)
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
            print(f"best trial {best['trial']}: {best['family'] or 'family not recorded'}, {params} params, "
                  f"val acc {best['val_acc']:.4f}")
        print(f"wrote {summary['files']['index']} (open it in a browser; it needs no network) and "
              f"{summary['files']['csv']}")
    return 0


def cmd_datasets(args) -> int:
    """List the built-in datasets and where each is looked for, or describe one (a folder: its classes,
    counts per split, image size and cache state). Reads only: nothing is decoded or written."""
    from budgetnet.config import DATASETS, FOLDER_IMAGE_SIZE, is_folder
    from budgetnet.data import DATASET_INFO, builtin_found, builtin_locations

    if args.dataset is not None and is_folder(args.dataset):
        from budgetnet.folder import describe

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
                                  seconds=args.seconds, data_dir=args.data_dir, device=_device(args.device),
                                  precision=args.precision, download=args.download,
                                  log=(lambda line: None) if args.json else print)
    except PruneError as e:
        raise UserError(str(e)) from None
    print(json.dumps(report, indent=2) if args.json else format_prune_report(report))
    return 0


def cmd_dashboard(args) -> int:
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    from budgetnet.report.study import study_names
    from budgetnet.search.storage import make_storage

    # read only, as report: a storage with no study (or no Optuna tables) is refused, not created or written
    if not study_names(args.storage):
        raise UserError(f"--storage {args.storage} holds no study")
    Path(args.artifact_dir).mkdir(parents=True, exist_ok=True)
    print(f"optuna-dashboard on http://{args.host}:{args.port}/  (Ctrl-C stops it)", flush=True)
    optuna_dashboard.run_server(make_storage(args.storage), host=args.host, port=args.port,
                                artifact_store=FileSystemArtifactStore(args.artifact_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # Nothing here imports torch (seconds): --help and a flag's mistake answer at once.
    from budgetnet.config import (
        COMPILE_AUTO_MIN_S,
        COMPILE_MODES,
        COMPILE_ON_MIN_S,
        DATASETS,
        FOLDER_IMAGE_SIZE,
        PRECISIONS,
    )
    from budgetnet.search.clock import (
        AUTO_SEARCH_MAX,
        AUTO_SEARCH_MIN,
        MIN_SLICE_S,
        MIN_TRIALS,
        STAGNANT_TRIALS,
        TRIALS_PER_SEARCH,
    )

    p = _Parser(prog="budgetnet", description="Find the best small CNN a parameter cap and a time budget buy.")
    p.add_argument("--version", action="version", version=f"budgetnet {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def compile_flag(sp, what=""):
        sp.add_argument("--compile", nargs="?", const="on", choices=COMPILE_MODES, default="auto",
                        help=f"train {what}through torch.compile. auto (default): only a run on a GPU with at "
                        f"least {COMPILE_AUTO_MIN_S:.0f} s of training left tries it, after timing its eager steps, and "
                        "keeps the compiled model only if its steps then time faster; on (or --compile alone): "
                        f"every run by epochs, and every run of at least {COMPILE_ON_MIN_S:.0f} s (a compilation "
                        "cannot be stopped); off: never. Compiling is paid out of the run's time")

    def data_flags(sp):
        sp.add_argument("--data-dir", default=None, help="folder holding the dataset in torchvision's layout "
                        "(default ./data; Fashion-MNIST also looks in /usr/share/datasets/fashion-mnist)")
        sp.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                        help="fetch a missing CIFAR/Fashion-MNIST into --data-dir through torchvision (off by "
                        "default: budgetnet makes no network access unless asked; a missing dataset is one "
                        "line naming the expected path)")
        sp.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
        sp.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto (default) decides on this machine: on a GPU its low precision (bf16 from compute "
                        "capability 8.0, fp16 with loss scaling on 7.x), and on a CPU bf16 where it is native, each "
                        "only where a training step measured there runs at least 1.15x faster than fp32 (on an H100 "
                        "small nets did not: fp32); fp32, bf16 or fp16 force one")

    s = sub.add_parser("search", help="search architectures and schedules under a parameter and time budget")
    s.add_argument("--max-params", type=parse_count, default=1e6, help="parameter cap, e.g. 1e6, 1M, 250k")
    s.add_argument("--hours", type=hours, default=1.0,
                   help="wall-clock budget for the whole command (search + final training)")
    s.add_argument("--dataset", type=dataset_name, default="cifar100",
                   help=f"{', '.join(DATASETS)} (fashion-mnist, FashionMNIST and the like are accepted), or "
                   f"folder:PATH: class folders of images (PATH/train/<class>/ + PATH/test/<class>/, or "
                   f"PATH/<class>/)")
    s.add_argument("--image-size", type=image_size, default=None,
                   help=f"folder:PATH datasets: the side images are resized to, in pixels (default "
                   f"{FOLDER_IMAGE_SIZE}; e.g. 64 or 96)")
    data_flags(s)
    s.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL, or a journal file (*.log)")
    s.add_argument("--study-name", default=None, help="default: from the dataset and the caps")
    s.add_argument("--out", default="best.pt", help="where the best model goes (best.json beside it)")
    s.add_argument("--seed", type=sampler_seed, default=0, help="the sampler's seed (worker k uses seed + k)")
    s.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
    s.add_argument("--sampler", choices=("tpe", "random", "grid"), default="tpe")
    s.add_argument("--grid", default=None, help='grid file for --sampler grid: {"base": {...}, "grid": {...}}')
    s.add_argument("--final-fraction", type=final_share, default="auto", metavar="F|auto",
                   help="share of the budget for training the best config on train+validation. auto (default): "
                   f"the search ends once past {AUTO_SEARCH_MIN:.0%}% of the budget when {STAGNANT_TRIALS} "
                   "judged trials in a row (complete, or pruned below the median) have not beaten the best "
                   f"(at {AUTO_SEARCH_MAX:.0%}% at the latest), and the final phase gets the rest. F: a fixed share (e.g. 0.35); 0 = no final "
                   "phase, best.pt is the best search trial's model")
    s.add_argument("--trial-seconds", type=positive_float, default=None,
                   help=f"time slice of one trial (default: search time / {TRIALS_PER_SEARCH}, at least "
                   f"{MIN_SLICE_S:g} s, shorter only where {MIN_TRIALS} such slices would not fit)")
    s.add_argument("--workers", type=worker_count, default=1,
                   help="local worker processes searching the study at once (default 1); each gets 1/N of the "
                   "CPU threads or of the GPU's memory, and one of them alone runs the final phase")
    s.add_argument("--backend", choices=("optuna", "ray"), default="optuna",
                   help="optuna (default): trials in this process (and --workers); ray: a Ray Tune experiment on "
                   "a local Ray or --ray-address, --workers trials at once, same study, guard and budget")
    s.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="--backend ray: join this running cluster (ray start --head); default: start a local "
                   "Ray on 127.0.0.1. On several machines, --out must be on storage they all share")
    s.add_argument("--gpus-per-trial", type=lambda t: _number(t, lambda v: 0 <= v <= 1, "between 0 and 1"),
                   default=None, metavar="F",
                   help="--backend ray: the share of a GPU each trial gets (and its memory fraction; default "
                   "1/--workers on CUDA, 0 on a CPU)")
    s.add_argument("--ray-scheduler", choices=("median", "asha"), default=None,
                   help="--backend ray: stop weak trials with Ray's median stopping rule (default) or ASHA, "
                   "on the shared progress axis (a report per 10%% of a slice, judged from 30%%)")
    s.add_argument("--artifact-dir", default=DEFAULT_ARTIFACTS)
    s.add_argument("--no-warm-start", action="store_true", help="do not queue the built-in first trial")
    s.add_argument("--teacher", default="none", metavar="auto|none|PATH",
                   help="knowledge distillation in the final phase: the final model also learns from a teacher's "
                   "outputs. PATH: a checkpoint of the same dataset, any size. auto: a larger net trained on "
                   "train+validation in the final phase's own time, only where the search's measured speed says "
                   "teacher and student both fit (docs/search.md). Every teacher pass is paid out of the budget "
                   "(default: none)")
    compile_flag(s, "trials and the final phase ")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--quiet", action="store_true", help="print only the final summary (and warnings, on standard error)")
    out.add_argument("--json", action="store_true", help="print JSON lines (one per trial, then a summary)")
    s.set_defaults(fn=cmd_search)

    t = sub.add_parser("train", help="train one config (JSON) for a time slice or a number of epochs")
    t.add_argument("--config", required=True, help="RunConfig JSON file")
    t.add_argument("--seconds", type=positive_float, default=None, help="time slice (the schedule follows it)")
    t.add_argument("--epochs", type=positive_float, default=None)
    t.add_argument("--out", default="model.pt")
    t.add_argument("--full", action="store_true", help="train on train+validation (no validation metrics)")
    t.add_argument("--max-params", type=parse_count, default=None, help="refuse a config over this cap")
    compile_flag(t)
    t.add_argument("--dataset", type=dataset_name, default=None,
                   help="train on this dataset instead of the config's (e.g. folder:PATH)")
    t.add_argument("--image-size", type=image_size, default=None,
                   help=f"folder:PATH datasets: the side images are resized to (default {FOLDER_IMAGE_SIZE})")
    data_flags(t)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="test-set accuracy, cost, latency and confusions of a checkpoint")
    e.add_argument("checkpoint")
    data_flags(e)
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--plots", default=None, help="write confusion.png (with per-class accuracy bars) and "
                   "predictions.png (a grid of test images, mistakes in red) into this folder")
    e.add_argument("--dataset", type=dataset_name, default=None,
                   help="a model trained on folder:PATH: read the test images from this folder:PATH instead")
    e.set_defaults(fn=cmd_evaluate)

    r = sub.add_parser("report", help="a study's trials table, plots and summary, in one offline HTML page")
    r.add_argument("--storage", default=DEFAULT_STORAGE, help="the study's storage URL or journal file")
    r.add_argument("--study-name", default=None, help="default: the storage's only study")
    r.add_argument("--out", default=None, help="folder for index.html, trials.csv, summary.json and one HTML "
                   "file per plot (default report/; with --csv - or --json, none unless given)")
    r.add_argument("--checkpoint", default=None, help="the study's model, shown with its test accuracy if "
                   "'budgetnet evaluate' saved one (default: best.pt, if it is this study's)")
    r.add_argument("--csv", default=None, metavar="FILE", help="also write the trials table here; '-' prints "
                   "it on stdout")
    r.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    r.set_defaults(fn=cmd_report)

    ds = sub.add_parser("datasets", help="list the built-in datasets and where each is looked for, or "
                        "describe one (folder:PATH: classes, counts per split, image size, cache state)")
    ds.add_argument("dataset", nargs="?", type=dataset_name, default=None)
    ds.add_argument("--image-size", type=image_size, default=None,
                    help=f"folder:PATH: the cache size to report on (default {FOLDER_IMAGE_SIZE})")
    ds.add_argument("--data-dir", default=None, help="where the built-in datasets are looked for (default ./data)")
    ds.add_argument("--json", action="store_true")
    ds.set_defaults(fn=cmd_datasets)

    pr = sub.add_parser("prune", help="L1-norm filter pruning of a checkpoint, then fine-tuning for --seconds")
    pr.add_argument("checkpoint")
    amount = pr.add_mutually_exclusive_group(required=True)
    amount.add_argument("--amount", type=lambda t: _number(t, lambda v: 0 < v < 1, "between 0 and 1, both excluded"),
                        help="share of each prunable layer's filters to remove, smallest L1 norm first (e.g. 0.3)")
    amount.add_argument("--max-params", type=parse_count, default=None,
                        help="remove the smallest share of filters that brings the model within this many "
                        "parameters")
    pr.add_argument("--seconds", type=lambda t: _number(t, lambda v: v >= 0, "a number >= 0"), default=60.0,
                   help="fine-tuning time with the time-aware schedule, at a tenth of the checkpoint's lr "
                   "(default 60; 0 = none)")
    pr.add_argument("--out", required=True, help="where the pruned checkpoint goes (never the input)")
    data_flags(pr)
    pr.add_argument("--json", action="store_true", help="print the numbers as JSON")
    pr.set_defaults(fn=cmd_prune)

    d = sub.add_parser("dashboard", help="serve optuna-dashboard for the study storage")
    d.add_argument("--storage", default=DEFAULT_STORAGE)
    d.add_argument("--artifact-dir", default=DEFAULT_ARTIFACTS)
    d.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    d.add_argument("--port", type=port_number, default=8080, help="TCP port (default 8080)")
    d.set_defaults(fn=cmd_dashboard)
    return p


def _user_mistakes() -> tuple[type[Exception], ...]:
    """The errors that are the user's to fix, reported in one line. Imported when one is raised, not
    before: their modules import torch, which a parse error or --help need not wait for."""
    from budgetnet.budget import BudgetExceeded
    from budgetnet.checkpoint import CheckpointError
    from budgetnet.config import ConfigError
    from budgetnet.data import DatasetNotFound

    return ConfigError, DatasetNotFound, CheckpointError, BudgetExceeded


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from budgetnet.train import tune_cpu_allocator

        tune_cpu_allocator()
        return args.fn(args)
    except Exception as e:
        if isinstance(e, UserError) or isinstance(e, _user_mistakes()):  # a UserError imports nothing
            print(f"budgetnet: error: {e}", file=sys.stderr)
            return 2
        if not isinstance(e, OSError):
            raise
        # the machine's to fix, not a bug: a read-only --out, a busy port, a full disk
        where = f": {e.filename}" if e.filename else ""
        print(f"budgetnet: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("budgetnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
