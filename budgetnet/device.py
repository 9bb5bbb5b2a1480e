"""What the running machine does well, decided on the running machine: device, precision, memory layout.

No speed choice here is a constant measured elsewhere: each comes from the device's capability or a
once-per-process micro-benchmark of tens of milliseconds, and ``--precision`` overrides it.

- **CUDA:** the candidate is bf16 autocast from compute capability 8.0, fp16 with a gradient scaler on
  7.x, fp32 below; it is used only where a small conv net's step measured on this GPU runs faster than
  fp32 with TF32 (small nets are launch-bound: docs/benchmarks.md, "GPU").
- **int8 export:** which quantisation scheme this CPU runs well (``cpu_family``; ``--int8-for`` overrides).
- **CPU:** bf16 only where it is native (oneDNN says so) *and* measured faster than fp32 here; without
  native bf16 every bf16 op is emulated and far slower (docs/benchmarks.md, "Precision").

This module imports nothing of budgetnet's but its config choices, so every other module may use it.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from budgetnet.config import PRECISIONS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_MIN_SPEEDUP = 1.15  # a lower precision must beat fp32 by this much to be worth its lost bits


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present. Only entry points (CLI, scripts) should call this with 'auto'."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -- precision ------------------------------------------------------------------------------------------

def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def cuda_precision(capability: tuple[int, int]) -> str:
    """The candidate low precision: bf16 from Ampere (8.0) on, fp16 with loss scaling on Volta and Turing
    (7.x), fp32 below (no tensor cores: nothing to gain)."""
    if capability >= (8, 0):
        return "bf16"
    if capability >= (7, 0):
        return "fp16"
    return "fp32"


def _native_bf16() -> bool:
    """oneDNN's own answer to "does this CPU do bf16 in hardware" (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: let the measurement decide
        return True


@dataclass(frozen=True)
class CpuProfile:
    """The CPU's measured training speed on a small conv net, and the precision chosen from it."""

    capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    native_bf16: bool
    fp32_ms: float  # best training step in fp32
    bf16_ms: float | None  # best step in bf16 autocast; None when not measured (not native)
    precision: str

    @property
    def bf16_speedup(self) -> float | None:
        return self.fp32_ms / self.bf16_ms if self.bf16_ms else None


@dataclass(frozen=True)
class CudaProfile:
    """One GPU's measured training speed on a small conv net, and the precision chosen from it."""

    capability: tuple[int, int]
    candidate: str  # cuda_precision(capability)
    fp32_ms: float | None  # best step in fp32 (TF32); None when there is no candidate to compare
    candidate_ms: float | None
    precision: str

    @property
    def speedup(self) -> float | None:
        return self.fp32_ms / self.candidate_ms if self.fp32_ms and self.candidate_ms else None


def _probe_net(device: torch.device, batch: int, size: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * (size // 2) ** 2, 10),
    ).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    return net, x, torch.randint(0, 10, (batch,), device=device)


def _step_ms(precision: str, repeats: int = 3, give_up_ms: float = float("inf"),
             device: torch.device | None = None) -> float:
    """Best time of one forward/backward/SGD step of ``_probe_net`` (after untimed warm-up).
    CPU: batch 32 of 16x16, one step a repeat, one warm-up step; stops early once a step takes longer than
    ``give_up_ms`` (an emulated dtype need not be timed twice). CUDA: batch 256 of 32x32 (the space's
    batch sizes and CIFAR's image size), 5 warm-up steps (cuDNN's algorithm search), 20 steps a repeat
    between two synchronisations (the GPU runs asynchronously)."""
    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    net, x, y = _probe_net(device, 256 if cuda else 32, 32 if cuda else 16)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = grad_scaler(device, precision)  # fp16 trains through it, and pays its per-step checks
    steps, warmup = (20, 5) if cuda else (1, 1)

    def step():
        with autocast(device, precision):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer_step(loss, opt, scaler)  # the training loop's own step

    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        ms = (time.perf_counter() - t) * 1e3 / steps
        best = min(best, ms)
        if ms > give_up_ms:
            break
    return best


@functools.cache
def cuda_profile(index: int) -> CudaProfile:
    """Measure GPU ``index`` once per process (well under a second): fp32 against its candidate."""
    device = torch.device("cuda", index)
    capability = _cuda_capability(device)
    candidate = cuda_precision(capability)
    if candidate == "fp32":
        return CudaProfile(capability, candidate, None, None, "fp32")
    prepare(device)  # time fp32 as the training loop runs it: TF32 and cuDNN's benchmark on
    fp32 = _step_ms("fp32", device=device)
    low = _step_ms(candidate, device=device)
    return CudaProfile(capability, candidate, fp32, low, candidate if fp32 / low >= BF16_MIN_SPEEDUP else "fp32")


@functools.lru_cache(maxsize=1)
def cpu_profile() -> CpuProfile:
    """Measure once per process (tens of ms; far less where bf16 is not native and is not timed)."""
    native = _native_bf16()
    fp32 = _step_ms("fp32")
    bf16 = _step_ms("bf16", give_up_ms=2 * fp32) if native else None
    fast = bf16 is not None and fp32 / bf16 >= BF16_MIN_SPEEDUP
    return CpuProfile(torch.backends.cpu.get_cpu_capability(), native, fp32, bf16, "bf16" if fast else "fp32")


def machine_id(device: torch.device | str) -> str:
    """This machine and device as a resumed study tells them apart (the precision and speed decided on one
    hold there only): host name, the device's model, and the CPU threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        try:
            found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        except OSError:
            found = None
        name = found.group(1).strip() if found else platform.processor() or platform.machine()
    return f"{socket.gethostname()} {device.type}: {name}, {torch.get_num_threads()} threads"


def cpu_family() -> str:
    """This CPU as onnxruntime's int8 guidance tells them apart: "arm", "x86-vnni" (AVX512-VNNI or AVX-VNNI:
    8-bit dot products that do not saturate) or "x86"."""
    if platform.machine().lower().startswith(("arm", "aarch64")):
        return "arm"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "x86"  # not seen: the scheme safe on any x86 (reduced range) costs little accuracy
    return "x86-vnni" if re.search(r"\b(avx512_vnni|avx_vnni)\b", flags) else "x86"


def resolve_precision(device: torch.device | str, requested: str = "auto") -> str:
    """The training precision for ``device``: ``requested`` unless it is "auto", else the device's best."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_profile(device.index if device.index is not None else torch.cuda.current_device()).precision
    if device.type == "cpu":
        return cpu_profile().precision
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (fp32: none at all)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Zero the gradients, backpropagate ``loss`` and step. With fp16's scaler the loss is scaled, and a
    step whose gradients hold inf or nan is skipped and the scale lowered (``train_run``'s step, and the
    precision measurement's, so that fp16 is timed with the checks it trains with)."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


# -- layout and device flags ----------------------------------------------------------------------------

def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA and the CPU, where it measured faster (docs/benchmarks.md, "Precision");
    the resident data are NHWC already. Other backends keep the default layout."""
    return torch.channels_last if device.type in ("cuda", "cpu") else torch.contiguous_format


def prepare(device: torch.device, autotune: bool = True) -> None:
    """Process-wide settings for training on ``device`` (set anew by each run).

    CUDA: fp32 matmuls and convolutions may use TF32 tensor cores. With ``autotune``, cuDNN times its
    algorithms once per new shape (``cudnn.benchmark``; the loop's shapes are fixed: one batch size, the
    last partial batch dropped): a long run repays that search, a trial's short slice does not
    (docs/benchmarks.md, "GPU"); without it cuDNN picks by heuristics.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = autotune
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True  # and for fp32 convolutions


def first_step_is_setup(device: torch.device) -> bool:
    """Whether a run's first step is mostly one-off set-up (CUDA loads kernels and picks algorithms)
    rather than a sample of its speed; on the CPU it costs what the next steps do."""
    return device.type == "cuda"


def set_memory_share(device: torch.device | str, share: float) -> None:
    """Cap this process's allocations on a CUDA device at ``share`` of its memory (an allocation past it is an
    out-of-memory error); a no-op elsewhere. ``"cuda"`` means the current device: torch's call needs an
    index."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(min(1.0, share), index)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA kernels run asynchronously); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# glibc hands freed blocks over 128 KiB back to the OS, so on a CPU every step page-faults its batch
# buffers in again (docs/benchmarks.md, "CPU allocator"); higher thresholds keep them in the heap.
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for this setting on 64-bit
TRIM_THRESHOLD = 256 << 20


def tune_cpu_allocator() -> bool:
    """Keep freed blocks of up to 32 MiB in glibc's heap. True if applied (Linux, glibc), else False.

    Process-wide and idempotent; entry points (the CLI, the benchmarks) call it once at start-up.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is the device running out of memory (CUDA's typed error, or the CPU allocator's)."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) or (
        "out of memory" in str(e).lower())
