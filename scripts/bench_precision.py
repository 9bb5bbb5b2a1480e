"""Training throughput by precision on this machine, and what ``--precision auto`` picks here.

For a small ResNet (ResNet-20) and a plain net (the warm start's shape, without and with batch norm), it times budgetnet's own training step (``train_run``'s
pieces: ``build_model``, ``make_optimizer``, ``autocast``, channels_last, cross-entropy with label
smoothing) at batch 128 on CIFAR-shaped random data, in fp32 and in bf16 autocast (fp16 too with
``--fp16``), and in fp32 with the NCHW layout (``fp32-nchw``: budgetnet's channels_last choice against the
default layout), and for the plain nets in fp32 with each block's activation before its max pool
(``fp32-act-first``, budgetnet's order until 2026-11-23: the pool now runs first, on four times the values
the activation then sees), interleaved over ``--repeats`` rounds. ``--image 1,28`` times Fashion-MNIST's
shape (one channel, 28 px, 10 classes) instead of CIFAR-100's. A round times ``--steps`` steps after ``--warmup``
untimed ones. The ratio against fp32 in the same run is the number to read; the absolute rate means
something only on a GPU. glibc's allocator is tuned as the CLI tunes it (``tune_cpu_allocator``);
``--untuned-allocator`` leaves it alone, to compare the two in separate invocations (it is process-wide).

``--compile BACKEND`` times something else: eager against ``torch.compile(model, backend=BACKEND)``
(``inductor`` is torch's default; ``eager`` only traces, for a smoke run) in the precision ``auto`` picks,
for three configs of the space (ResNet-20, the warm start's plain net, a MobileNetV2-style net), and the
seconds the compiled model's warm-up steps took (compilation included): what a run pays before it is faster.

    .venv/bin/python scripts/bench_precision.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python scripts/bench_precision.py  # emulated AVX2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from budgetnet.config import MobileNetConfig, PlainConfig, ResNetConfig, Shape, TrainConfig  # noqa: E402
from budgetnet.device import (  # noqa: E402
    autocast,
    cpu_profile,
    grad_scaler,
    memory_format,
    optimizer_step,
    prepare,
    resolve_device,
    resolve_precision,
    synchronize,
    tune_cpu_allocator,
)
from budgetnet.models import build_model  # noqa: E402
from budgetnet.recipe import make_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pool_order import act_first as act_first_order  # noqa: E402, I001 - the scripts folder is not a package

MODELS = {
    "resnet20": ResNetConfig(),
    "plain": PlainConfig(n_conv=3, width=32, hidden=(256,), batch_norm=False),  # the warm start's shape
    "plain-bn": PlainConfig(n_conv=3, width=32, hidden=(256,), batch_norm=True),  # what BN costs it
    "mobilenet": MobileNetConfig(),
}
DEFAULT_MODELS = ["resnet20", "plain", "plain-bn"]
SHAPE = Shape(3, 100, 32)


def time_steps(cfg, precision: str, device: torch.device, batch: int, steps: int, warmup: int,
               backend: str | None = None, shape: Shape = SHAPE) -> tuple[float, float]:
    """Images per second of ``steps`` training steps after ``warmup`` untimed ones, and the seconds the
    warm-up took. ``fp32-nchw``: fp32 in the default (NCHW) layout instead of budgetnet's ``memory_format``;
    ``fp32-act-first``: fp32 with the activation before the pool.
    ``backend``: the steps run ``torch.compile(model, backend=backend)`` (compiled during the warm-up)."""
    torch.manual_seed(0)
    fmt = memory_format(device)
    if precision == "fp32-nchw":
        precision, fmt = "fp32", torch.contiguous_format
    act_first = precision == "fp32-act-first"
    precision = "fp32" if act_first else precision
    with act_first_order(act_first):
        model = build_model(cfg, shape).to(device, memory_format=fmt).train()
    tc = TrainConfig(batch_size=batch)
    opt, scaler = make_optimizer(model, tc), grad_scaler(device, precision)
    forward = torch.compile(model, backend=backend) if backend else model
    x = torch.randn(batch, shape.channels, shape.image_size, shape.image_size, device=device)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, shape.num_classes, (batch,), device=device)

    def step():
        with autocast(device, precision):
            loss = F.cross_entropy(forward(x), y, label_smoothing=tc.label_smoothing)
        optimizer_step(loss, opt, scaler)

    t = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - t), warmup_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--models", nargs="+", default=None, choices=list(MODELS),
                    help=f"default: {' '.join(DEFAULT_MODELS)} (with --compile: resnet20 plain mobilenet)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fp16", action="store_true", help="time fp16 autocast with a grad scaler too")
    ap.add_argument("--compile", default=None, metavar="BACKEND",
                    help="time eager against torch.compile with this backend (inductor, or eager for a smoke run)")
    ap.add_argument("--image", default="3,32", metavar="C,SIZE",
                    help="input channels and side in pixels: 3,32 (CIFAR-100, the default) or 1,28 (Fashion-MNIST)")
    ap.add_argument("--only", nargs="+", default=None, metavar="PRECISION",
                    help="time only these rows besides fp32 (bf16, fp16, fp32-nchw, fp32-act-first)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--untuned-allocator", action="store_true",
                    help="leave glibc's allocator as it is (the CLI raises its thresholds: tune_cpu_allocator)")
    args = ap.parse_args(argv)
    tuned = False if args.untuned_allocator else tune_cpu_allocator()  # as the budgetnet CLI does
    channels, size = (int(v) for v in args.image.split(","))
    shape = Shape(channels, 100 if channels == 3 else 10, size)
    args.models = args.models or (["resnet20", "plain", "mobilenet"] if args.compile else DEFAULT_MODELS)
    device = resolve_device(args.device)
    prepare(device)

    t = time.perf_counter()
    auto = resolve_precision(device, "auto")
    decide_ms = (time.perf_counter() - t) * 1e3
    profile = cpu_profile() if device.type == "cpu" else None
    env = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS") if k in os.environ}
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, env {env or '-'}, "
          f"glibc allocator tuned: {tuned}")
    if profile:
        print(f"auto picks {auto} (decided in {decide_ms:.0f} ms): native bf16 {profile.native_bf16}, "
              f"probe step fp32 {profile.fp32_ms:.1f} ms, bf16 "
              + (f"{profile.bf16_ms:.1f} ms" if profile.bf16_ms else "not timed (not native)"))
    else:
        print(f"auto picks {auto}")

    if args.compile:
        return compare_compiled(args, device, auto, env, shape)
    precisions = {m: ["fp32", "bf16"] + (["fp16"] if args.fp16 else []) + ["fp32-nchw"]
                  + (["fp32-act-first"] if m.startswith("plain") else []) for m in args.models}
    if args.only:
        precisions = {m: [p for p in ps if p == "fp32" or p in args.only] for m, ps in precisions.items()}
    rates: dict[str, dict[str, list[float]]] = {m: {p: [] for p in precisions[m]} for m in args.models}
    for _ in range(args.repeats):  # interleaved, so that drift on the host hits every precision alike
        for m in args.models:
            for p in precisions[m]:
                rates[m][p].append(time_steps(MODELS[m], p, device, args.batch_size, args.steps, args.warmup,
                                              shape=shape)[0])

    print()
    print(f"| model | precision | images/s (median of {args.repeats}) | vs fp32 |")
    print("|---|---|---:|---:|")
    table = []
    for m in args.models:
        base = statistics.median(rates[m]["fp32"])
        for p in precisions[m]:
            med = statistics.median(rates[m][p])
            table.append({"model": m, "precision": p, "images_per_s": med, "vs_fp32": med / base,
                          "rounds": rates[m][p]})
            print(f"| {m} | {p} | {med:,.0f} | {med / base:.2f}x |")
    write_json(args, device, env, auto, table, decide_ms=decide_ms, profile=profile.__dict__ if profile else None)
    return 0


def compare_compiled(args, device: torch.device, auto: str, env: dict, shape: Shape = SHAPE) -> int:
    """Eager against compiled training steps, in the ``auto`` precision, interleaved over the repeats."""
    rows = []
    for m in args.models:
        eager, compiled, compile_s = [], [], []
        for _ in range(args.repeats):
            eager.append(time_steps(MODELS[m], auto, device, args.batch_size, args.steps, args.warmup, shape=shape)[0])
            rate, warm = time_steps(MODELS[m], auto, device, args.batch_size, args.steps, args.warmup, args.compile,
                                    shape)
            compiled.append(rate)
            compile_s.append(warm)
        e, c = statistics.median(eager), statistics.median(compiled)
        rows.append({"model": m, "precision": auto, "backend": args.compile, "eager_images_per_s": e,
                     "compiled_images_per_s": c, "vs_eager": c / e, "compiled_warmup_s": statistics.median(compile_s)})
    print()
    print(f"| model | {auto} eager, images/s | compiled ({args.compile}), images/s | vs eager | "
          f"compiled warm-up ({args.warmup} steps), s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['eager_images_per_s']:,.0f} | {r['compiled_images_per_s']:,.0f} | "
              f"{r['vs_eager']:.2f}x | {r['compiled_warmup_s']:.1f} |")
    write_json(args, device, env, auto, rows)
    return 0


def write_json(args, device: torch.device, env: dict, auto: str, results: list[dict], **extra) -> None:
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
            "device": str(device), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "env": env, "allocator_tuned": not args.untuned_allocator,
            "auto": auto, **extra, "results": results}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
