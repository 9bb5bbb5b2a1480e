"""Benchmark: starting from a model one has (``train --init``, ``search --init``) against from scratch, at equal
wall-clock budget, on Debian's Fashion-MNIST.

Writes PNG class folders once (``ROOT/source``: classes 0-4, every training and test image; ``ROOT/target-N``:
classes 5-9, N training images per class drawn with a fixed seed, and every test image of those classes).
The source model is a ``budgetnet search`` on ``folder:ROOT/source`` (``--source-seconds``; reused when its
checkpoint is already in ``--out-dir``). Then, for each N and seed, each method gets ``--seconds`` of wall
clock on ``folder:ROOT/target-N``:

  scratch        budgetnet search (from scratch: architecture and schedule)
  none, head,    budgetnet train --init source.pt --freeze STRATEGY --seconds S (the checkpoint's recipe at a
  last:1,        tenth of its lr; the training time is S, the data loading comes on top)
  gradual
  search-init    budgetnet search --init source.pt (the strategy and schedule searched)

Each run is a ``budgetnet`` command called in this process (its budget counts from its call, as a fresh
process's from its start, without the interpreter's start-up). Validation accuracy: the search's best trial,
or the held-out split of the run for ``train --init``; test accuracy: ``budgetnet evaluate`` on the target's
full test split (1,000 images per class). Prints a Markdown table of mean +- standard deviation over the
seeds, and writes results.json.

    python scripts/bench_transfer.py [--seconds 120] [--seeds 0 1 2] [--per-class 50 500] [--source-seconds 600]
    python scripts/bench_transfer.py --smoke --data-dir DIR   # every step at toy sizes (tests/test_scripts.py)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SOURCE_CLASSES, TARGET_CLASSES = range(0, 5), range(5, 10)
STRATEGIES = ("none", "head", "last:1", "gradual")
METHODS = ("scratch", *STRATEGIES, "search-init")
SMOKE_SOURCE = {"model": {"family": "plain", "n_conv": 2, "width": 8, "hidden": [32]},
                "train": {"batch_size": 32, "lr": 0.05}, "data": {"dataset": "synthetic"}}


def write_folders(root: Path, data_dir: str | None, per_class: list[int], limit: int = 0) -> dict[str, Path]:
    """The source and target PNG folders under ``root`` (each written once; ``limit``: at most this many
    source and test images per class, for the smoke run)."""
    from PIL import Image

    from budgetnet.datasets.read import read_split

    splits = {s: read_split("fashion_mnist", data_dir, train=(s == "train")) for s in ("train", "test")}
    classes = [c.replace("/", "_") for c in splits["train"][2]]
    plan = {"source": {"train": (SOURCE_CLASSES, limit), "test": (SOURCE_CLASSES, limit)},
            **{f"target-{n}": {"train": (TARGET_CLASSES, n), "test": (TARGET_CLASSES, limit)} for n in per_class}}
    for name, parts in plan.items():
        done = root / f".{name}.done"
        if done.exists():
            continue
        for split, (keep, most) in parts.items():
            images, labels, _ = splits[split]
            for c in keep:
                idx = np.flatnonzero(labels == c)
                if most:  # a fixed draw per class: every seed and method sees the same images
                    idx = np.sort(np.random.default_rng(c).choice(idx, min(most, len(idx)), replace=False))
                folder = root / name / split / classes[c]
                folder.mkdir(parents=True, exist_ok=True)
                for i in idx:
                    Image.fromarray(images[i][0]).save(folder / f"{i:05d}.png")
        done.touch()
    return {name: root / name for name in plan}


def budgetnet(argv: list[str], log: Path) -> tuple[int, float]:
    """``budgetnet ARGV`` in this process, its output to ``log``; (exit code, wall seconds)."""
    import budgetnet.cli as cli

    cli.STARTED = t0 = time.perf_counter()  # a search's budget counts from here
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = cli.main(argv)
    log.write_text(" ".join(argv) + "\n" + out.getvalue())
    return rc, time.perf_counter() - t0


def scores(ckpt: Path, val_from: Path | None) -> dict:
    """Validation accuracy (a search's best trial from its best.json, else the checkpoint's own) and test
    top-1 on the checkpoint's full test split; None where the run wrote no model."""
    from budgetnet.checkpoint import load_checkpoint
    from budgetnet.evaluate import evaluate_checkpoint

    if not ckpt.exists():
        return {"val": None, "test": None}
    if val_from is not None:
        val = json.loads(val_from.read_text()).get("best_val_acc") if val_from.exists() else None
    else:
        val = load_checkpoint(ckpt)["metrics"].get("val_acc")
    return {"val": val, "test": evaluate_checkpoint(ckpt, device="cpu", latency_repeats=1)["top1"]}


def run_method(method: str, target: Path, source: Path, seed: int, args, out: Path) -> dict:
    tag = f"{method.replace(':', '')}-{target.name}-s{seed}"
    ckpt = out / f"{tag}.pt"
    common = ["--seed", str(seed), "--out", str(ckpt), "--device", args.device]
    searching = ["--max-params", args.max_params, "--hours", f"{args.seconds / 3600:.6f}",
                 "--storage", f"sqlite:///{out / (tag + '.db')}", "--artifact-dir", str(out / "artifacts"),
                 "--quiet", *(["--trial-seconds", str(args.trial_seconds)] if args.trial_seconds else [])]
    if method == "scratch":
        argv = ["search", "--dataset", f"folder:{target}", "--image-size", "28", *searching, *common]
    elif method == "search-init":
        argv = ["search", "--init", str(source), "--dataset", f"folder:{target}", *searching, *common]
    else:
        argv = ["train", "--init", str(source), "--dataset", f"folder:{target}", "--freeze", method,
                "--seconds", str(args.seconds), *common]
    rc, wall = budgetnet(argv, out / f"{tag}.log")
    row = {"method": method, "target": target.name, "seed": seed, "rc": rc, "wall_s": round(wall, 1),
           **scores(ckpt, ckpt.with_suffix(".json") if argv[0] == "search" else None)}
    print(json.dumps(row), flush=True)
    return row


def source_model(folders: dict, args, out: Path) -> Path:
    """The model of classes 0-4: searched (or, in the smoke run, one small config trained)."""
    ckpt = out / "source.pt"
    if ckpt.exists():
        return ckpt
    data = ["--dataset", f"folder:{folders['source']}", "--image-size", "28", "--out", str(ckpt), "--device",
            args.device]
    if args.smoke:
        (out / "source-config.json").write_text(json.dumps(SMOKE_SOURCE))
        argv = ["train", "--config", str(out / "source-config.json"), "--epochs", "2", *data]
    else:
        argv = ["search", "--max-params", args.max_params, "--hours", f"{args.source_seconds / 3600:.6f}",
                "--storage", f"sqlite:///{out / 'source.db'}", "--artifact-dir", str(out / "artifacts"),
                "--quiet", *data]
    rc, wall = budgetnet(argv, out / "source.log")
    if rc != 0 or not ckpt.exists():
        raise SystemExit(f"the source model failed (exit {rc}); see {out / 'source.log'}")
    found = scores(ckpt, None if args.smoke else ckpt.with_suffix(".json"))  # a search's: its best.json
    print(json.dumps({"source": str(ckpt), "wall_s": round(wall, 1), **found}), flush=True)
    return ckpt


def table(rows: list[dict], per_class: list[int]) -> str:
    def cell(method: str, n: int, key: str) -> str:
        values = [r[key] for r in rows if r["method"] == method and r["target"] == f"target-{n}"
                  and r[key] is not None]
        missing = sum(1 for r in rows if r["method"] == method and r["target"] == f"target-{n}") - len(values)
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2%} ± {sd * 100:.2f}" + (f" ({missing} failed)" if missing else "")

    head = "| method | " + " | ".join(f"{n}/class val | {n}/class test" for n in per_class) + " |"
    lines = [head, "|---|" + "---|---|" * len(per_class)]
    names = {"scratch": "from scratch (`search`)", "search-init": "`search --init`"}
    for m in METHODS:
        label = names.get(m, f"`train --init --freeze {m}`")
        lines.append(f"| {label} | " + " | ".join(f"{cell(m, n, 'val')} | {cell(m, n, 'test')}"
                                                  for n in per_class) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=120.0, help="wall-clock budget of every method's run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--per-class", type=int, nargs="+", default=[50, 500], help="training images per target class")
    p.add_argument("--source-seconds", type=float, default=600.0, help="the source search's budget")
    p.add_argument("--max-params", default="1e6")
    p.add_argument("--trial-seconds", type=float, default=None, help="searches' slice (default: budgetnet's)")
    p.add_argument("--root", default="/tmp/fmnist-transfer", help="where the PNG folders are written")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST's idx files (default: budgetnet's search "
                   "order, Debian's /usr/share/datasets/fashion-mnist too)")
    p.add_argument("--out-dir", default=None, help="checkpoints, studies, logs, results.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true", help="toy sizes: one seed, 5 images per class, 8 s runs (1 s slices), "
                   "at most 20 source and test images per class, a trained (not searched) source")
    args = p.parse_args(argv)
    limit = 0
    if args.smoke:
        args.seeds, args.per_class, limit = args.seeds[:1], [5], 20
        args.seconds, args.trial_seconds = min(args.seconds, 8.0), args.trial_seconds or 1.0
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_transfer_"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folders = write_folders(Path(args.root), args.data_dir, args.per_class, limit)
    source = source_model(folders, args, out)
    rows = [run_method(m, folders[f"target-{n}"], source, seed, args, out)
            for seed in args.seeds for n in args.per_class for m in METHODS]
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\n{len(args.seeds)} seed(s), {args.seconds:g} s per run, source {source}; "
          f"{time.perf_counter() - t0:.0f} s in all\n")
    print(table(rows, args.per_class))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
