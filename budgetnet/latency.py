"""Forward latency, measured for real: the one home of timing a model's forward pass.

``measure_latency`` times forwards at a batch size (``budgetnet evaluate``'s batch-1 and batch-256 rows,
``budgetnet prune``'s). ``deployment_latency`` is the latency the caps speak of (``--max-latency-ms``): batch
1, fp32, eval mode, on the latency device with its own thread count (set for the measurement only, then
restored: ``torch.set_num_threads`` is process-wide), warm-up forwards, then the median of repeats, about a
second in all. The search's guard (``config_latency``), the final model's check and ``budgetnet evaluate``
call it, so the three figures are the same measurement.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from budgetnet.config import ModelConfig, Shape
from budgetnet.device import memory_format
from budgetnet.models import build_model

SECONDS = 1.0  # a deployment measurement stops repeating past this much wall time (warm-up included)
WARMUP = 3  # untimed forwards first: oneDNN and cuDNN pick their kernels on the first calls
MIN_REPEATS, MAX_REPEATS = 3, 50  # timed forwards: at least (past SECONDS too), at most


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(model: torch.nn.Module, shape: tuple[int, int, int], device: torch.device,
                    batch_size: int, repeats: int = 20, warmup: int = 5, seconds: float | None = None) -> dict:
    """Median forward latency (ms) and throughput (images/s) at a batch size, with device sync, in the
    precision of the model's weights. ``seconds``: stop repeating once this much wall time (warm-up
    included) has passed, after at least ``MIN_REPEATS`` timed forwards (fewer if ``repeats`` is less).
    ``repeats`` says how many forwards were timed."""
    x = torch.randn(batch_size, *shape, device=device).contiguous(memory_format=memory_format(device))
    x = x.to(next(model.parameters()).dtype)
    times: list[float] = []
    start = time.perf_counter()
    for i in range(warmup + repeats):
        _sync(device)
        t = time.perf_counter()
        model(x)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        if seconds is not None and len(times) >= min(MIN_REPEATS, repeats) and time.perf_counter() - start > seconds:
            break
    median = statistics.median(times)
    return {"batch_size": batch_size, "latency_ms": median * 1e3, "images_per_s": batch_size / median,
            "repeats": len(times)}


@contextlib.contextmanager
def threads(n: int | None):
    """``torch.set_num_threads(n)`` inside the block, the process's own count restored after it."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def deployment_latency(model: torch.nn.Module, shape: Shape, device: torch.device | str = "cpu",
                       n_threads: int = 1) -> dict:
    """The deployment latency of ``model`` (already on ``device``, fp32): batch 1, eval mode, ``n_threads``
    CPU threads, ``WARMUP`` forwards then the median of up to ``MAX_REPEATS``, about ``SECONDS`` in all.
    Returns ``latency_ms``, ``repeats``, ``seconds`` (the measurement's wall time), ``device``, ``threads``."""
    device = torch.device(device)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with threads(n_threads):
            m = measure_latency(model, (shape.channels, shape.image_size, shape.image_size), device, 1,
                                repeats=MAX_REPEATS, warmup=WARMUP, seconds=SECONDS)
    finally:
        model.train(was_training)
    return {"latency_ms": m["latency_ms"], "repeats": m["repeats"], "seconds": time.perf_counter() - t0,
            "device": str(device), "threads": n_threads, "batch_size": 1, "precision": "fp32"}


def config_latency(cfg: ModelConfig, shape: Shape, device: torch.device | str = "cpu", n_threads: int = 1) -> dict:
    """``deployment_latency`` of a freshly built ``cfg`` (random weights: the latency does not depend on
    them), built for real on ``device`` without moving the global random state a training run seeds from.
    ``seconds`` includes the build."""
    t0 = time.perf_counter()
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg, shape).to(device, memory_format=memory_format(device))
    out = deployment_latency(model, shape, device, n_threads)
    del model
    return {**out, "seconds": time.perf_counter() - t0}


def thread_label(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"
