"""What ``budgetnet prune`` buys on Fashion-MNIST: params, FLOPs, CPU latency at batch 1 and test top-1
before pruning, after pruning and after fine-tuning, for a search's best model and the reference net.

    python scripts/bench_prune.py [--search-model runs/fmnist10_best.pt] [--amount 0.3] [--seconds 60]
                                  [--keep-reference]

The reference net is the one the reference report pruned: conv 3x3x8 -> conv 3x3x32 -> fc 50 -> fc 10
(2x2 max pool after each conv, no BN), trained here with ``budgetnet train --epochs 20``. Every step runs
the real command line; the numbers are what ``budgetnet prune --json`` reports, and the baseline of each
ratio is the same model before pruning, measured in the same run. Prints a Markdown table.

``prune`` runs with ``--threads`` OpenMP threads (default 1). On a shared 2-core machine two threads made
the unpruned reference net's batch-1 forward 70-94 ms in some rounds against 0.22 ms in others (a thread
waiting for a busy core at every op), while its pruned copy, whose ops stay below PyTorch's threshold for
going parallel, kept 0.25 ms: the ratio would measure the load, not the pruning.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from budgetnet.config import DataConfig, PlainConfig, RunConfig

REFERENCE = RunConfig(
    model=PlainConfig(n_conv=2, width=8, conv_widths=(8, 32), hidden=(50,), batch_norm=False),
    data=DataConfig(dataset="fashion_mnist", crop_padding=0),
)


def budgetnet(*args: str, threads: str | None = None) -> str:
    """Run ``budgetnet ARGS`` in a subprocess and return its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": threads} if threads else None
    done = subprocess.run([sys.executable, "-m", "budgetnet", *args], stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode:
        sys.exit(f"budgetnet {' '.join(args)} failed with exit code {done.returncode}")
    return done.stdout


def table(name: str, r: dict) -> str:
    base = r["before"]
    rows = [f"**{name}**, `{r['checkpoint']}`, amount {r['amount']:g}, fine-tuned "
            f"{r.get('finetune_seconds', 0):.0f} s, latency at batch 1 on {r['device']} in {r['precision']}", "",
            "| stage | params | MFLOPs/image | latency ms | test top-1 |", "|---|---:|---:|---:|---:|"]
    for key, label in (("before", "before"), ("pruned", "pruned"), ("finetuned", "pruned + fine-tuned")):
        m = r[key]
        rows.append(f"| {label} | {m['params']:,} ({m['params'] / base['params']:.2f}x) | {m['flops'] / 1e6:.3f} "
                    f"({m['flops'] / base['flops']:.2f}x) | {m['latency_ms']:.3f} "
                    f"({m['latency_ms'] / base['latency_ms']:.2f}x) | {m['top1']:.2%} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--search-model", default="runs/fmnist10_best.pt", help="best.pt of a Fashion-MNIST search")
    p.add_argument("--out-dir", default="runs/prune")
    p.add_argument("--amount", default="0.3")
    p.add_argument("--seconds", default="60")
    p.add_argument("--epochs", default="20", help="training epochs of the reference net")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", default="1", help="OpenMP threads of the prune commands (see the docstring)")
    p.add_argument("--keep-reference", action="store_true",
                   help="use the reference net an earlier run left in --out-dir instead of training it again")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (args.keep_reference and (out / "reference.pt").exists()):
        (out / "reference.json").write_text(REFERENCE.to_json())
        budgetnet("train", "--config", str(out / "reference.json"), "--epochs", args.epochs, "--out",
                  str(out / "reference.pt"), "--device", args.device)
    sections = []
    for name, model in (("search's best model", args.search_model), ("reference net", str(out / "reference.pt"))):
        pruned = out / f"{Path(model).stem}_pruned.pt"
        report = json.loads(budgetnet("prune", model, "--amount", args.amount, "--seconds", args.seconds, "--out",
                                      str(pruned), "--device", args.device, "--json", threads=args.threads))
        (out / f"{Path(model).stem}_prune.json").write_text(json.dumps(report, indent=2))
        sections.append(table(name, report))
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
