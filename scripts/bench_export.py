"""The export table of a checkpoint, as Markdown: file size, test top-1, agreement with PyTorch and CPU
latency at batch 1 and 256 of the PyTorch model (eager), its fp32 ONNX graph and its int8 one in
onnxruntime (and, with --torchscript, its TorchScript).

    python scripts/bench_export.py runs/fmnist10_best.pt --images 0 --threads 1 [--torchscript]
    python scripts/bench_export.py --smoke        # a tiny untrained synthetic-task net, in seconds

Every number is what ``budgetnet export --int8 --json`` reports (``export.export_checkpoint``): top-1 on
--images seeded test images (0: the whole test split), latency the median of calls on seeded random pixels,
the models taking turns for --rounds rounds of --seconds each, PyTorch and onnxruntime on --threads threads.
The exported files go to --out-dir.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from budgetnet.budget import count_flops, count_params
from budgetnet.checkpoint import load_checkpoint, save_checkpoint
from budgetnet.config import DataConfig, PlainConfig, RunConfig
from budgetnet.datasets.info import DATASET_INFO
from budgetnet.export import export_checkpoint
from budgetnet.models import build_model


def tiny_checkpoint(folder: Path) -> Path:
    """An untrained, seeded plain net on the synthetic task: what --smoke exports."""
    cfg = RunConfig(model=PlainConfig(n_conv=2, width=8, hidden=(64,)), data=DataConfig(dataset="synthetic"))
    shape = DATASET_INFO["synthetic"].shape
    torch.manual_seed(0)
    model = build_model(cfg.model, shape)
    return save_checkpoint(folder / "tiny.pt", cfg, model.state_dict(), metrics={},
                           n_params=count_params(cfg.model, shape), flops=count_flops(cfg.model, shape),
                           classes=[f"class{i}" for i in range(10)], train_seconds=0.0, precision="fp32")


def _row(name: str, file: str, size: int, m: dict, base: dict) -> str:
    top1 = "-" if m["top1"] is None else f"{m['top1']:.2%}"
    agree = f"{m['agreement']:.2%}" if "agreement" in m else "-"
    diff = f"{m['max_abs_diff']:.2g}" if "max_abs_diff" in m else "-"
    ms = " | ".join(f"{m['latency_ms'][b]:.3f} ({m['latency_ms'][b] / base['latency_ms'][b]:.2f}x)"
                    for b in ("1", "256"))
    return f"| {name} | `{file}` | {size / 1e6:.3f} | {top1} | {agree} | {diff} | {ms} |"


def table(checkpoint: Path, onnx: dict, ts: dict | None) -> str:
    ckpt = load_checkpoint(checkpoint)
    check = onnx["check"]
    q = onnx["int8"]
    lines = [f"**`{checkpoint}`**: {ckpt['run_config'].model.family}, {ckpt['n_params']:,} params, "
             f"{ckpt['flops'] / 1e6:.2f} MFLOPs/image; checked on {check['images']:,} {check['source']} images; "
             f"latency: median ms on {onnx['threads']} thread(s), {onnx['runtime']} (ratio: to PyTorch eager)", "",
             "| model | file | size MB | top-1 | top-1 agreement with PyTorch | largest logit difference "
             "| ms, batch 1 | ms, batch 256 |", "|---|---|---:|---:|---:|---:|---:|---:|",
             _row("PyTorch eager", checkpoint.name, checkpoint.stat().st_size, onnx["eager"], onnx["eager"]),
             _row("ONNX fp32, onnxruntime", "(fp32 graph)", onnx["fp32"]["size_bytes"], onnx["fp32"], onnx["eager"]),
             _row(f"ONNX int8 (QDQ, for {q['target']}), onnxruntime", Path(onnx["out"]).name, q["size_bytes"], q,
                  onnx["eager"])]
    if ts is not None:  # its own run: its ratios are to the eager latency measured beside it
        lines.append(_row("TorchScript (frozen), torch.jit", Path(ts["out"]).name, ts["fp32"]["size_bytes"],
                          ts["fp32"], ts["eager"]))
    lines += ["", f"int8: calibrated on {q['calibration_images']} training images; its top-1 answers agree with "
              f"the fp32 graph's on {q['agreement_fp32']:.2%}"
              + (f", top-1 {q['top1_drop']:+.2%} lost" if "top1_drop" in q else "")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", default=None, help="a budgetnet checkpoint (best.pt)")
    p.add_argument("--smoke", action="store_true", help="export a tiny untrained net on the synthetic task")
    p.add_argument("--images", type=int, default=0, help="test images checked (default 0: all)")
    p.add_argument("--calibration-images", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="PyTorch's and onnxruntime's threads (default 1)")
    p.add_argument("--rounds", type=int, default=5, help="turns each model takes at each batch size")
    p.add_argument("--seconds", type=float, default=1.0, help="length of one turn")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out-dir", default=None, help="where the exported files go (default: a temporary folder)")
    p.add_argument("--torchscript", action="store_true", help="also a TorchScript row")
    args = p.parse_args(argv)
    if (args.checkpoint is None) != args.smoke:
        p.error("give a checkpoint, or --smoke")
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        out = Path(args.out_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = tiny_checkpoint(Path(tmp)) if args.smoke else Path(args.checkpoint)
        common = {"images": 64 if args.smoke else args.images, "data_dir": args.data_dir, "threads": args.threads,
                  "latency_rounds": 1 if args.smoke else args.rounds,
                  "latency_seconds": 0.0 if args.smoke else args.seconds,
                  "log": lambda line: print(line, file=sys.stderr)}
        onnx = export_checkpoint(checkpoint, out / f"{checkpoint.stem}.int8.onnx", int8=True,
                                 calibration_images=32 if args.smoke else args.calibration_images,
                                 int8_max_drop=1.0, **common)  # measured and shown here, not gated
        ts = (export_checkpoint(checkpoint, out / f"{checkpoint.stem}.ts.pt", fmt="torchscript", **common)
              if args.torchscript else None)
        print(table(checkpoint, onnx, ts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
