"""How long the budget guard takes: parameter check, FLOP count (the --max-flops check), the latency
guard, and a rejected search trial.

    python scripts/bench_guard.py [--samples 100] [--smoke]

Each parameter check and FLOP count starts from a cold cache (``budget.clear_caches()``), so the numbers
are what a new config costs. The target is under 50 ms for a parameter check or a MAC check and under
100 ms for a whole rejected trial (sampling the config included). The baseline in the same run is
building the same model for real on the CPU, which is what a guard without the meta device would have to
do. The latency guard (``--max-latency-ms``) builds the model for real and times batch-1 forwards on one
thread: about a second by design, its time and figure per config. ``--smoke``: two configs, a few samples.
"""

from __future__ import annotations

import argparse
import statistics
import time

import optuna
import torch

from budgetnet.budget import (
    BudgetExceeded,
    check_flops,
    check_params,
    clear_caches,
    count_flops,
    count_params,
)
from budgetnet.config import DataConfig, MobileNetConfig, PlainConfig, ResNetConfig
from budgetnet.datasets.info import DATASET_INFO
from budgetnet.latency import config_latency
from budgetnet.models import build_model
from budgetnet.search.space import max_width, suggest_config

SHAPE = DATASET_INFO["cifar100"].shape
CONFIGS = {
    "ResNet-20": ResNetConfig(),
    "ResNet-56": ResNetConfig(depths=(9, 9, 9)),
    "ResNet bottleneck 3x3": ResNetConfig(block="bottleneck", depths=(3, 3, 3)),
    "ResNet 18x3 blocks, widths 12/24/48": ResNetConfig(depths=(18, 18, 18), widths=(12, 24, 48)),
    "ResNet 30x3 blocks, widths 8/16/32": ResNetConfig(depths=(30, 30, 30), widths=(8, 16, 32), stem_width=8),
    "ResNet-1202 (200x3 blocks, 16/32/64)": ResNetConfig(depths=(200, 200, 200)),
    "plain (course net)": PlainConfig(),
    "plain, 48 convs (3 blocks of 16, width 16)": PlainConfig(n_conv=48, convs_per_block=16, width=16,
                                                              width_pattern="equal", hidden=()),
    "MobileNetV2-style": MobileNetConfig(),
}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        clear_caches()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=100, help="configs sampled from the search space")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--smoke", action="store_true", help="two configs, three samples, one repeat (a test runs it)")
    args = p.parse_args(argv)
    configs = dict(list(CONFIGS.items())[:2]) if args.smoke else CONFIGS
    if args.smoke:
        args.samples, args.repeats = 3, 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    check_params(ResNetConfig(), SHAPE, 1e9)  # warm imports

    print("\n| config | params | MACs | param check (median ms) | MAC check (median ms) | real CPU build (ms) | "
          "latency guard: batch-1 ms, 1 thread (its seconds) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, cfg in configs.items():
        pc = statistics.median(timed(lambda c=cfg: check_params(c, SHAPE, 1e12), args.repeats))
        fc = statistics.median(timed(lambda c=cfg: check_flops(c, SHAPE, 1e15), 3))
        real = statistics.median(timed(lambda c=cfg: build_model(c, SHAPE), 3))
        lat = config_latency(cfg, SHAPE, "cpu", 1)
        print(f"| {name} | {count_params(cfg, SHAPE):,} | {count_flops(cfg, SHAPE) // 2:,} | {pc * 1e3:.1f} | "
              f"{fc * 1e3:.1f} | {real * 1e3:.1f} | {lat['latency_ms']:.2f} ({lat['seconds']:.2f} s) |")

    # Configs the search itself proposes (random sampling over the whole space at a 1M cap), and what a
    # rejection costs: sample + guard, with the space's width bound already cached as it is mid-search.
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    checks, mac_checks, rejections = [], [], []
    for _ in range(args.samples):
        trial = study.ask()
        t = time.perf_counter()
        cfg = suggest_config(trial, SHAPE, 1e6, DataConfig())
        try:  # a rejected trial: the same path with a cap of 1 parameter, which nothing fits
            check_params(cfg.model, SHAPE, 1)
        except BudgetExceeded:
            pass
        rejections.append(time.perf_counter() - t)
        checks += timed(lambda c=cfg.model: check_params(c, SHAPE, 1e6), 1)
        mac_checks += timed(lambda c=cfg.model: (check_params(c, SHAPE, 1e6), check_flops(c, SHAPE, 1e15)), 1)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    print(f"\nsearch-space configs ({args.samples}, random sampler, 1M cap): param check median "
          f"{statistics.median(checks) * 1e3:.1f} ms, max {max(checks) * 1e3:.1f} ms; param + MAC check (cold) "
          f"median {statistics.median(mac_checks) * 1e3:.1f} ms, max {max(mac_checks) * 1e3:.1f} ms")
    print(f"a rejected trial (sample + guard): median {statistics.median(rejections) * 1e3:.1f} ms,"
          f" max {max(rejections) * 1e3:.1f} ms; width-bound cache {max_width.cache_info().currsize} entries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
