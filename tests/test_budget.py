"""The budget guard: exact counts on the meta device, fast, and never a real allocation."""

from __future__ import annotations

import os
import resource
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import budgetnet.budget as bb
from budgetnet.budget import BudgetExceeded, check_params, clear_caches, count_flops, count_params
from budgetnet.config import INITS, MobileNetConfig, PlainConfig, ResNetConfig, Shape, TrainConfig
from budgetnet.models import build_model

CIFAR100 = Shape(3, 100, 32)
# ~1.2e10 parameters (48 GB of fp32): a real build would fail or take minutes; a meta build takes ms
HUGE = ResNetConfig(depths=(1, 1, 1), widths=(16384, 16384, 16384))
HUGE_PARAMS = 12_083_790_404


class DeviceRecorder(TorchDispatchMode):
    """Records the device of every tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.devices: dict[str, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.devices.setdefault(t.device.type, set()).add(str(func))
        return out


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_caches()
    yield
    clear_caches()


@pytest.fixture(scope="module", autouse=True)
def _warm():
    """First meta build in a process pays one-off lazy imports; keep them out of the timings."""
    count_params(ResNetConfig(depths=(1,), widths=(4,)), CIFAR100)
    count_flops(ResNetConfig(depths=(1,), widths=(4,)), CIFAR100)
    with DeviceRecorder():
        clear_caches()
        count_params(ResNetConfig(depths=(1,), widths=(4,)), CIFAR100)


def test_check_params_under_cap_returns_count():
    n = count_params(ResNetConfig(), CIFAR100)
    assert check_params(ResNetConfig(), CIFAR100, 1_000_000) == n == 275_588
    assert check_params(ResNetConfig(), CIFAR100, n) == n  # the cap itself is allowed


@pytest.mark.parametrize("cap", [275_587, 100_000, 1.5e5])
def test_check_params_over_cap_raises_with_numbers(cap):
    with pytest.raises(BudgetExceeded) as info:
        check_params(ResNetConfig(), CIFAR100, cap)
    e = info.value
    assert e.value == 275_588
    assert e.cap == cap
    assert e.what == "parameters"
    assert "275,588" in str(e)


def test_huge_config_rejected_quickly_without_allocating():
    t = time.perf_counter()
    with DeviceRecorder() as rec, pytest.raises(BudgetExceeded) as info:
        check_params(HUGE, CIFAR100, 1_000_000)
    elapsed = time.perf_counter() - t
    assert info.value.value == HUGE_PARAMS
    assert elapsed < 1.0, f"check_params took {elapsed:.2f} s on a 1.2e10-parameter config"
    assert rec.devices, "the recorder saw no tensor op at all: it is not measuring anything"
    assert set(rec.devices) == {"meta"}, f"real tensors created: {rec.devices}"


@pytest.mark.parametrize("init", INITS)
def test_count_params_on_huge_config_is_fast_for_every_init(init):
    # a real orthogonal init of a 16384 x 147456 matrix would take minutes: the meta build must skip it
    cfg = ResNetConfig(depths=(1, 1, 1), widths=(16384, 16384, 16384), init=init)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t = time.perf_counter()
    with DeviceRecorder() as rec:
        n = count_params(cfg, CIFAR100)
    elapsed = time.perf_counter() - t
    assert n == HUGE_PARAMS
    assert elapsed < 1.0
    assert set(rec.devices) == {"meta"}
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # < 200 MiB


def test_a_config_whose_layer_sizes_overflow_is_over_any_cap():
    cfg = PlainConfig(n_conv=64, width=8, convs_per_block=64, hidden=())  # doubling: the 28th conv has 2^30 outputs
    with DeviceRecorder() as rec, pytest.raises(bb.ModelTooLarge) as info:
        count_params(cfg, CIFAR100)
    assert isinstance(info.value, BudgetExceeded) and "overflows 64 bits" in str(info.value)
    assert set(rec.devices) <= {"meta"}
    with pytest.raises(BudgetExceeded) as info:
        check_params(cfg, CIFAR100, 1e6)
    assert info.value.cap == 1e6 and info.value.value == bb.INT64_MAX and int(info.value.value) > 1e6
    with pytest.raises(bb.ModelTooLarge):
        count_flops(cfg, CIFAR100)


@pytest.mark.parametrize("tc, per_param", [
    (TrainConfig(optimizer="sgd", momentum=0.9), 12), (TrainConfig(optimizer="sgd", momentum=0.0), 8),
    (TrainConfig(optimizer="adamw"), 16), (TrainConfig(optimizer="adamw", ema=0.99), 20),
])
def test_state_bytes_counts_weights_gradients_optimizer_state_and_ema(tc, per_param):
    assert bb.state_bytes(1000, tc) == 1000 * per_param


def test_check_memory_refuses_a_model_whose_training_state_cannot_fit(monkeypatch):
    n = count_params(ResNetConfig(), CIFAR100)
    need = bb.state_bytes(n, TrainConfig())
    monkeypatch.setattr(bb, "available_memory", lambda device: need - 1)
    with pytest.raises(BudgetExceeded, match="GiB for weights, gradients and optimizer state") as info:
        bb.check_memory(ResNetConfig(), TrainConfig(), CIFAR100, "cpu")
    assert (info.value.value, info.value.cap) == (need, need - 1)
    monkeypatch.setattr(bb, "available_memory", lambda device: need)
    assert bb.check_memory(ResNetConfig(), TrainConfig(), CIFAR100, "cpu") == n
    monkeypatch.setattr(bb, "available_memory", lambda device: None)  # unknown: no refusal
    assert bb.check_memory(ResNetConfig(), TrainConfig(), CIFAR100, "cpu") == n


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux only")
def test_available_cuda_memory_is_this_process_share_of_the_device(monkeypatch):
    """Under --workers 4 each process may allocate a quarter of the GPU (device.set_memory_share): the memory
    check must count against that, not against the whole device's free memory. Memory the caching
    allocator holds unused (reserved, not allocated) serves new tensors first, so it counts as free: a
    process whose cache grew in earlier trials must not refuse a model that fits (CUDA calls stubbed here)."""
    gib = 2**30
    share = {"fraction": 1.0}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (70 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda i: share["fraction"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 80 * gib}))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 1 * gib)
    # no share set: what the driver has free, and the 2 GiB this process's cache holds unused
    assert bb.available_memory(torch.device("cuda")) == 72 * gib
    share["fraction"] = 0.25
    assert bb.available_memory(torch.device("cuda")) == 19 * gib  # a quarter of 80, less the 1 allocated
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (5 * gib, 80 * gib))  # other processes hold the rest
    assert bb.available_memory(torch.device("cuda")) == 7 * gib
    share["fraction"] = 0.01
    assert bb.available_memory(torch.device("cuda:0")) == 0  # a share already used up


def test_available_memory_on_this_cpu_is_a_plausible_number_of_bytes():
    free = bb.available_memory(torch.device("cpu"))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < free <= total
    assert bb.available_memory(torch.device("meta")) is None


def test_count_params_does_not_move_or_allocate(monkeypatch):
    """Belt and braces: nothing calls Module.to / Tensor.to on the way to a count."""

    def boom(*a, **k):
        raise AssertionError("count_params moved a module or tensor")

    monkeypatch.setattr(torch.nn.Module, "to", boom)
    monkeypatch.setattr(torch.nn.Module, "to_empty", boom)
    assert count_params(HUGE, CIFAR100) == HUGE_PARAMS


def test_count_flops_is_meta_and_fast_on_huge_config():
    t = time.perf_counter()
    flops = count_flops(HUGE, CIFAR100)
    assert time.perf_counter() - t < 2.0
    w = 16384  # multiply-adds: stem, stage 1 at 32x32, stages 2 and 3 at 16x16 and 8x8, head
    macs = 16 * 3 * 9 * 32**2 + w * 16 * 9 * 32**2 + w * w * 9 * 32**2 + 2 * w * w * 9 * 16**2 \
        + 2 * w * w * 9 * 8**2 + w * 100
    assert flops == 2 * macs


def test_count_params_cache():
    cfg = PlainConfig()
    a = count_params(cfg, CIFAR100)
    hits = count_params.cache_info().hits
    assert count_params(PlainConfig(), CIFAR100) == a  # equal config, equal key
    assert count_params.cache_info().hits == hits + 1


# The guard's speed (under 50 ms per check) is measured by scripts/bench_guard.py, not asserted here:
# timings on a shared 2-core CI machine are not a test.
GUARD_CONFIGS = [
    ResNetConfig(),  # ResNet-20
    ResNetConfig(depths=(9, 9, 9)),  # ResNet-56
    ResNetConfig(block="bottleneck", depths=(3, 3, 3), widths=(16, 32, 64)),
    PlainConfig(),
    PlainConfig(n_conv=8, convs_per_block=2, width=64, width_pattern="equal", hidden=(512, 256)),
    MobileNetConfig(),
    MobileNetConfig(widths=(16, 24, 32, 64, 96, 160), depths=(1, 2, 3, 4, 3, 3), strides=(1, 1, 2, 2, 1, 2),
                    activation="prelu", init="kaiming"),
]


@pytest.mark.parametrize("cfg", GUARD_CONFIGS, ids=lambda c: f"{c.family}")
def test_guard_count_equals_real_count(cfg):
    model = build_model(cfg, CIFAR100)
    assert count_params(cfg, CIFAR100) == sum(p.numel() for p in model.parameters() if p.requires_grad)
