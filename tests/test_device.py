"""Decisions made on the running machine: precision by capability and measurement, device flags, EMA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import budgetnet.device as dev
import budgetnet.train as bt
from budgetnet.config import DataConfig, PlainConfig, RunConfig, TrainConfig
from budgetnet.recipe import EMA
from budgetnet.search.trial import measure_rate
from budgetnet.train import train_run

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def scaler_steps(monkeypatch) -> list[float]:
    """The loss scale at every GradScaler step taken while the test runs."""
    steps = []
    real = torch.amp.GradScaler.step

    def spy(self, opt, *a, **k):
        steps.append(self.get_scale())
        return real(self, opt, *a, **k)

    monkeypatch.setattr(torch.amp.GradScaler, "step", spy)
    return steps


@pytest.fixture
def fresh_profile():
    """Each test measures (or stubs) the CPU anew; the process's real profile is restored afterwards."""
    dev.cpu_profile.cache_clear()
    yield
    dev.cpu_profile.cache_clear()


# -- CUDA: the capability's candidate, used only where measured faster --------------------------------

@pytest.fixture
def fresh_cuda_profile():
    dev.cuda_profile.cache_clear()
    yield
    dev.cuda_profile.cache_clear()


@pytest.mark.parametrize("capability, candidate", [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 6), "bf16"),
                                                   ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp32")])
@pytest.mark.parametrize("candidate_ms, faster", [(1.0, True), (2.0, False), (4.0, False)],
                         ids=["candidate-faster", "candidate-barely-faster", "candidate-slower"])
def test_cuda_uses_its_capability_candidate_only_where_measured_faster(monkeypatch, fresh_cuda_profile,
                                                                       capability, candidate, candidate_ms, faster):
    timed = []
    monkeypatch.setattr(dev, "_cuda_capability", lambda device: capability)
    monkeypatch.setattr(dev, "prepare", lambda device: None)
    monkeypatch.setattr(dev, "_step_ms", lambda precision, device, **kw:
                        timed.append((precision, device.type)) or (2.2 if precision == "fp32" else candidate_ms))
    monkeypatch.setattr(dev, "cpu_profile", lambda: pytest.fail("a CUDA choice must not measure the CPU"))
    expected = candidate if faster and candidate != "fp32" else "fp32"
    assert dev.resolve_precision(torch.device("cuda", 0)) == expected
    assert dev.resolve_precision("cuda:0") == expected  # measured once per GPU and process
    if candidate == "fp32":
        assert timed == []  # no tensor cores: nothing to compare
    else:
        assert timed == [("fp32", "cuda"), (candidate, "cuda")]
        assert dev.cuda_profile(0).speedup == pytest.approx(2.2 / candidate_ms)


def test_cuda_precision_candidates_follow_compute_capability():
    assert [dev.cuda_precision(c) for c in ((9, 0), (8, 0), (7, 5), (7, 0), (6, 1))] == \
        ["bf16", "bf16", "fp16", "fp16", "fp32"]


def test_the_probe_step_times_a_real_training_step_on_the_cpu():
    ms = dev._step_ms("fp32", repeats=2, device=CPU)
    assert 0 < ms < 10_000


def test_the_precision_measurement_times_fp16_through_its_grad_scaler(scaler_steps):
    """fp16 trains through a GradScaler (a host sync and unscale kernels each step): timing it without one
    would credit fp16 with a speed its training steps do not have."""
    steps = scaler_steps
    dev._step_ms("fp32", repeats=1, device=CPU)
    assert steps == []
    dev._step_ms("fp16", repeats=1, device=CPU)
    assert len(steps) == 2  # the warm-up step and the timed one


def test_fp16_gets_a_grad_scaler_and_the_others_do_not():
    assert isinstance(dev.grad_scaler(CPU, "fp16"), torch.amp.GradScaler)
    assert dev.grad_scaler(CPU, "bf16") is None and dev.grad_scaler(CPU, "fp32") is None


# -- CPU: native bf16 and measured faster, or fp32 ------------------------------------------------------

def test_cpu_without_native_bf16_is_fp32_and_bf16_is_never_timed(monkeypatch, fresh_profile):
    timed = []
    monkeypatch.setattr(dev, "_native_bf16", lambda: False)
    monkeypatch.setattr(dev, "_step_ms", lambda precision, **kw: timed.append(precision) or 5.0)
    assert dev.resolve_precision(CPU) == "fp32"
    assert timed == ["fp32"]  # emulated bf16 (11x slower on an AVX2 CPU) is not even measured
    assert dev.cpu_profile().bf16_ms is None


@pytest.mark.parametrize("bf16_ms, expected", [(4.0, "bf16"), (8.0, "fp32"), (55.0, "fp32")],
                         ids=["native-and-faster", "native-but-barely-faster", "native-but-slower"])
def test_cpu_with_native_bf16_uses_it_only_where_measured_faster(monkeypatch, fresh_profile, bf16_ms, expected):
    monkeypatch.setattr(dev, "_native_bf16", lambda: True)
    monkeypatch.setattr(dev, "_step_ms", lambda precision, **kw: 9.0 if precision == "fp32" else bf16_ms)
    assert dev.resolve_precision(CPU) == expected
    assert dev.cpu_profile().bf16_speedup == pytest.approx(9.0 / bf16_ms)


def test_the_cpu_is_measured_once_per_process(monkeypatch, fresh_profile):
    calls = []
    monkeypatch.setattr(dev, "_native_bf16", lambda: True)
    monkeypatch.setattr(dev, "_step_ms", lambda precision, **kw: calls.append(precision) or 5.0)
    for _ in range(3):
        dev.resolve_precision(CPU)
    assert calls == ["fp32", "bf16"]


@pytest.mark.timing
def test_the_real_measurement_agrees_with_its_own_numbers(fresh_profile):
    p = dev.cpu_profile()
    assert p.fp32_ms > 0 and p.capability == torch.backends.cpu.get_cpu_capability()
    fast = p.native_bf16 and p.bf16_ms is not None and p.fp32_ms / p.bf16_ms >= dev.BF16_MIN_SPEEDUP
    assert p.precision == ("bf16" if fast else "fp32")


def test_an_explicit_precision_overrides_auto_and_a_bad_one_is_refused(monkeypatch, fresh_profile):
    monkeypatch.setattr(dev, "_step_ms", lambda precision, **kw: pytest.fail("an override must not measure"))
    for p in ("fp32", "bf16", "fp16"):
        assert dev.resolve_precision(CPU, p) == p
    with pytest.raises(ValueError, match="precision must be one of"):
        dev.resolve_precision(CPU, "fp8")


# -- the training loop uses the chosen precision --------------------------------------------------------

def _cfg(**train) -> RunConfig:
    return RunConfig(model=PlainConfig(n_conv=2, width=8, hidden=(32,)),
                     train=TrainConfig(**{"batch_size": 64, "lr": 0.05, **train}), data=DataConfig(dataset="synthetic"))


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_train_run_computes_in_the_precision_it_reports(synthetic_data, monkeypatch, precision, dtype):
    seen = []
    real = F.cross_entropy

    def spy(logits, *a, **k):
        seen.append(logits.dtype)
        return real(logits, *a, **k)

    monkeypatch.setattr(F, "cross_entropy", spy)
    r = train_run(_cfg(), synthetic_data, device="cpu", epochs=0.2, precision=precision)
    assert r.status == "complete" and r.precision == precision
    assert seen and seen[0] == dtype  # the first training step's logits (autocast: the model's output dtype)
    assert all(v.dtype == torch.float32 for v in r.state_dict.values() if v.is_floating_point())


def test_fp16_steps_through_the_grad_scaler(synthetic_data, scaler_steps):
    steps = scaler_steps
    r = train_run(_cfg(), synthetic_data, device="cpu", epochs=0.2, precision="fp16")
    assert r.status == "complete" and len(steps) == r.steps and steps[0] == 2.0**16


def test_auto_on_the_cpu_trains_in_what_the_measurement_chose(synthetic_data):
    r = train_run(_cfg(), synthetic_data, device="cpu", epochs=0.1)
    assert r.precision == dev.cpu_profile().precision


# -- CUDA flags, set by the same code the CPU tests run ---------------------------------------------------

def test_prepare_turns_on_cudnn_benchmark_and_tf32_for_cuda_only():
    saved = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = False, False
        torch.set_float32_matmul_precision("highest")
        dev.prepare(CPU)
        assert not torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "highest"
        dev.prepare(CUDA)  # only sets flags: runs without a GPU
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cudnn.benchmark, _, torch.backends.cudnn.allow_tf32 = saved
        torch.set_float32_matmul_precision(saved[1])


# -- EMA: on the device, no host sync per step ------------------------------------------------------------

class _HostSyncs(TorchDispatchMode):
    """Counts ops that copy a device value to the host (``.item()``, ``bool(tensor)``, ``.cpu()``)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs.append(func)
        if func is torch.ops.aten._to_copy.default and (kwargs or {}).get("device") == CPU:
            self.syncs.append(func)
        return func(*args, **(kwargs or {}))


def test_ema_averages_weights_and_buffers_without_a_host_sync():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = EMA(model, decay=0.9)
    history = []
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(2, 3, 5, 5))  # moves the BN running stats and its batch counter
        history.append({k: v.clone() for k, v in model.state_dict().items()})
        with _HostSyncs() as mode:
            ema.update(model)
        assert not mode.syncs, f"EMA update step {step} synced with the host: {mode.syncs}"
    for name, value in ema.module.state_dict().items():
        if value.is_floating_point():
            expected = history[0][name]
            for n, h in enumerate(history[1:], start=1):  # the decay warms up: min(0.9, (1 + n) / (10 + n))
                d = min(0.9, (1 + n) / (10 + n))
                expected = d * expected + (1 - d) * h[name]
            torch.testing.assert_close(value, expected)
        else:  # integer counters follow the model
            assert torch.equal(value, history[-1][name])
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_a_memory_share_on_cuda_names_the_device_index_torch_needs(monkeypatch):
    # torch.cuda.set_per_process_memory_fraction refuses torch.device("cuda") (no index): "cuda" means
    # the current device, and workers and Ray trials are given plain "cuda"
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda share, index: calls.append((share, index)))
    dev.set_memory_share("cuda", 0.25)
    dev.set_memory_share("cuda:1", 2.0)
    dev.set_memory_share(CPU, 0.5)  # nothing to cap on the CPU
    assert calls == [(0.25, 3), (1.0, 1)]


def test_prepare_lets_cudnn_autotune_only_when_the_run_asks():
    saved = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    try:
        dev.prepare(CUDA, autotune=False)
        assert torch.backends.cudnn.benchmark is False
        dev.prepare(CUDA)
        assert torch.backends.cudnn.benchmark is True and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def test_search_trials_and_speed_probes_train_without_autotuning_and_other_runs_with_it(monkeypatch,
                                                                                      synthetic_data):
    from budgetnet.search.trial import Caps, run_trial

    asked = []
    real = bt.prepare
    monkeypatch.setattr(bt, "prepare", lambda device, autotune=True: asked.append(autotune) or real(device, autotune))
    cfg = _cfg()
    run_trial(cfg, synthetic_data, caps=Caps(1e6), slice_s=1.0, device="cpu", precision="fp32",
              set_attr=lambda k, v: None, report=lambda p, v: False, fits=lambda: True, stop=lambda: False)
    measure_rate(cfg, synthetic_data, device="cpu", seconds=0.5)
    train_run(cfg, synthetic_data, device="cpu", epochs=0.1)  # a final phase, a teacher, `budgetnet train`
    assert asked == [False, False, True]
