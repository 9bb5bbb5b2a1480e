"""The budget guard: exact parameter and FLOP counts on the meta device, before anything is allocated.

``check_params`` is the cheap gate (a meta build, a few ms); ``count_flops`` runs a meta forward pass
under ``torch.utils.flop_counter`` (tens of ms), which counts 2 FLOPs per multiply-accumulate;
``check_flops`` caps the multiply-accumulates (``count_macs``, half of that: the "FLOPs" papers quote).
None touches real memory, so an oversized config is rejected before it costs a byte of GPU memory or a
second of training.

Staged families (a ``depths`` field: the ResNets and the inverted-residual net) are counted by depth
additivity, so the cost does not grow with depth: every block of a stage after its first has the same
input and output width, stride 1 and the same resolution, so each adds the same parameters and FLOPs.
The count of ``depths=(d1, d2, d3)`` is then the count of the all-ones net plus, per stage, ``d - 1``
times what a second block adds there: one meta build of the all-ones net and one per stage deeper than
1, each exact, used wherever they hold fewer blocks than the net itself. A plain net with equal widths
and a constant kernel is counted the same way over ``convs_per_block``.
A net with per-conv widths (``conv_widths``, what ``budgetnet prune`` writes) is built whole.
``tests/test_models.py`` checks it against real builds.
"""

from __future__ import annotations

import dataclasses
import functools
import gc

import torch
from torch.utils.flop_counter import FlopCounterMode

from budgetnet.config import ModelConfig, PlainConfig, Shape, TrainConfig
from budgetnet.errors import first_line
from budgetnet.models import build_model


class BudgetExceeded(Exception):
    """A config is over a cap. Carries the numbers so a search can record them."""

    def __init__(self, what: str, value: float, cap: float, message: str | None = None):
        self.what, self.value, self.cap = what, value, cap
        super().__init__(message or f"{what} {value:,.0f} exceed the cap of {cap:,.0f}")


INT64_MAX = 2**63 - 1


class ModelTooLarge(BudgetExceeded):
    """A config so large that a layer's size overflows 64 bits: it can be neither built nor counted, and
    is over any cap. ``value`` is 2^63 - 1, a lower bound on its parameters."""

    def __init__(self, detail: str, cap: float = INT64_MAX):
        super().__init__("parameters", INT64_MAX, cap,
                         f"parameters exceed any cap: a layer's size overflows 64 bits ({detail})")


def _meta_model(cfg: ModelConfig, shape: Shape) -> torch.nn.Module:
    # A build creates thousands of small objects; with the collector on, one of them may trigger a full
    # collection of a large process (an Optuna study, a loaded dataset) and stall the count 100+ ms.
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.device("meta"):
            return build_model(cfg, shape)
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        raise ModelTooLarge(first_line(e, 120)) from None
    finally:
        if enabled:
            gc.enable()


def _repeats(cfg: ModelConfig):
    """(depths, rebuild) for a config made of repeated identical layers, else None.

    Staged families repeat blocks per stage (``depths``). A plain net with equal widths and a constant
    kernel repeats identical convs within each of its blocks (``convs_per_block``). A net with its own
    ``conv_widths`` (a pruned one) repeats nothing: its blocks differ, and the list fits one depth only."""
    if cfg.conv_widths is not None:
        return None
    if getattr(cfg, "depths", None):
        return cfg.depths, lambda d: dataclasses.replace(cfg, depths=d)
    if isinstance(cfg, PlainConfig) and cfg.width_pattern == "equal" and cfg.kernel_pattern == "constant":
        blocks = cfg.n_conv // cfg.convs_per_block
        return (cfg.convs_per_block,), lambda d: dataclasses.replace(cfg, convs_per_block=d[0],
                                                                     n_conv=d[0] * blocks)
    return None


def _by_depth(count, cfg: ModelConfig, shape: Shape) -> int:
    """``count(cfg, shape)`` from shallow builds for nets of repeated layers (see the module docstring);
    a direct build for everything else, and wherever the shallow builds would hold as many blocks as the
    net itself (ResNet-20, the 5-stage inverted-residual net)."""
    rep = _repeats(cfg)
    if rep is None:
        return count(cfg, shape)
    depths, rebuild = rep
    deep = sum(d > 1 for d in depths)
    if len(depths) + deep * (len(depths) + 1) >= sum(depths):  # shallow builds would not build fewer blocks
        return count(cfg, shape)
    ones = (1,) * len(depths)
    base = count(rebuild(ones), shape)
    total = base
    for i, d in enumerate(depths):
        if d > 1:
            two = ones[:i] + (2,) + ones[i + 1:]
            total += (d - 1) * (count(rebuild(two), shape) - base)
    return total


@functools.lru_cache(maxsize=4096)
def _params_built(cfg: ModelConfig, shape: Shape) -> int:
    return sum(p.numel() for p in _meta_model(cfg, shape).parameters() if p.requires_grad)


@functools.lru_cache(maxsize=1024)
def _flops_built(cfg: ModelConfig, shape: Shape) -> int:
    model = _meta_model(cfg, shape).eval()
    x = torch.empty(1, shape.channels, shape.image_size, shape.image_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


@functools.lru_cache(maxsize=4096)
def count_params(cfg: ModelConfig, shape: Shape) -> int:
    """Exact number of trainable parameters, from meta-device builds (no memory allocated)."""
    return _by_depth(_params_built, cfg, shape)


@functools.lru_cache(maxsize=1024)
def count_flops(cfg: ModelConfig, shape: Shape) -> int:
    """Forward FLOPs for one image (2 per multiply-add), counted on the meta device."""
    return _by_depth(_flops_built, cfg, shape)


def count_macs(cfg: ModelConfig, shape: Shape) -> int:
    """Multiply-accumulates for one image: what papers quote as "FLOPs", and what ``--max-flops`` caps.
    Half of ``count_flops`` (``torch.utils.flop_counter`` counts 2 per multiply-add, and only those)."""
    return count_flops(cfg, shape) // 2


def clear_caches() -> None:
    """Forget every cached count (benchmarks and tests that time or watch a cold count)."""
    for fn in (count_params, count_flops, _params_built, _flops_built):
        fn.cache_clear()


def check_params(cfg: ModelConfig, shape: Shape, max_params: float) -> int:
    """Return the parameter count, or raise :class:`BudgetExceeded` if it is over ``max_params``."""
    try:
        n = count_params(cfg, shape)
    except ModelTooLarge as e:
        e.cap = max_params
        raise
    if n > max_params:
        raise BudgetExceeded("parameters", n, max_params)
    return n


def check_flops(cfg: ModelConfig, shape: Shape, max_macs: float | None) -> int:
    """Return the forward FLOPs of one image (``count_flops``), or raise :class:`BudgetExceeded` if its
    multiply-accumulates (``count_macs``: half of them) are over ``max_macs`` (None: no cap)."""
    flops = count_flops(cfg, shape)
    if max_macs is not None and flops // 2 > max_macs:
        raise BudgetExceeded("MACs", flops // 2, max_macs,
                             f"MACs {flops // 2:,} per image exceed the --max-flops cap of {max_macs:,.0f} MACs")
    return flops


# -- memory: what training holds besides activations --------------------------------------------------

def state_bytes(n_params: int, tc: TrainConfig) -> int:
    """Bytes training keeps for a model of ``n_params`` fp32 parameters whatever the batch: weights,
    gradients, optimizer state (AdamW: two moments; SGD: momentum, if any) and the EMA copy, if any."""
    per = 8 + {"adamw": 8, "sgd": 4 if tc.momentum > 0 else 0}[tc.optimizer] + (4 if tc.ema else 0)
    return n_params * per


def _read_int(path: str, key: str | None = None) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if key is None:
                    return int(line.split()[0])
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # /proc/meminfo counts kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can still get on ``device``; None where it cannot be told.

    CUDA: the driver's free memory plus what this process's caching allocator holds unused (reserved, not
    allocated: it serves new tensors first, and frees it before it reports out of memory), and no more
    than this process's share leaves (``--workers`` give each process 1/N of the device:
    ``device.set_memory_share``; the allocator caps what it has allocated at the share). CPU (Linux):
    MemAvailable, and what the cgroup v2 limit leaves.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        allocated = torch.cuda.memory_allocated(index)
        free = torch.cuda.mem_get_info(index)[0] + max(torch.cuda.memory_reserved(index) - allocated, 0)
        # 1.0 unless a share was set (and on a torch too old to tell)
        share = getattr(torch.cuda, "get_per_process_memory_fraction", lambda i: 1.0)(index)
        if share < 1.0:
            total = torch.cuda.get_device_properties(index).total_memory
            free = min(free, max(int(share * total) - allocated, 0))
        return free
    if device.type != "cpu":
        return None
    free = [v for v in (_read_int("/proc/meminfo", "MemAvailable"),) if v is not None]
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:  # memory.max reads "max" (no int) when unlimited
        free.append(max(limit - used, 0))
    return min(free) if free else None


def check_memory(cfg: ModelConfig, tc: TrainConfig, shape: Shape, device: torch.device | str) -> int:
    """Return the parameter count, or raise :class:`BudgetExceeded` if the model's training state alone
    (``state_bytes``) cannot fit in ``device``'s free memory. Activations come on top: passing this does
    not promise a run fits (a CUDA run that does not ends with a typed out-of-memory result), but failing
    it proves the run cannot, before a byte is allocated. On a CPU an allocation that big may get the
    process killed rather than raise, so this is the only clean place to stop it."""
    n = count_params(cfg, shape)
    need, have = state_bytes(n, tc), available_memory(torch.device(device))
    if have is not None and need > have:
        raise BudgetExceeded("bytes", need, have, f"the model's {n:,} parameters need {need / 2**30:,.1f} GiB "
                             f"for weights, gradients and optimizer state; {device} has {have / 2**30:,.1f} "
                             "GiB free")
    return n
