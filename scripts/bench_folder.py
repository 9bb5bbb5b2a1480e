"""Benchmark: decode and cache an image folder (``--dataset folder:PATH``), then load the cache.

Writes ``--n`` JPEGs (default 10,000; photo-like: smooth colour fields plus noise, 160 to 480 px a side,
10 class folders, the train/test layout with 20% in test) once under ``--root``, then measures on this
machine:

* building the cache at ``--size`` px (default 32): scan, decode in one process per core (``Image.draft`` +
  ``ImageOps.fit``),
  per-channel statistics and the atomic write, i.e. what the first run of a search pays;
* the same decode in this process alone, over a subset, as the baseline of the ratio;
* loading the cache (``load_data`` of the training split plus ``load_test``, onto the CPU), i.e. what every
  later run pays.

Prints a Markdown block for ``docs/benchmarks.md``.

    python scripts/bench_folder.py [--n 10000] [--size 32] [--root /tmp/bench-folder]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



def write_jpegs(root: Path, n: int, seed: int = 0) -> None:
    """``n`` JPEGs under root/{train,test}/class{k}/ (skipped when already there)."""
    from PIL import Image

    if len(list(root.glob("*/*/*.jpg"))) == n:
        return
    rng = np.random.default_rng(seed)
    for i in range(n):
        split = "test" if (i // 10) % 5 == 0 else "train"  # 20% of each class
        d = root / split / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(160, 481, 2))
        field = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)  # a smooth colour field, upsampled
        img = np.asarray(Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--root", default="/tmp/bench-folder")
    p.add_argument("--baseline-n", type=int, default=1000, help="images decoded in this process for the ratio")
    args = p.parse_args()
    # Imported here, not at the top: the decoding processes start from a fork server, which imports this
    # script as their main module, and should not pay torch's import (as under `budgetnet`, whose entry
    # point imports nothing heavy).
    from budgetnet.config import DataConfig
    from budgetnet.data import load_data, load_test
    from budgetnet.datasets import folder

    root = Path(args.root).absolute()
    name = f"folder:{root}"

    t = time.perf_counter()
    write_jpegs(root, args.n)
    write_s = time.perf_counter() - t
    for c in root.glob(".budgetnet-cache-*"):
        c.unlink()

    t = time.perf_counter()
    scanned = folder.scan(root)
    scan_s = time.perf_counter() - t
    t = time.perf_counter()
    path = folder.build_cache(scanned, args.size)
    build_s = time.perf_counter() - t

    subset = [str(root / rel) for rel, _ in scanned.files["train"][: args.baseline_n]]
    t = time.perf_counter()
    folder.decode_images(subset, args.size, workers=1)
    one_process = len(subset) / (time.perf_counter() - t)

    t = time.perf_counter()
    data = load_data(DataConfig(dataset=name, image_size=args.size), merge_val=True)
    test, _ = load_test(name, image_size=args.size)
    load_s = time.perf_counter() - t
    n = len(data.train) + len(test)
    assert n == args.n, (n, args.n)

    rate = n / (scan_s + build_s)
    print("### Image folder cache (`scripts/bench_folder.py`)\n")
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}; command: `python scripts/bench_folder.py --n {args.n} --size {args.size}`")
    print(f"- data: {n:,} JPEGs, 160-480 px a side, 10 classes (written in {write_s:.0f} s, not timed below)\n")
    print("| step | time | rate |")
    print("|---|---|---|")
    print(f"| scan (file list, sizes, mtimes) | {scan_s:.2f} s | |")
    print(f"| decode + resize to {args.size} px + stats + atomic write, {folder.DECODE_WORKERS} processes "
          f"| {build_s:.2f} s | {rate:,.0f} images/s (scan included) |")
    print(f"| baseline: the same decode in this process alone ({len(subset):,} images) | | {one_process:,.0f} "
          f"images/s (the build: {rate / one_process:.2f}x) |")
    print(f"| load the cache (train + test onto the CPU) | {load_s:.2f} s | |")
    print(f"\ncache file: {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
