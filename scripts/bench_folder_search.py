"""Benchmark: a search on a folder of real images (``--dataset folder:PATH``) against the built-in loader.

Writes both official splits of Fashion-MNIST as PNG class folders (``ROOT/{train,test}/<class>/*.png``,
60,000 + 10,000 files, once; "/" in a class name becomes "_"), builds the folder's cache at 28 px (its
native size, untimed), checks that the cached pixels equal the idx files', then runs the same
``budgetnet search`` (same budget, seed and cap) on ``folder:ROOT`` and on ``fashion_mnist``, one after
the other, and evaluates each ``best.pt`` on its own test split (the same 10,000 images). The baseline of
the comparison is the built-in loader's search in the same run. Prints a Markdown table for
``docs/benchmarks.md``.

    python scripts/bench_folder_search.py [--minutes 5] [--seed 0] [--root /tmp/fmnist-png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_search import search_and_evaluate  # noqa: E402 - the scripts folder is not a package


def write_pngs(root: Path, data_dir: str | None) -> tuple[int, float]:
    """Both Fashion-MNIST splits as PNG class folders under ``root`` (skipped when every file is there).
    Returns the number of files and the seconds spent writing them."""
    from PIL import Image

    from budgetnet.datasets.read import read_split

    splits = {name: read_split("fashion_mnist", data_dir, train=(name == "train")) for name in ("train", "test")}
    n = sum(len(labels) for _, labels, _ in splits.values())
    if len(list(root.glob("*/*/*.png"))) == n:
        return n, 0.0
    t0 = time.perf_counter()
    for name, (images, labels, classes) in splits.items():
        for c in classes:
            (root / name / c.replace("/", "_")).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(images, labels)):
            Image.fromarray(img[0]).save(root / name / classes[label].replace("/", "_") / f"{i:05d}.png")
    return n, time.perf_counter() - t0


def check_cache(root: Path, data_dir: str | None) -> dict:
    """Build the folder's cache at 28 px and compare it with the idx files, image for image (the folder
    lists images by class, so both sides are sorted by (label, pixels) first)."""
    from budgetnet.datasets.read import read_split

    t0 = time.perf_counter()
    dataset = f"folder:{root}"
    out = {"cache_s": None}
    for train in (True, False):
        f_img, f_lab, f_cls = read_split(dataset, None, train=train, image_size=28)
        if out["cache_s"] is None:
            out["cache_s"] = round(time.perf_counter() - t0, 1)
        b_img, b_lab, b_cls = read_split("fashion_mnist", data_dir, train=train)
        # The folder's class order is its sorted folder names; map them back to the built-in label ids.
        to_builtin = np.array([[c.replace("/", "_") for c in b_cls].index(c) for c in f_cls])
        f_lab = to_builtin[f_lab]

        def canonical(img, lab):
            flat = img.reshape(len(img), -1)
            order = np.lexsort((*flat.T[::-1], lab))
            return flat[order], lab[order]

        fi, fl = canonical(f_img, f_lab)
        bi, bl = canonical(b_img, b_lab)
        out["train_equal" if train else "test_equal"] = bool(np.array_equal(fi, bi) and np.array_equal(fl, bl))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget of each search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default="/tmp/fmnist-png", help="where the PNG folders are written")
    p.add_argument("--max-params", default="1e6")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="where Fashion-MNIST's idx files are (default: budgetnet's "
                                                   "search order, Debian's folder too)")
    p.add_argument("--out-dir", default=None, help="where databases, checkpoints and logs go")
    args = p.parse_args()

    root = Path(args.root)
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_folder_search_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    n, write_s = write_pngs(root, args.data_dir)
    check = check_cache(root, args.data_dir)
    print(json.dumps({"pngs": n, "write_s": round(write_s, 1), **check}), flush=True)

    budget_s = args.minutes * 60
    rows = []
    for label, dataset, extra in (("folder: PNGs", f"folder:{root}", ["--image-size", "28"]),
                                  ("built-in fashion_mnist", "fashion_mnist", [])):
        tag = "folder" if dataset.startswith("folder:") else "builtin"
        ckpt = out_dir / f"{tag}.pt"
        run_args = argparse.Namespace(device=args.device, data_dir=None if tag == "folder" else args.data_dir)
        run = search_and_evaluate(
            ["--dataset", dataset, *extra, "--max-params", args.max_params, "--hours", f"{budget_s / 3600:.6f}",
             "--storage", f"sqlite:///{out_dir / (tag + '.db')}", "--artifact-dir", str(out_dir / "artifacts"),
             "--out", str(ckpt), "--seed", str(args.seed), "--json"],
            tag, ckpt, run_args, out_dir, dict(os.environ, PYTHONUNBUFFERED="1"))
        s = run["summary"]
        row = {"dataset": label, "rc": run["rc"], "wall_s": round(run["wall_s"], 1),
               "overshoot_s": round(max(0.0, run["wall_s"] - budget_s), 1), "trials": s.get("trials"),
               "best_trial": s.get("best_trial"), "best_val_acc": s.get("best_val_acc"),
               "family": s.get("family"), "n_params": s.get("n_params"),
               "test_acc": run.get("test_acc"), "test_top5": run.get("test_top5"), "test_flip": run.get("test_flip")}
        print(json.dumps(row), flush=True)
        rows.append(row)
    (out_dir / "results.json").write_text(json.dumps({"args": vars(args), "check": check, "rows": rows}, indent=2))

    def pct(v):
        return f"{v:.2%}" if v is not None else "-"

    print(f"\n{n} PNGs; cache built in {check['cache_s']} s; cached pixels equal the idx files': "
          f"train {check['train_equal']}, test {check['test_equal']}\n")
    def trials(t):
        return f"{t['complete']} / {t['pruned']} / {t['rejected']}" if t else "-"

    print("| dataset | trials (complete / pruned / rejected) | best trial (val acc) | family, params | test top-1 | flip-averaged | "
          "vs built-in | overshoot |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows[-1].get("test_acc")
    for r in rows:
        diff = (f"{(r['test_acc'] - base) * 100:+.2f} points" if r.get("test_acc") is not None and base is not None
                else "-")
        print(f"| {r['dataset']} | {trials(r['trials'])} | {r['best_trial']} ({pct(r['best_val_acc'])}) | "
              f"{r['family']}, {r['n_params']} | **{pct(r['test_acc'])}** | {pct(r['test_flip'])} | {diff} | "
              f"{r['overshoot_s']} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
