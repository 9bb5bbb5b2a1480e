#!/usr/bin/env python
"""Benchmark budgetnet's device-resident data pipeline against a torchvision DataLoader pipeline.

One run, one process, one model and optimiser, three ways to feed one training epoch of CIFAR-shaped
data (3x32x32 uint8, 100 classes, random images fabricated in memory; no dataset needed):

  (a) device-resident: the uint8 split lives on the device; each batch is ``budgetnet.data.train_batches``
      (crop_padding=4, flip=True): translated, flipped rows selected by index from the split's augmentation
      store, normalised by ``budgetnet.data.normalizer`` (exactly what ``budgetnet.train`` does);
  (b) torchvision: a CIFAR-style Dataset of HWC uint8 numpy images -> ``PIL.Image.fromarray`` ->
      RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize, batched by a
      ``torch.utils.data.DataLoader`` with ``--workers`` worker processes (pin_memory on CUDA);
  (c) model only: the same training step on pre-made, pre-normalised batches already on the device.

Every pipeline ends in the same training step, written as in ``budgetnet.train._train`` and built from
budgetnet's own pieces (``build_model``, ``make_optimizer``, ``autocast``, ``memory_format``, ``lr_factor``,
the cross-entropy with label smoothing, the loss accumulation and the every-``SYNC_EVERY``-steps host sync).
Each pipeline is warmed up for ``--warmup`` steps before its epoch is timed. On CUDA the epoch is timed with
``torch.cuda.Event`` after a ``torch.cuda.synchronize()``; on the CPU with ``time.perf_counter``. The
pipelines run ``--repeats`` times, interleaved (c, a, b, augmentation; default 3); the table gives the best
epoch and, as a figure a noisy neighbour on a shared machine disturbs far less, the median per-step rate.

Separately it times the augmentation alone over all N images (no model): budgetnet's batched
``train_batches`` (in batches of ``--batch-size``, row selection and normalisation into channels_last
included; the one-off store build is timed and printed apart) vs
the per-sample torchvision transforms (Dataset ``__getitem__``: fromarray + the four transforms) in a plain
single-process Python loop (no collation, which favours torchvision).

As a cross-check of (a) it also runs ``budgetnet.train.train_run`` for one epoch on the same images and
reports the throughput that function measures itself (host-timed, after its first step, fresh model).

    .venv/bin/python scripts/bench_pipeline.py                      # device auto, ResNet-20
    .venv/bin/python scripts/bench_pipeline.py --device cuda --model resnet56 --json bench.json

Defaults: 50,000 images on CUDA, 4,096 on the CPU (about 100 s on a quiet 2-core CPU), batch 256,
``min(8, cpu count)`` DataLoader workers. Results print as markdown tables; ``--json`` keeps every number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from budgetnet import budget  # noqa: E402
from budgetnet.config import DataConfig, ResNetConfig, RunConfig, Shape, TrainConfig  # noqa: E402
from budgetnet.data import DeviceData, ImageSet, normalizer, train_batches  # noqa: E402
from budgetnet.datasets.info import DATASET_INFO  # noqa: E402
from budgetnet.device import (  # noqa: E402
    PRECISIONS,
    autocast,
    grad_scaler,
    memory_format,
    optimizer_step,
    resolve_device,
    resolve_precision,
    tune_cpu_allocator,
)
from budgetnet.models import build_model  # noqa: E402
from budgetnet.recipe import lr_factor, make_optimizer  # noqa: E402
from budgetnet.train import SYNC_EVERY, train_run  # noqa: E402

MODELS = {
    "resnet20": ResNetConfig(),  # depths (3, 3, 3): 0.28M parameters at 100 classes
    "resnet56": ResNetConfig(depths=(9, 9, 9)),  # 0.86M parameters
}
INFO = DATASET_INFO["cifar100"]  # shape, mean and std of CIFAR-100
SHAPE = Shape(INFO.channels, INFO.num_classes, INFO.image_size)
REF_IMAGES = 50_000  # an epoch of CIFAR's training split, for the extrapolated epoch time


# -- timing ------------------------------------------------------------------------------------------

class Clock:
    """Device time of a timed loop and of each step in it: CUDA events on CUDA, perf_counter elsewhere.

    ``start()`` synchronises first (so the start event fires when it is recorded), ``mark()`` closes a
    step, ``stop()`` synchronises once and returns (total seconds, per-step seconds). Step times let the
    report give a median-step figure as well, which a noisy neighbour on a shared CPU disturbs far less
    than the whole-epoch figure.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.marks = [self._now()]

    def mark(self) -> None:
        self.marks.append(self._now())

    def stop(self) -> tuple[float, list[float]]:
        if len(self.marks) == 1:
            self.mark()
        if self.cuda:
            self.marks[-1].synchronize()
            steps = [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
            return self.marks[0].elapsed_time(self.marks[-1]) / 1000.0, steps
        steps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return self.marks[-1] - self.marks[0], steps


# -- the training step (as in budgetnet.train._train) ------------------------------------------------

class Trainer:
    """One model + optimiser shared by every pipeline, so they differ only in how batches arrive."""

    def __init__(self, model_cfg: ResNetConfig, tc: TrainConfig, device: torch.device, seed: int,
                 precision: str):
        torch.manual_seed(seed)
        self.device, self.tc, self.precision = device, tc, precision
        self.fmt = memory_format(device)
        self.model = build_model(model_cfg, SHAPE).to(device, memory_format=self.fmt)
        self.model.train()
        self.opt, self.scaler = make_optimizer(self.model, tc), grad_scaler(device, precision)
        self.loss_sum = torch.zeros((), device=device)
        self.step_count = 0

    def step(self, x: torch.Tensor, y: torch.Tensor, p: float) -> None:
        """x: float, normalised, already in ``memory_format``; y: int64 labels; p: progress for the lr."""
        tc = self.tc
        for group in self.opt.param_groups:
            group["lr"] = tc.lr * lr_factor(tc, p)
        with autocast(self.device, self.precision):
            loss = F.cross_entropy(self.model(x), y, label_smoothing=tc.label_smoothing)
        optimizer_step(loss, self.opt, self.scaler)
        self.loss_sum += loss.detach().float()
        self.step_count += 1
        if self.step_count % SYNC_EVERY == 0:
            loss.item()  # train.py's divergence check: a host sync every SYNC_EVERY steps


# -- pipeline (b): torchvision ------------------------------------------------------------------------

class CifarLikeDataset(Dataset):
    """Like torchvision.datasets.CIFAR100 after loading: HWC uint8 numpy images, int targets, PIL path."""

    def __init__(self, data_hwc: np.ndarray, targets: list[int], transform):
        self.data, self.targets, self.transform = data_hwc, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img, target = self.data[index], self.targets[index]
        img = Image.fromarray(img)
        return self.transform(img), target


def torchvision_transform():
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(INFO.mean, INFO.std),
    ])


# -- the benchmark ------------------------------------------------------------------------------------

@dataclass
class Timing:
    """One timed pass: total seconds and images, and the same per step (batch) for the median-step rate."""

    seconds: float
    images: int
    step_seconds: list[float]
    step_images: list[int]
    setup_seconds: float = 0.0  # one-off work before the first batch (budgetnet's augmentation store)


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from /proc/stat (Linux), to report hypervisor steal; else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def _timing(clock: Clock, step_images: list[int]) -> Timing:
    seconds, steps = clock.stop()
    return Timing(seconds, sum(step_images), steps, step_images)


def bench_device_resident(tr: Trainer, images: torch.Tensor, labels: torch.Tensor, bs: int, warmup: int,
                          clock: Clock, gen: torch.Generator) -> Timing:
    """(a): gather by index, budgetnet augment + normalise on the device, step (as budgetnet.train)."""
    dcfg = DataConfig(crop_padding=4, flip=True, cutout=0)
    normalize = normalizer(INFO, tr.device, tr.fmt)
    make = train_batches(ImageSet(images, labels), dcfg, normalize)
    n = len(labels)
    steps = n // bs

    def batch(perm, b):
        return make(perm[b * bs:(b + 1) * bs], gen)

    perm = torch.randperm(n, device=tr.device, generator=gen)
    for b in range(warmup):
        tr.step(*batch(perm, b % steps), 0.5)
    clock.start()
    perm = torch.randperm(n, device=tr.device, generator=gen)  # one epoch, as train.py: a fresh permutation
    for b in range(steps):
        tr.step(*batch(perm, b), b / steps)
        clock.mark()
    return _timing(clock, [bs] * steps)


def bench_dataloader(tr: Trainer, loader: DataLoader, warmup: int, clock: Clock) -> Timing:
    """(b): DataLoader batches (pinned on CUDA), copied to the device, channels_last, step."""
    dev, fmt = tr.device, tr.fmt
    nb = dev.type == "cuda"

    def to_device(x, y):
        return x.to(dev, non_blocking=nb).contiguous(memory_format=fmt), y.to(dev, non_blocking=nb)

    steps = len(loader)
    it = iter(loader)  # starts the workers (persistent: they survive into the timed epoch)
    for _ in range(min(warmup, steps)):
        tr.step(*to_device(*next(it)), 0.5)
    del it
    clock.start()
    for b, (x, y) in enumerate(loader):  # a fresh epoch: new shuffle, the workers refill empty queues
        tr.step(*to_device(x, y), b / steps)
        clock.mark()
    return _timing(clock, [loader.batch_size] * steps)


def bench_model_only(tr: Trainer, images: torch.Tensor, labels: torch.Tensor, bs: int, steps: int,
                     warmup: int, clock: Clock, n_batches: int = 4) -> Timing:
    """(c): the step alone, cycling through a few batches normalised on the device beforehand."""
    normalize = normalizer(INFO, tr.device, tr.fmt)
    k = max(1, min(n_batches, len(labels) // bs))
    xs = [normalize(images[i * bs:(i + 1) * bs]) for i in range(k)]
    ys = [labels[i * bs:(i + 1) * bs] for i in range(k)]
    for b in range(warmup):
        tr.step(xs[b % k], ys[b % k], 0.5)
    clock.start()
    for b in range(steps):
        tr.step(xs[b % k], ys[b % k], b / steps)
        clock.mark()
    return _timing(clock, [bs] * steps)


def bench_augment_batched(images: torch.Tensor, bs: int, device: torch.device, clock: Clock,
                          gen: torch.Generator, warmup: int) -> Timing:
    """budgetnet's batched path for all N images: ``budgetnet.data.train_batches`` (translated and
    flipped rows from the augmentation store, normalised into channels_last), exactly as a training step
    makes its batch. The store is built once per run; its build is timed apart (``setup_seconds``)."""
    dcfg = DataConfig(crop_padding=4, flip=True, cutout=0)
    normalize = normalizer(INFO, device, memory_format(device))
    split = ImageSet(images, torch.zeros(len(images), dtype=torch.long, device=device))
    n = len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    make = train_batches(split, dcfg, normalize)
    if device.type == "cuda":
        torch.cuda.synchronize()
    setup = time.perf_counter() - t0
    perm = torch.randperm(n, device=device, generator=gen)
    for b in range(warmup):
        make(perm[b * bs:(b + 1) * bs], gen)
    sizes = []
    clock.start()
    perm = torch.randperm(n, device=device, generator=gen)
    for i in range(0, n, bs):
        make(perm[i:i + bs], gen)
        clock.mark()
        sizes.append(min(bs, n - i))
    t = _timing(clock, sizes)
    t.setup_seconds = setup
    return t


def bench_augment_per_sample(ds: CifarLikeDataset, bs: int, seed: int, warmup: int) -> Timing:
    """torchvision's per-sample path for all N images in one process: ``ds[i]`` (fromarray + transforms)."""
    n = len(ds)
    for i in range(min(warmup * 32, n)):
        ds[i]
    order = np.random.default_rng(seed).permutation(n).tolist()
    clock = Clock(torch.device("cpu"))  # host work: wall clock
    sizes = []
    clock.start()
    for j in range(0, n, bs):
        for i in order[j:j + bs]:
            ds[i]
        clock.mark()
        sizes.append(min(bs, n - j))
    return _timing(clock, sizes)


def summarise(runs: list[Timing]) -> dict:
    """Epoch rate of the best repeat (highest throughput) and the median per-step rate over all repeats."""
    ips = [t.images / t.seconds for t in runs]
    i = max(range(len(runs)), key=lambda j: ips[j])
    step_rates = [m / s for t in runs for s, m in zip(t.step_seconds, t.step_images) if s > 0]
    return {"images_per_s": ips[i], "seconds": runs[i].seconds, "images": runs[i].images,
            "images_per_s_all": ips, "images_per_s_median_step": statistics.median(step_rates),
            "step_seconds_all": [t.step_seconds for t in runs], "setup_seconds": runs[i].setup_seconds}


def _print_store_build(rb: dict, rp: dict, n: int) -> None:
    """The augmentation store is built once per training run; charged to a single pass over N images, the
    batched path's rate is lower. Both figures are printed."""
    with_setup = rb["images"] / (rb["seconds"] + rb["setup_seconds"])
    print(f"augmentation store build (once per run): {rb['setup_seconds'] * 1e3:.0f} ms; charged to this one "
          f"pass over {n} images: {with_setup:,.0f} img/s, {with_setup / rp['images_per_s']:.1f}x per-sample")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    ap.add_argument("--images", type=int, default=None,
                    help="images per epoch (default: 50000 on CUDA, 4096 on the CPU)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="DataLoader worker processes for (b) (default: min(8, cpu count))")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before each timed epoch")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed epochs per pipeline, interleaved; the best epoch is reported (default 3)")
    ap.add_argument("--no-train-run", action="store_true",
                    help="skip the cross-check epoch through budgetnet.train.train_run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="training precision; auto decides on this machine, as budgetnet does")
    ap.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    ap.add_argument("--untuned-allocator", action="store_true",
                    help="leave glibc's malloc thresholds at their defaults (the baseline for that change)")
    ap.add_argument("--only-augment", action="store_true",
                    help="time only the augmentation comparison (no model); quick, ~1 core for ~20 s")
    args = ap.parse_args(argv)
    tuned = False if args.untuned_allocator else tune_cpu_allocator()  # as the budgetnet CLI does
    print(f"glibc allocator thresholds raised (budgetnet.device.tune_cpu_allocator): {tuned}")

    device = resolve_device(args.device)
    precision = resolve_precision(device, args.precision)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    n = args.images if args.images is not None else (50_000 if device.type == "cuda" else 4096)
    bs = args.batch_size
    if n < bs:
        ap.error(f"--images ({n}) must be at least --batch-size ({bs})")
    steps = n // bs
    clock = Clock(device)
    model_cfg = MODELS[args.model]
    tc = TrainConfig(batch_size=bs)
    load_before = os.getloadavg()
    cpu_before = cpu_times()
    t_all = time.perf_counter()

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"device {device} ({dev_name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load {load_before[0]:.2f}")
    print(f"model {args.model} ({budget.count_params(model_cfg, SHAPE):,} params), {n} images "
          f"({steps} steps of {bs}), workers {args.workers}, warmup {args.warmup}, repeats {args.repeats}")

    # Fabricated CIFAR-shaped data: CHW uint8 for budgetnet, an HWC copy for the PIL/torchvision path.
    rng = np.random.default_rng(args.seed)
    np_images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    np_labels = rng.integers(0, INFO.num_classes, n).astype(np.int64)
    images = torch.from_numpy(np_images).to(device).contiguous(memory_format=torch.channels_last)  # as load_data
    labels = torch.from_numpy(np_labels).to(device)
    ds = CifarLikeDataset(np.ascontiguousarray(np_images.transpose(0, 2, 3, 1)), np_labels.tolist(),
                          torchvision_transform())
    loader = DataLoader(ds, batch_size=bs, shuffle=True, num_workers=args.workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    tr = Trainer(model_cfg, tc, device, args.seed, precision)

    if args.only_augment:
        del loader
        batched, per_sample = [], []
        for r in range(args.repeats):
            batched.append(bench_augment_batched(images, bs, device, clock, gen, args.warmup))
            per_sample.append(bench_augment_per_sample(ds, bs, args.seed + r, args.warmup))
        rb, rp = summarise(batched), summarise(per_sample)
        print(f"augmentation only, {n} images, best of {args.repeats}: batched {rb['images_per_s']:,.0f} img/s, "
              f"per-sample {rp['images_per_s']:,.0f} img/s, ratio {rb['images_per_s'] / rp['images_per_s']:.1f}x "
              f"(median step {rb['images_per_s_median_step'] / rp['images_per_s_median_step']:.1f}x; "
              f"target on CPU >= 20x)")
        _print_store_build(rb, rp, n)
        if args.json:
            args.json.write_text(json.dumps({"aug_batched": rb, "aug_per_sample": rp}, indent=2))
        return 0

    keys = ("a", "b", "c", "aug_batched", "aug_per_sample")
    runs: dict[str, list[Timing]] = {k: [] for k in keys}
    for r in range(args.repeats):  # interleaved, so a burst of outside load hits one repeat, not one pipeline
        runs["c"].append(bench_model_only(tr, images, labels, bs, steps, args.warmup, clock))
        runs["a"].append(bench_device_resident(tr, images, labels, bs, args.warmup, clock, gen))
        runs["b"].append(bench_dataloader(tr, loader, args.warmup, clock))
        runs["aug_batched"].append(bench_augment_batched(images, bs, device, clock, gen, args.warmup))
        runs["aug_per_sample"].append(bench_augment_per_sample(ds, bs, args.seed + r, args.warmup))
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{k} {v[-1].images / v[-1].seconds:,.0f}" for k, v in runs.items()) + " img/s", flush=True)
    del loader  # shuts the persistent workers down
    del tr

    train_run_ips = None
    if not args.no_train_run:
        data = DeviceData(INFO, [str(i) for i in range(INFO.num_classes)], ImageSet(images, labels), None)
        cfg = RunConfig(model=model_cfg, train=tc, data=DataConfig(crop_padding=4, flip=True), seed=args.seed)
        rr = train_run(cfg, data, device=device, epochs=1, precision=precision)
        train_run_ips = rr.images_per_s if rr.status == "complete" else None
        print(f"  train_run cross-check: status {rr.status}, {rr.steps} steps, {rr.images_per_s:,.0f} img/s")

    res = {k: summarise(v) for k, v in runs.items()}
    pairs = {"a_over_c": ("a", "c"), "a_over_b": ("a", "b"), "aug_batched_over_per_sample": ("aug_batched",
                                                                                              "aug_per_sample")}
    ratio = {k: res[x]["images_per_s"] / res[y]["images_per_s"] for k, (x, y) in pairs.items()}
    ratio_step = {k: res[x]["images_per_s_median_step"] / res[y]["images_per_s_median_step"]
                  for k, (x, y) in pairs.items()}
    targets = {  # (threshold, where the target applies)
        "a_over_c": (0.90, "cuda"), "a_over_b": (3.0, "cuda"), "aug_batched_over_per_sample": (20.0, "cpu"),
    }
    epoch_50k_a = REF_IMAGES / res["a"]["images_per_s"]
    load_after = os.getloadavg()
    cpu_after = cpu_times()
    steal = None
    if cpu_before and cpu_after and cpu_after[1] > cpu_before[1]:
        steal = (cpu_after[0] - cpu_before[0]) / (cpu_after[1] - cpu_before[1])
    total_s = time.perf_counter() - t_all

    # -- report -------------------------------------------------------------------------------------
    names = {
        "a": "(a) device-resident: budgetnet `train_batches` + step",
        "b": f"(b) torchvision transforms + DataLoader ({args.workers} workers) + step",
        "c": "(c) model only: step on pre-made, pre-normalised batches",
        "aug_batched": "augmentation only: budgetnet batched `train_batches`",
        "aug_per_sample": "augmentation only: torchvision per-sample transforms, Python loop",
    }
    print()
    print(f"{args.model}, batch {bs}, {n} images, {device} ({dev_name}), {precision} + channels_last, "
          f"best of {args.repeats}")
    print()
    print("| pipeline | images/s (epoch) | s per epoch (images) | s per 50k images | images/s (median step) |")
    print("|---|---:|---:|---:|---:|")
    for k in keys:
        v = res[k]
        print(f"| {names[k]} | {v['images_per_s']:,.0f} | {v['seconds']:.2f} ({v['images']}) "
              f"| {REF_IMAGES / v['images_per_s']:.1f} | {v['images_per_s_median_step']:,.0f} |")
    if train_run_ips:
        print(f"| cross-check: `budgetnet.train.train_run`, 1 epoch, its own figure (after its first step) | "
              f"{train_run_ips:,.0f} | - | {REF_IMAGES / train_run_ips:.1f} | - |")
    print()
    print("| ratio | from epoch rates | from median-step rates | target | met (epoch) |")
    print("|---|---:|---:|---:|---|")
    for k, label in (("a_over_c", "a / c"), ("a_over_b", "a / b"),
                     ("aug_batched_over_per_sample", "augmentation: batched / per-sample")):
        thr, where = targets[k]
        met = ("yes" if ratio[k] >= thr else "NO") if device.type == where else f"n/a (target is for {where})"

        def fmt(v, k=k):
            return f"{v:.0%}" if k == "a_over_c" else f"{v:.1f}x"

        tshown = f">= {thr:.0%} on {where}" if k == "a_over_c" else f">= {thr:g}x on {where}"
        print(f"| {label} | {fmt(ratio[k])} | {fmt(ratio_step[k])} | {tshown} | {met} |")
    print()
    line = f"(a) epoch time extrapolated to {REF_IMAGES:,} images: {epoch_50k_a:.2f} s"
    if args.model == "resnet56":
        line += " (target: <= 2 s on an H100)"
    print(line)
    _print_store_build(res["aug_batched"], res["aug_per_sample"], n)
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
          + (f"; CPU steal {steal:.1%} of CPU time" if steal is not None else "") + f"; total {total_s:.0f} s")

    if args.json is not None:
        out = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]),
            "device": str(device), "device_name": dev_name, "torch": torch.__version__,
            "torchvision": __import__("torchvision").__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "model": args.model, "params": budget.count_params(model_cfg, SHAPE), "images": n,
            "batch_size": bs, "workers": args.workers, "warmup": args.warmup, "repeats": args.repeats,
            "precision": precision, "memory_format": str(memory_format(device)),
            "results": res, "train_run_images_per_s": train_run_ips,
            "ratios": ratio, "ratios_median_step": ratio_step,
            "targets": {k: {"min": t, "applies_to": w} for k, (t, w) in targets.items()},
            "epoch_seconds_per_50k_images_a": epoch_50k_a,
            "load_average_before": load_before, "load_average_after": load_after,
            "cpu_steal_fraction": steal, "total_seconds": total_s,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
