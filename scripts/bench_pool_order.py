"""Benchmark: a whole ``train_run`` of the warm start, its blocks pooling before their ReLU (budgetnet's
order since 2026-11-23) against ReLU before the pool (the order before), on real Fashion-MNIST.

``bench_precision.py --only fp32-act-first`` times the training step alone on random data; this times
what a run pays (the device-resident pipeline, flips, dropout, the optimizer, the evaluations): the
warm-start config as a search at ``--max-params`` sizes it, trained for ``--epochs`` on train+validation,
the two orders interleaved over ``--repeats`` rounds after one untimed run. Both orders compute the same
function, so both runs of a round end with the same fit (printed). The ratio in the same run is the
number to read.

    python scripts/bench_pool_order.py [--epochs 1.5] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from budgetnet.config import EVAL_SUBSET, DataConfig  # noqa: E402
from budgetnet.data import load_data  # noqa: E402
from budgetnet.models import plain  # noqa: E402
from budgetnet.search.space import suggest_config, warm_start  # noqa: E402
from budgetnet.train import train_run  # noqa: E402


@contextmanager
def act_first(on: bool = True):
    """Within it, plain nets are built in the order before 2026-11-23: each activation before its max pool."""
    kept = plain.MONOTONE
    plain.MONOTONE = () if on else kept
    try:
        yield
    finally:
        plain.MONOTONE = kept


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--max-params", type=float, default=1e6)
    ap.add_argument("--dataset", default="fashion_mnist", help="any built-in dataset (synthetic for a smoke run)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dc = DataConfig(dataset=args.dataset)
    data = load_data(dc, args.data_dir, "cpu", merge_val=True)
    shape = data.info.shape
    cfg = suggest_config(optuna.trial.FixedTrial(warm_start(shape, args.max_params, dc)), shape, args.max_params, dc)
    orders = {"pool, then ReLU": False, "ReLU, then pool": True}
    rates: dict[str, list[float]] = {name: [] for name in orders}
    print(f"{args.dataset}, {args.threads} threads, {args.epochs:g} epochs a run; the warm start: {cfg.model}")
    for round_ in range(args.repeats + 1):  # round 0 is untimed: the process's one-off set-up
        for name, old in orders.items():
            with act_first(old):
                res = train_run(cfg, data, device="cpu", epochs=args.epochs, fit_images=EVAL_SUBSET)
            if round_:
                rates[name].append(res.images_per_s)
            print(f"round {round_}: {name}: {res.images_per_s:,.0f} img/s, {res.seconds:.1f} s, "
                  f"fit {res.metrics.get('fit_acc')}", flush=True)
    new, old = (statistics.median(rates[name]) for name in orders)
    print(f"\n| order | images/s (median of {args.repeats}) | vs ReLU first |\n|---|---:|---:|")
    print(f"| pool, then ReLU | {new:,.0f} | {new / old:.3f}x |\n| ReLU, then pool | {old:,.0f} | 1.000x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
