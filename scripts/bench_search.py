"""Search quality at equal wall-clock budget on real Fashion-MNIST: the test accuracy each method's model reaches.

Methods (each a real ``budgetnet search`` process, then ``budgetnet evaluate`` on the official test split):
  budgetnet   TPE + median stopping + guard + final training (the defaults: --final-fraction auto)
  random      the same with random sampling
  no-pruning  TPE without median stopping
  fixed-share budgetnet with --final-fraction 0.35 (the default until 2026-11-23)
  final-auto  budgetnet with --final-fraction auto (the search ends when its best stagnates; the default)
  teacher     budgetnet with --teacher auto (a teacher in the final phase, where the device's speed fits one)
  all         both of them (EMA is in the space either way; flip averaging is reported for every run)
  grid        the reference report's 2-conv net grid (conv widths 8/16/32, kernels 3/5, hidden 50/100;
              SGD lr 0.01, momentum 0.9, no augmentation), the budget split evenly over its 12 points,
              the best by validation accuracy kept (no final phase, as the report did it by hand)

    python scripts/bench_search.py --minutes 10 --seeds 0 1 2 --parallel 2 --threads 1

Runs are queued seed-major so every method meets the same machine conditions; with --parallel 2 two runs
share the 2-core machine, one core each. Results: a JSON file and a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

GRID = {
    "base": {
        "model": {"family": "plain", "n_conv": 2, "convs_per_block": 1, "width_pattern": "equal",
                  "batch_norm": False, "conv_bias": True, "pool": "max", "activation": "relu"},
        "train": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 64,
                  "schedule": "step", "warmup": 0.0, "label_smoothing": 0.0},
        "data": {"crop_padding": 0, "flip": False, "cutout": 0},
    },
    "grid": {"model.width": [8, 16, 32], "model.kernel": [3, 5], "model.hidden": [[50], [100]]},
}
GRID_POINTS = 12
LEVERS = {"final-auto": ["--final-fraction", "auto"], "fixed-share": ["--final-fraction", "0.35"],
          "teacher": ["--teacher", "auto"],
          "all": ["--final-fraction", "auto", "--teacher", "auto"]}


def method_args(method: str, budget_s: float, grid_file: Path) -> list[str]:
    if method == "budgetnet":
        return ["--sampler", "tpe", "--pruner", "median"]
    if method in LEVERS:
        return ["--sampler", "tpe", "--pruner", "median", *LEVERS[method]]
    if method == "random":
        return ["--sampler", "random", "--pruner", "median"]
    if method == "no-pruning":
        return ["--sampler", "tpe", "--pruner", "none"]
    if method == "grid":
        # Every grid point gets an equal slice; 3% is kept for process start-up and data loading.
        return ["--sampler", "grid", "--grid", str(grid_file), "--pruner", "none", "--final-fraction", "0",
                "--trial-seconds", f"{budget_s * 0.97 / GRID_POINTS:.1f}"]
    raise ValueError(method)


def search_and_evaluate(search_args: list[str], tag: str, ckpt: Path, args, out_dir: Path, env: dict) -> dict:
    """One ``budgetnet search`` process (``search_args`` after ``search``; ``--data-dir`` and ``--device``
    added from ``args``), then ``budgetnet evaluate`` of ``ckpt``. Returns wall_s, rc, the summary event
    and, when the checkpoint evaluates, test_acc and test_top5. The output goes to OUT_DIR/TAG.log."""
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "budgetnet", "search", *search_args, "--device", args.device,
                           *data], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out_dir / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    out = {"wall_s": wall, "rc": proc.returncode, "events": lines,
           "summary": next((e for e in lines if e.get("event") == "summary"), {})}
    out.update(evaluate_checkpoint(ckpt, args, env))
    return out


def evaluate_checkpoint(ckpt: Path, args, env: dict) -> dict:
    """``budgetnet evaluate`` of ``ckpt`` on the test split: test_acc, test_top5 and test_flip, or nothing
    when there is no checkpoint or it does not evaluate."""
    if not ckpt.exists():
        return {}
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    ev = subprocess.run([sys.executable, "-m", "budgetnet", "evaluate", str(ckpt), "--json", "--device",
                         args.device, *data], env=env, capture_output=True, text=True)
    if ev.returncode != 0:
        return {}
    report = json.loads(ev.stdout)
    return {"test_acc": report["top1"], "test_top5": report["top5"], "test_flip": report.get("top1_flip"),
            "test_single": report.get("top1_single"), "tta": report.get("tta")}


def run_one(method: str, seed: int, args, out_dir: Path, grid_file: Path) -> dict:
    budget_s = args.minutes * 60
    tag = f"{method}-s{seed}"
    ckpt = out_dir / f"{tag}.pt"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1")
    run = search_and_evaluate(
        ["--dataset", "fashion_mnist", "--max-params", "1e6", "--hours", f"{budget_s / 3600:.6f}",
         "--storage", f"sqlite:///{out_dir / (tag + '.db')}", "--artifact-dir", str(out_dir / "artifacts"),
         "--out", str(ckpt), "--seed", str(seed), "--json", *method_args(method, budget_s, grid_file)],
        tag, ckpt, args, out_dir, env)
    summary = run["summary"]
    row = {"method": method, "seed": seed, "wall_s": round(run["wall_s"], 1), "budget_s": budget_s,
           "overshoot_s": round(max(0.0, run["wall_s"] - budget_s), 1), "trials": summary.get("trials"),
           "best_val_acc": summary.get("best_val_acc"), "family": summary.get("family"),
           "n_params": summary.get("n_params"), "rc": run["rc"]}
    row.update({k: run[k] for k in ("test_acc", "test_top5", "test_flip") if k in run})
    row["messages"] = [e["text"] for e in run["events"] if e.get("event") == "message" and "teacher" in e["text"]]
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["budgetnet", "random", "grid", "no-pruning"])
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)), help="torch threads per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="default: budgetnet's search order (Debian's folder too)")
    p.add_argument("--out-dir", default=None, help="where databases, checkpoints and logs go")
    p.add_argument("--json", default=None, help="results file (default: OUT_DIR/results.json)")
    args = p.parse_args()

    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_search_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_file = out_dir / "grid.json"
    grid_file.write_text(json.dumps(GRID))
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    print(f"{len(jobs)} runs of {args.minutes} min, {args.parallel} at a time, {args.threads} thread(s) each; "
          f"files in {out_dir}", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda job: run_one(*job, args, out_dir, grid_file), jobs))
    Path(args.json or out_dir / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))

    print("\n| method | test acc (mean) | per seed | spread | flip-averaged (mean) | best val acc | trials c/p/r/f "
          "| max overshoot |")
    print("|---|---|---|---|---|---|---|---|")
    for m in args.methods:
        rs = [r for r in rows if r["method"] == m]
        accs = [r.get("test_acc") for r in rs if r.get("test_acc") is not None]
        mean = f"{statistics.mean(accs):.2%}" if accs else "-"
        per = " / ".join(f"{r['test_acc']:.2%}" if r.get("test_acc") is not None else "-" for r in rs)
        vals = " / ".join(f"{r['best_val_acc']:.2%}" if r.get("best_val_acc") else "-" for r in rs)
        trials = " ; ".join("{complete}/{pruned}/{rejected}/{failed}".format(**r["trials"]) if r.get("trials")
                            else "-" for r in rs)
        spread = f"{(max(accs) - min(accs)) * 100:.2f} pts" if len(accs) > 1 else "-"
        flips = [r["test_flip"] for r in rs if r.get("test_flip") is not None]
        flip = f"{statistics.mean(flips):.2%}" if flips else "-"
        print(f"| {m} | {mean} | {per} | {spread} | {flip} | {vals} | {trials} | "
              f"{max(r['overshoot_s'] for r in rs):.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
