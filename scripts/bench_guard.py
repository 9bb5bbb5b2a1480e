"""How long the budget guard takes: parameter check, FLOP count, and a rejected search trial.

    python scripts/bench_guard.py [--samples 100]

Each parameter check starts from a cold cache (``budget.clear_caches()``), so the numbers are what a
new config costs. The target is under 50 ms for a parameter check and under 100 ms for a whole rejected
trial (sampling the config included). The baseline in the same run is building the same model for real on
the CPU, which is what a guard without the meta device would have to do.
"""

from __future__ import annotations

import argparse
import statistics
import time

import optuna
import torch

from budgetnet.budget import BudgetExceeded, check_params, clear_caches, count_flops, count_params
from budgetnet.config import DataConfig, MobileNetConfig, PlainConfig, ResNetConfig
from budgetnet.datasets.info import DATASET_INFO
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=100, help="configs sampled from the search space")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    check_params(ResNetConfig(), SHAPE, 1e9)  # warm imports

    print("\n| config | params | param check (median ms) | FLOP count (median ms) | real CPU build (ms) |")
    print("|---|---:|---:|---:|---:|")
    for name, cfg in CONFIGS.items():
        pc = statistics.median(timed(lambda c=cfg: check_params(c, SHAPE, 1e12), args.repeats))
        fc = statistics.median(timed(lambda c=cfg: count_flops(c, SHAPE), 3))
        real = statistics.median(timed(lambda c=cfg: build_model(c, SHAPE), 3))
        print(f"| {name} | {count_params(cfg, SHAPE):,} | {pc * 1e3:.1f} | {fc * 1e3:.1f} | {real * 1e3:.1f} |")

    # Configs the search itself proposes (random sampling over the whole space at a 1M cap), and what a
    # rejection costs: sample + guard, with the space's width bound already cached as it is mid-search.
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    checks, rejections = [], []
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
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    print(f"\nsearch-space configs ({args.samples}, random sampler, 1M cap): param check median "
          f"{statistics.median(checks) * 1e3:.1f} ms, max {max(checks) * 1e3:.1f} ms")
    print(f"a rejected trial (sample + guard): median {statistics.median(rejections) * 1e3:.1f} ms,"
          f" max {max(rejections) * 1e3:.1f} ms; width-bound cache {max_width.cache_info().currsize} entries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
