"""Benchmark: how reliably the warm start learns, and what its lr costs, by lr and seed.

The warm-start config as a search at ``--max-params`` sizes it (``search.space.warm_start``), with its
lr (``sgd_lr_128``, at batch 128) replaced by each of ``--lrs``, trained for ``--epochs`` on the training
split, seeds 0 to ``--seeds``-1; its validation accuracy at the end, and how many runs ended under
``--failed`` (default 0.5). Epochs, not seconds, so the machine's load changes only
the wall time. Every lr is compared with the others in the same run.

    python scripts/bench_warm_start.py --dataset synthetic --max-params 1e6 --epochs 4 --seeds 8
    python scripts/bench_warm_start.py --dataset fashion_mnist --max-params 1e6 --epochs 6 --seeds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from budgetnet.config import DataConfig  # noqa: E402
from budgetnet.data import load_data  # noqa: E402
from budgetnet.search.space import suggest_config, warm_start  # noqa: E402
from budgetnet.train import train_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--max-params", type=float, default=1e6)
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--lrs", default="0.09,0.05", help="comma-separated sgd_lr_128 values")
    ap.add_argument("--failed", type=float, default=0.5)
    args = ap.parse_args(argv)

    spec = DataConfig(dataset=args.dataset)
    data = load_data(spec, args.data_dir, device="cpu")
    params = warm_start(data.info.shape, args.max_params, spec)
    print(f"{args.dataset}, cap {args.max_params:,.0f}, hidden {params['plain_hidden']}, {args.epochs:g} epochs, "
          f"seeds 0-{args.seeds - 1}")
    print(f"\n| lr (batch 128) | width | val acc by seed | mean | min | under {100 * args.failed:g}% |\n|---:|---:|---|---:|---:|---:|")
    for lr in (float(x) for x in args.lrs.split(",")):
        cfg = suggest_config(optuna.trial.FixedTrial({**params, "sgd_lr_128": lr}), data.info.shape,
                             args.max_params, spec)
        accs = [train_run(dataclasses.replace(cfg, seed=seed), data, device="cpu", epochs=args.epochs)
                .metrics["val_acc"] for seed in range(args.seeds)]
        print(f"| {lr:g} | {cfg.model.width} | {' / '.join(f'{100 * a:.1f}' for a in accs)} | "
              f"{100 * statistics.mean(accs):.2f}% | {100 * min(accs):.1f}% | "
              f"{sum(a < args.failed for a in accs)} of {len(accs)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
