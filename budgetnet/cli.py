"""``budgetnet`` command line: thin flag parsing over library functions.

A user mistake prints one line (``budgetnet: error: ...``) and exits with code 2, never a traceback.
Only this module resolves ``--device auto``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

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


def positive_float(text: str) -> float:
    return _number(text, lambda v: v > 0, "a positive number")


def positive_int(text: str) -> int:
    value = _number(text, lambda v: v >= 1 and v == int(v), "a whole number of at least 1")
    return int(value)


def fraction(text: str) -> float:
    return _number(text, lambda v: 0 <= v < 1, "between 0 and 1 (1 excluded)")


def dataset_name(text: str) -> str:
    """The dataset as users type it: fashion_mnist, fashion-mnist, FashionMNIST, CIFAR-100, ..."""
    from budgetnet.config import DATASETS

    key = re.sub(r"[-_\s]", "", text.lower())
    for name in DATASETS:
        if name.replace("_", "") == key:
            return name
    raise argparse.ArgumentTypeError(f"unknown dataset {text!r} (choose from {', '.join(DATASETS)})")


def _device(name: str):
    import torch

    from budgetnet.device import resolve_device

    try:
        device = resolve_device(name)
    except RuntimeError as e:
        raise UserError(f"bad --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available (use --device cpu)")
    return device


def _check_writable(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--out {path} is a directory; give a file path such as {p / 'best.pt'}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p.parent, prefix=".budgetnet-write-test"):
            pass
    except OSError as e:
        raise UserError(f"cannot write --out {path}: {e.strerror or e}") from None


def _check_not_someone_elses(out: str, study_name: str) -> None:
    """Never overwrite a model that another study (or something else) left at --out."""
    from budgetnet.checkpoint import CheckpointError, load_checkpoint

    if not Path(out).exists():
        return
    try:
        owner = load_checkpoint(out)["extra"].get("study")
    except CheckpointError:
        raise UserError(f"--out {out} exists and is not a budgetnet checkpoint; move it or choose another "
                        f"--out") from None
    if owner != study_name:
        raise UserError(f"--out {out} holds the model of study {owner!r}, not {study_name!r}; move it or "
                        f"choose another --out")


def _check_storage(url: str) -> None:
    """Reject a malformed storage before anything is created."""
    if url.endswith((".log", ".jsonl")) and "://" not in url:
        _check_writable(url)
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"malformed --storage {url!r}: expected a database URL such as {DEFAULT_STORAGE} "
                        f"or a journal file ending in .log") from None
    if parsed.drivername.split("+")[0] not in ("sqlite", "postgresql", "mysql"):
        raise UserError(f"unsupported --storage {url!r}: use sqlite:///FILE, postgresql://..., mysql://... "
                        f"or a journal file ending in .log")
    if parsed.drivername == "sqlite" and parsed.database:
        _check_writable(parsed.database)


def cmd_search(args) -> int:
    from budgetnet.config import ConfigError
    from budgetnet.search.report import Reporter
    from budgetnet.search.runner import SearchOptions, default_study_name, run_search
    from budgetnet.search.space import load_grid

    if (args.sampler == "grid") != (args.grid is not None):
        raise UserError("--sampler grid and --grid FILE go together")
    grid = None
    if args.grid is not None:
        try:
            grid = load_grid(Path(args.grid).read_text())
        except OSError as e:
            raise UserError(f"cannot read --grid {args.grid}: {e.strerror}") from None
        except ConfigError as e:
            raise UserError(f"bad --grid {args.grid}: {e}") from None
    _check_writable(args.out)
    _check_storage(args.storage)
    study_name = args.study_name or default_study_name(args.dataset, args.max_params, args.hours)
    _check_not_someone_elses(args.out, study_name)
    opts = SearchOptions(
        max_params=args.max_params, budget_seconds=args.hours * 3600, dataset=args.dataset,
        data_dir=args.data_dir, storage=args.storage, study_name=study_name, out=args.out,
        seed=args.seed, pruner=args.pruner, sampler=args.sampler, grid=grid,
        final_fraction=args.final_fraction, trial_seconds=args.trial_seconds,
        device=str(_device(args.device)), artifact_dir=args.artifact_dir, download=args.download,
        warm_start=not args.no_warm_start, precision=args.precision, workers=args.workers,
    )
    mode = "json" if args.json else "quiet" if args.quiet else "text"
    summary = run_search(opts, Reporter(mode), started=STARTED)
    if summary.get("error"):
        print(f"budgetnet: nothing trained: {summary['error']}", file=sys.stderr)
    return 0 if summary["checkpoint"] or summary["interrupted"] else 1


def cmd_train(args) -> int:
    from budgetnet.budget import check_memory, check_params, count_flops
    from budgetnet.checkpoint import save_checkpoint
    from budgetnet.config import ConfigError, RunConfig
    from budgetnet.data import DATASET_INFO, load_data
    from budgetnet.train import COMPLETE, train_run

    if (args.seconds is None) == (args.epochs is None):
        raise UserError("give exactly one of --seconds S or --epochs E")
    try:
        cfg = RunConfig.from_json(Path(args.config).read_text())
    except OSError as e:
        raise UserError(f"cannot read --config {args.config}: {e.strerror}") from None
    except ConfigError as e:
        raise UserError(f"bad --config {args.config}: {e}") from None
    _check_writable(args.out)
    shape = DATASET_INFO[cfg.data.dataset].shape
    if args.max_params:
        check_params(cfg.model, shape, args.max_params)
    device = _device(args.device)
    n_params = check_memory(cfg.model, cfg.train, shape, device)  # before the data and the model are loaded
    data = load_data(cfg.data, args.data_dir, device, merge_val=args.full, download=args.download)

    def hook(progress: float, m: dict) -> bool:
        acc = f"  val acc {m['val_acc']:.4f}" if "val_acc" in m else ""
        print(f"{progress:>4.0%}  epoch {m['epoch']:.1f}  train loss {m['train_loss']:.4f}{acc}  "
              f"{m['images_per_s']:,.0f} images/s", flush=True)
        return False

    result = train_run(cfg, data, device=device, seconds=args.seconds, epochs=args.epochs, hook=hook,
                       precision=args.precision)
    if result.status != COMPLETE:
        print(f"budgetnet: training ended: {result.status} ({result.reason})", file=sys.stderr)
        return 1
    save_checkpoint(args.out, cfg, result.state_dict, metrics=result.metrics, n_params=n_params,
                    flops=count_flops(cfg.model, shape), classes=data.classes, train_seconds=result.seconds,
                    precision=result.precision, extra={"phase": "train"})
    print(f"wrote {args.out} ({n_params:,} params, {result.seconds:.1f} s in {result.precision}); "
          f"evaluate with: budgetnet evaluate {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from budgetnet.evaluate import evaluate_checkpoint, format_report

    report = evaluate_checkpoint(args.checkpoint, args.data_dir, _device(args.device), plots=args.plots,
                                 download=args.download, precision=args.precision)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_dashboard(args) -> int:
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    _check_storage(args.storage)
    from budgetnet.search.runner import make_storage

    Path(args.artifact_dir).mkdir(parents=True, exist_ok=True)
    print(f"optuna-dashboard on http://{args.host}:{args.port}/  (Ctrl-C stops it)", flush=True)
    optuna_dashboard.run_server(make_storage(args.storage), host=args.host, port=args.port,
                                artifact_store=FileSystemArtifactStore(args.artifact_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from budgetnet.config import DATASETS
    from budgetnet.device import PRECISIONS
    from budgetnet.search.clock import MIN_SLICE_S, MIN_TRIALS, TRIALS_PER_SEARCH

    p = _Parser(prog="budgetnet", description="Find the best small CNN a parameter cap and a time budget buy.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def data_flags(sp):
        sp.add_argument("--data-dir", default=None, help="folder holding the dataset in torchvision's layout "
                        "(default ./data; Fashion-MNIST also looks in /usr/share/datasets/fashion-mnist)")
        sp.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                        help="fetch a missing CIFAR/Fashion-MNIST into --data-dir when a network is reachable "
                        "(default; offline it fails fast with the expected path); --no-download never tries")
        sp.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
        sp.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto (default) decides on this machine: bf16 on GPUs from compute capability 8.0, "
                        "fp16 with loss scaling on 7.x, and on a CPU bf16 only where it is native and measured "
                        "faster than fp32; fp32, bf16 or fp16 force one")

    s = sub.add_parser("search", help="search architectures and schedules under a parameter and time budget")
    s.add_argument("--max-params", type=parse_count, default=1e6, help="parameter cap, e.g. 1e6, 1M, 250k")
    s.add_argument("--hours", type=positive_float, default=1.0,
                   help="wall-clock budget for the whole command (search + final training)")
    s.add_argument("--dataset", type=dataset_name, default="cifar100",
                   help=f"{', '.join(DATASETS)} (fashion-mnist, FashionMNIST and the like are accepted)")
    data_flags(s)
    s.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL, or a journal file (*.log)")
    s.add_argument("--study-name", default=None, help="default: from the dataset and the caps")
    s.add_argument("--out", default="best.pt", help="where the best model goes (best.json beside it)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
    s.add_argument("--sampler", choices=("tpe", "random", "grid"), default="tpe")
    s.add_argument("--grid", default=None, help='grid file for --sampler grid: {"base": {...}, "grid": {...}}')
    s.add_argument("--final-fraction", type=fraction, default=0.35,
                   help="share of the budget for training the best config on train+validation (default 0.35; "
                   "0 = no final phase, best.pt is the best search trial's model)")
    s.add_argument("--trial-seconds", type=positive_float, default=None,
                   help=f"time slice of one trial (default: search time / {TRIALS_PER_SEARCH}, at least "
                   f"{MIN_SLICE_S:g} s, shorter only where {MIN_TRIALS} such slices would not fit)")
    s.add_argument("--workers", type=positive_int, default=1,
                   help="local worker processes searching the study at once (default 1); each gets 1/N of the "
                   "CPU threads or of the GPU's memory, and one of them alone runs the final phase")
    s.add_argument("--artifact-dir", default=DEFAULT_ARTIFACTS)
    s.add_argument("--no-warm-start", action="store_true", help="do not queue the built-in first trial")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--quiet", action="store_true", help="print only the final summary")
    out.add_argument("--json", action="store_true", help="print JSON lines (one per trial, then a summary)")
    s.set_defaults(fn=cmd_search)

    t = sub.add_parser("train", help="train one config (JSON) for a time slice or a number of epochs")
    t.add_argument("--config", required=True, help="RunConfig JSON file")
    t.add_argument("--seconds", type=positive_float, default=None, help="time slice (the schedule follows it)")
    t.add_argument("--epochs", type=positive_float, default=None)
    t.add_argument("--out", default="model.pt")
    t.add_argument("--full", action="store_true", help="train on train+validation (no validation metrics)")
    t.add_argument("--max-params", type=parse_count, default=None, help="refuse a config over this cap")
    data_flags(t)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="test-set accuracy, cost, latency and confusions of a checkpoint")
    e.add_argument("checkpoint")
    data_flags(e)
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--plots", default=None, help="write confusion.png into this folder")
    e.set_defaults(fn=cmd_evaluate)

    d = sub.add_parser("dashboard", help="serve optuna-dashboard for the study storage")
    d.add_argument("--storage", default=DEFAULT_STORAGE)
    d.add_argument("--artifact-dir", default=DEFAULT_ARTIFACTS)
    d.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    d.add_argument("--port", type=int, default=8080)
    d.set_defaults(fn=cmd_dashboard)
    return p


def main(argv: list[str] | None = None) -> int:
    from budgetnet.budget import BudgetExceeded
    from budgetnet.checkpoint import CheckpointError
    from budgetnet.config import ConfigError
    from budgetnet.data import DatasetNotFound
    from budgetnet.train import tune_cpu_allocator

    try:
        args = build_parser().parse_args(argv)
        tune_cpu_allocator()
        return args.fn(args)
    except (UserError, ConfigError, DatasetNotFound, CheckpointError, BudgetExceeded) as e:
        print(f"budgetnet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("budgetnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
