"""One training run: time slices, schedules, evaluation marks, divergence, stopping, determinism."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
import torch

import budgetnet.compile as comp
import budgetnet.device as dev
import budgetnet.search.trial as search_trial
import budgetnet.train as bt
from budgetnet.config import SCHEDULES, DataConfig, PlainConfig, RunConfig, TrainConfig
from budgetnet.datasets.info import DATASET_INFO
from budgetnet.models import build_model
from budgetnet.recipe import lr_factor
from budgetnet.score import evaluate_model
from budgetnet.search.trial import measure_rate
from budgetnet.train import COMPLETE, DIVERGED, STOPPED, train_run

TINY = PlainConfig(n_conv=2, width=8, hidden=(32,))
MARKS = [pytest.approx((k + 1) / 10) for k in range(10)]


def run_cfg(**train) -> RunConfig:
    return RunConfig(model=TINY, train=TrainConfig(**{"batch_size": 64, "lr": 0.05, **train}),
                     data=DataConfig(dataset="synthetic"))


@pytest.fixture
def lr_log(monkeypatch):
    """Records, per optimizer step, the lr the run set (without changing train.py)."""
    log = {"lrs": [], "opts": []}
    real = bt.make_optimizer

    def make(model, cfg, **kw):
        opt = real(model, cfg, **kw)
        step = opt.step

        def logged_step(*a, **k):
            log["lrs"].append(opt.param_groups[0]["lr"])
            assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)
            return step(*a, **k)

        opt.step = logged_step
        log["opts"].append(opt)
        return opt

    monkeypatch.setattr(bt, "make_optimizer", make)
    return log


# -- lr schedule ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, end", [("cosine", 0.0), ("linear", 0.0), ("onecycle", 0.0), ("step", 0.01)])
@pytest.mark.parametrize("warmup", [0.0, 0.05, 0.3])
def test_lr_factor_ends_annealed(schedule, end, warmup):
    cfg = TrainConfig(schedule=schedule, warmup=warmup)
    assert lr_factor(cfg, 1.0) == pytest.approx(end, abs=1e-9)
    assert lr_factor(cfg, 1.5) == lr_factor(cfg, 1.0)  # clamped
    assert lr_factor(cfg, 0.999) <= 0.011


def test_every_schedule_is_tested():
    assert set(SCHEDULES) == {"cosine", "linear", "onecycle", "step"}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("warmup", [0.05, 0.2])
def test_lr_factor_warms_up_then_decays(schedule, warmup):
    cfg = TrainConfig(schedule=schedule, warmup=warmup)
    warm = max(warmup, 0.25) if schedule == "onecycle" else warmup
    ps = np.linspace(0, 1, 2001)
    f = np.array([lr_factor(cfg, float(p)) for p in ps])
    assert np.all((f >= 0) & (f <= 1 + 1e-12))
    rising, falling = f[ps < warm], f[ps >= warm]
    assert np.all(np.diff(rising) > 0), "warm-up must increase strictly"
    assert np.all(np.diff(falling) <= 1e-12), "after warm-up the factor must not increase"
    assert lr_factor(cfg, warm) == pytest.approx(1.0)  # the peak is reached at the end of the warm-up
    assert f[0] == pytest.approx(0.04 if schedule == "onecycle" else 0.0)
    assert lr_factor(cfg, -1.0) == f[0]


def test_lr_factor_shapes():
    cos = TrainConfig(schedule="cosine", warmup=0.0)
    assert lr_factor(cos, 0.0) == 1.0 and lr_factor(cos, 0.5) == pytest.approx(0.5)
    lin = TrainConfig(schedule="linear", warmup=0.0)
    assert lr_factor(lin, 0.25) == pytest.approx(0.75)
    step = TrainConfig(schedule="step", warmup=0.0)
    assert [lr_factor(step, p) for p in (0.49, 0.5, 0.74, 0.75)] == pytest.approx([1, 0.1, 0.1, 0.01])


# -- time-sliced run ----------------------------------------------------------------------------------------

@pytest.mark.timing
def test_time_slice_ends_on_time_annealed_with_all_marks(synthetic_data, warm_torch, lr_log, slice_s):
    calls = []

    def hook(p, metrics):
        calls.append((p, dict(metrics)))
        return False

    cfg = run_cfg(lr=0.05, warmup=0.1, schedule="cosine")
    r = train_run(cfg, synthetic_data, device="cpu", seconds=slice_s, hook=hook)
    assert r.status == COMPLETE, r.reason
    late = 0.5 * slice_s  # a step and an evaluation (slice_s is ~60 steps on this machine)
    assert 0.8 * slice_s <= r.seconds <= slice_s + late, f"a {slice_s:.1f} s slice took {r.seconds:.2f} s"
    assert [h["progress"] for h in r.history] == MARKS
    assert [p for p, _ in calls] == MARKS  # the hook saw every mark, in order
    assert r.metrics == r.history[-1]
    for h in r.history:
        assert {"val_acc", "val_loss", "train_loss", "steps", "epoch", "seconds", "images_per_s"} <= set(h)
    assert [h["seconds"] for h in r.history] == sorted(h["seconds"] for h in r.history)
    assert r.history[-1]["seconds"] <= slice_s + late
    # evaluation marks spread over the slice (time-based progress, not all at the end)
    assert r.history[0]["seconds"] < 0.5 * slice_s
    assert r.steps > 20 and r.images_per_s > 0
    # the lr actually applied: warmed up from ~0, peaked near cfg.lr, annealed at the end of the slice
    lrs = lr_log["lrs"]
    assert len(lrs) == r.steps
    assert lrs[0] < 0.5 * cfg.train.lr and lrs[0] < lrs[len(lrs) // 10]
    assert max(lrs) <= cfg.train.lr + 1e-12 and max(lrs) > 0.9 * cfg.train.lr
    assert lrs[-1] < 0.05 * cfg.train.lr, f"final lr {lrs[-1]:.2e} is not annealed"
    assert lr_log["opts"][-1].param_groups[0]["lr"] == lrs[-1]
    assert r.state_dict is not None and all(t.device.type == "cpu" for t in r.state_dict.values())


def test_epoch_budget_steps_and_marks(synthetic_data, lr_log):
    r = train_run(run_cfg(batch_size=128), synthetic_data, device="cpu", epochs=1)
    assert r.status == COMPLETE
    assert r.steps == len(synthetic_data.train) // 128 == 15
    assert [h["progress"] for h in r.history] == MARKS
    assert r.history[-1]["steps"] == 15
    assert r.history[-1]["epoch"] == pytest.approx(15 * 128 / 2000)
    # progress is step / total_steps: the lr of step k is lr * factor(k / 15)
    tc = run_cfg(batch_size=128).train
    assert lr_log["lrs"] == pytest.approx([tc.lr * lr_factor(tc, k / 15) for k in range(15)])


def test_two_epochs(synthetic_data):
    r = train_run(run_cfg(batch_size=256), synthetic_data, device="cpu", epochs=2)
    assert r.status == COMPLETE and r.steps == 2 * (2000 // 256)


@pytest.mark.parametrize("ema", [0.0, 0.999], ids=["plain", "ema-0.999"])  # a slow EMA over 14 steps too
def test_learns_the_synthetic_task(synthetic_data, ema):
    r = train_run(run_cfg(ema=ema), synthetic_data, device="cpu", epochs=2)
    assert r.status == COMPLETE
    assert r.metrics["val_acc"] > 0.6  # chance is 0.1
    assert r.history[-1]["val_loss"] < r.history[0]["val_loss"]
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]


def test_same_seed_same_weights(synthetic_data):
    a = train_run(run_cfg(), synthetic_data, device="cpu", epochs=1)
    b = train_run(run_cfg(), synthetic_data, device="cpu", epochs=1)
    c = train_run(run_cfg().replace(seed=1), synthetic_data, device="cpu", epochs=1)
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
    assert any(not torch.equal(a.state_dict[k], c.state_dict[k]) for k in a.state_dict)


# -- endings -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_norm", [True, False])
def test_huge_lr_diverges_without_exception(synthetic_data, batch_norm):
    cfg = RunConfig(model=PlainConfig(n_conv=2, width=8, hidden=(32,), batch_norm=batch_norm),
                    train=TrainConfig(optimizer="sgd", lr=1e6, warmup=0.0, batch_size=64),
                    data=DataConfig(dataset="synthetic"))
    r = train_run(cfg, synthetic_data, device="cpu", epochs=3)
    assert r.status == DIVERGED
    assert "non-finite" in r.reason
    assert r.state_dict is None
    assert r.steps < 3 * (2000 // 64)  # stopped early, not at the end of the budget


def test_hook_returning_true_stops(synthetic_data):
    seen = []

    def hook(p, metrics):
        seen.append(p)
        return True

    r = train_run(run_cfg(), synthetic_data, device="cpu", epochs=5, hook=hook)
    assert r.status == STOPPED and r.reason == "stopped by hook"
    assert seen == [pytest.approx(0.1)]
    assert len(r.history) == 1 and r.metrics == r.history[0]
    assert r.steps == math.ceil(0.1 * 5 * (2000 // 64))  # the first mark, not the end of 5 epochs
    assert r.state_dict is not None


def test_stop_callable_stops(synthetic_data):
    polls = []

    def stop():
        polls.append(1)
        return len(polls) >= 5

    r = train_run(run_cfg(), synthetic_data, device="cpu", epochs=5, stop=stop)
    assert r.status == STOPPED and r.reason == "stop requested"
    assert r.steps <= 4 + bt.SYNC_EVERY  # "at once": within one poll interval of the request
    assert r.steps < 5 * (2000 // 64)


@pytest.mark.timing
def test_stop_before_the_first_step(synthetic_data):
    r = train_run(run_cfg(), synthetic_data, device="cpu", seconds=60, stop=lambda: True)
    assert r.status == STOPPED and r.steps == 0 and r.seconds < 30


@pytest.mark.timing
def test_a_run_too_slow_for_its_slice_ends_early_with_its_projection(synthetic_data, warm_torch, slice_s):
    hooked = []
    r = train_run(run_cfg(), synthetic_data, device="cpu", seconds=slice_s, min_epochs=1e4,
                  hook=lambda p, m: hooked.append(p))
    assert r.status == bt.TOO_SLOW
    # judged from 5% of the slice, re-checked from 10%, before the first evaluation (at 10%)
    assert r.seconds < 0.2 * slice_s
    assert not hooked and 3 <= r.steps  # a verdict, and a step at least before its re-check
    assert f"epochs projected in the {slice_s:.0f} s slice" in r.reason and "needs 10000" in r.reason
    assert "re-checked" in r.reason and set(r.speed_recheck) == {"first_images_per_s", "recheck_images_per_s"}
    assert r.state_dict is None


@pytest.mark.timing
def test_a_run_fast_enough_for_its_slice_is_not_stopped(synthetic_data, warm_torch, slice_s):
    # the synthetic split is 2k images, ~30 steps: a slice of ~60 steps shows it more than half an epoch
    r = train_run(run_cfg(), synthetic_data, device="cpu", seconds=slice_s, min_epochs=0.5)
    assert r.status == COMPLETE and r.metrics["epoch"] > 0.5


@pytest.mark.timing
@pytest.mark.parametrize("setup_step", [False, True], ids=["cpu-first-step-is-speed", "cuda-first-step-is-setup"])
def test_a_slow_first_step_judges_the_speed_only_where_it_is_not_set_up(synthetic_data, warm_torch,
                                                                      monkeypatch, setup_step):
    # step 1 takes 40% of the slice, every later step its real time; the first evaluation is due (at 10%)
    # before step 2. Where step 1 is set-up (CUDA: kernel loading, cuDNN's search), it must not judge.
    slice_s, real_step = 3.0, bt.optimizer_step
    calls = []

    def slow_first(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.4 * slice_s)
        return real_step(*a, **kw)

    monkeypatch.setattr(bt, "optimizer_step", slow_first)
    monkeypatch.setattr(bt, "first_step_is_setup", lambda device: setup_step)
    r = train_run(run_cfg(), synthetic_data, device="cpu", seconds=slice_s, min_epochs=0.2)
    if setup_step:
        assert r.status == COMPLETE and r.steps > 2 and r.first_step_s >= 0.4 * slice_s
        assert not r.speed_recheck  # step 1 never judged
    else:  # step 1 judged alone; the verdict, re-checked over the steps after it, lets the run go on
        first, again = r.speed_recheck["first_images_per_s"], r.speed_recheck["recheck_images_per_s"]
        assert first * slice_s / 2000 < 0.2 <= again * slice_s / 2000, r.speed_recheck
        assert r.status == COMPLETE and r.steps > 2


@pytest.mark.timing
def test_a_run_slowed_for_a_moment_is_rechecked_and_keeps_its_slice(synthetic_data, warm_torch, monkeypatch,
                                                                    slice_s):
    """Another process busy for a moment: step 2 stalls for 40% of the slice, so the first speed check
    projects far under the half epoch the slice needs. The verdict is re-checked over the steps after it,
    which train at their real rate: the run is given its slice."""
    calls, real_step = [], bt.optimizer_step

    def stall_once(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(0.4 * slice_s)
        return real_step(*a, **kw)

    monkeypatch.setattr(bt, "optimizer_step", stall_once)
    r = train_run(run_cfg(), synthetic_data, device="cpu", seconds=slice_s, min_epochs=0.5)
    assert r.speed_recheck, "the stall was never judged"
    first, again = r.speed_recheck["first_images_per_s"], r.speed_recheck["recheck_images_per_s"]
    assert first * slice_s / 2000 < 0.5 <= again * slice_s / 2000, r.speed_recheck
    assert r.status == COMPLETE and r.metrics["epoch"] > 0.5


@pytest.mark.timing
def test_the_speed_check_waits_for_the_device_work_its_steps_queued(synthetic_data, warm_torch, monkeypatch):
    """On CUDA a step returns once its kernels are launched, and the device runs them later. A fake
    asynchronous device here: each step queues 0.3 s of device work that only ``synchronize`` waits for.
    Judged on the launch times of the steps after step 1's sync, this model would look about 100x faster
    than it trains; the check must wait for the queue and judge what the device does (~210 img/s: 0.4
    epochs in the slice, under the 2 it needs)."""
    queued = [0.0]
    real_step = bt.optimizer_step

    def launch(*a, **kw):
        real_step(*a, **kw)
        queued[0] += 0.3

    def wait(device):
        time.sleep(queued[0])
        queued[0] = 0.0

    monkeypatch.setattr(bt, "optimizer_step", launch)
    monkeypatch.setattr(bt, "synchronize", wait)
    monkeypatch.setattr(bt, "first_step_is_setup", lambda device: True)
    r = train_run(run_cfg(), synthetic_data, device="cpu", seconds=4.0, min_epochs=2.0)
    assert r.status == bt.TOO_SLOW and "needs 2" in r.reason, (r.status, r.reason, r.steps)
    assert r.images_per_s < 64 / 0.3, r.reason


@pytest.mark.timing
@pytest.mark.parametrize("setup_step", [False, True], ids=["cpu-first-step-is-speed", "cuda-first-step-is-setup"])
def test_a_rate_measured_over_its_first_step_alone_is_no_rate_where_that_step_is_set_up(
        synthetic_data, warm_torch, monkeypatch, setup_step):
    """The search's speed probe and a teacher candidate's measurement (``measure_rate``) end after their
    seconds. When step 1 outlasts them, its rate is set-up where step 1 is set-up (CUDA: an H100's probe
    once read 43 img/s and capped the search's FLOPs by it): no rate. On the CPU step 1 is a step."""
    calls, real_step = [], bt.optimizer_step

    def slow_first(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.5)
        return real_step(*a, **kw)

    monkeypatch.setattr(bt, "optimizer_step", slow_first)
    monkeypatch.setattr(bt, "first_step_is_setup", lambda device: setup_step)
    monkeypatch.setattr(search_trial, "first_step_is_setup", lambda device: setup_step)
    rate = measure_rate(run_cfg(), synthetic_data, device="cpu", seconds=1.0)
    assert len(calls) == 1  # the measurement's time ended with its first step
    if setup_step:
        assert rate is None
    else:
        assert rate is not None and 0 < rate < 64 / 1.5


def test_evaluation_runs_without_cudnn_autotuning_and_leaves_the_runs_setting(synthetic_data, monkeypatch):
    """A run's evaluation batches (1,024, and a split's remainder) are shapes its training never ran: with
    cuDNN's autotuning on (long runs) each would time algorithms inside an evaluation that no slice or
    budget keeps room for. Evaluation turns it off, and gives the run its setting back."""
    seen = []
    model = build_model(TINY, synthetic_data.info.shape)
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.backends.cudnn.benchmark))
    normalize = bt.normalizer(synthetic_data.info, torch.device("cpu"), torch.channels_last)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    metrics = evaluate_model(model, synthetic_data.val, normalize, torch.device("cpu"), batch_size=128)
    assert seen == [False] * math.ceil(len(synthetic_data.val) / 128) and 0 <= metrics["val_acc"] <= 1
    assert torch.backends.cudnn.benchmark is True and model.training


def test_each_compilation_starts_from_cleared_dynamo_caches():
    """Every run compiles a new net through its family's one ``forward``. Dynamo compiles a code object
    at most ``recompile_limit`` (8) times in a process, then runs it eager with only a logged warning:
    a search that compiled eight trials would train the next ones, and its final run, uncompiled while
    reporting them compiled. ``fresh_compile`` clears the caches, so the tenth net still compiles."""
    compiled = []

    def backend(graph, example_inputs):  # counts Dynamo's compilations; runs the graph as traced
        compiled.append(1)
        return graph.forward

    shape = DATASET_INFO["synthetic"].shape
    x = torch.randn(4, shape.channels, shape.image_size, shape.image_size)
    for k in range(torch._dynamo.config.recompile_limit + 2):
        model = build_model(PlainConfig(n_conv=1, width=2 + k, hidden=()), shape)
        bt.fresh_compile(model, backend=backend)(x)
        assert len(compiled) == k + 1, f"net {k + 1} ran uncompiled"


@pytest.mark.timing
def test_priming_pays_a_process_first_optimizer_steps_outside_the_first_run(tmp_path):
    """A fresh process's first optimizer steps carry torch's one-off set-up (1.4-2.2 s on a 2-core CPU). A
    search worker, a grid study and a Ray actor prime first, so that their first trial's slice and schedule
    do not pay it: after priming, a first run's first step costs a fraction of what priming did."""
    import subprocess
    import sys

    code = """
import json, time
from budgetnet.config import DataConfig, PlainConfig, RunConfig, TrainConfig
from budgetnet.data import load_data
from budgetnet.recipe import prime_optimizers
from budgetnet.train import train_run
data = load_data(DataConfig(dataset="synthetic"), device="cpu")
t = time.perf_counter()
prime_optimizers()
primed = time.perf_counter() - t
cfg = RunConfig(model=PlainConfig(n_conv=2, width=8, hidden=(32,)), train=TrainConfig(batch_size=64, lr=0.05),
                data=DataConfig(dataset="synthetic"))
r = train_run(cfg, data, device="cpu", epochs=0.1)
print(json.dumps({"primed": primed, "first_step": r.first_step_s}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    t = json.loads(out.stdout.strip().splitlines()[-1])
    assert t["first_step"] < 0.5 * t["primed"], t


def test_exactly_one_budget():
    with pytest.raises(ValueError):
        train_run(run_cfg(), None, device="cpu")
    with pytest.raises(ValueError):
        train_run(run_cfg(), None, device="cpu", seconds=1, epochs=1)


@pytest.mark.parametrize("train", [dict(optimizer="adamw", lr=3e-3, schedule="onecycle"),
                                   dict(ema=0.9, schedule="step", eval_points=3)],
                         ids=["adamw-onecycle", "ema-step"])
def test_other_optimizer_paths_run(synthetic_data, train):
    r = train_run(run_cfg(**train), synthetic_data, device="cpu", epochs=1)
    assert r.status == COMPLETE
    assert len(r.history) == run_cfg(**train).train.eval_points
    # EMA weights come back under the plain model's names
    assert set(r.state_dict) == set(build_model(TINY, synthetic_data.info.shape).state_dict())
    assert all(torch.isfinite(v.float()).all() for v in r.state_dict.values())



# -- distillation ---------------------------------------------------------------------------------------------

class ConstantTeacher(torch.nn.Module):
    """A 'teacher' that always says ``favourite``, whatever the image (``delay_s`` seconds per call)."""

    def __init__(self, favourite: int, num_classes: int = 10, delay_s: float = 0.0):
        super().__init__()
        self.favourite, self.num_classes, self.delay_s, self.calls = favourite, num_classes, delay_s, 0

    def forward(self, x):
        import time

        self.calls += 1
        time.sleep(self.delay_s)
        logits = torch.zeros(len(x), self.num_classes, device=x.device)
        logits[:, self.favourite] = 8.0
        return logits


def test_distillation_loss_is_the_weighted_sum_of_label_and_softened_teacher_terms():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g), torch.randint(0, 10, (16,), generator=g)
    tc = TrainConfig(label_smoothing=0.1, distill=0.7, distill_temperature=3.0)
    ce = torch.nn.functional.cross_entropy(s, y, label_smoothing=0.1)
    p_t = torch.softmax(t / 3, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / 3, 1))).sum(1).mean()  # KL(teacher || student), per image
    assert bt.training_loss(s, y, tc, t).item() == pytest.approx((0.3 * ce + 0.7 * 9 * kl).item(), rel=1e-5)
    assert bt.training_loss(s, y, tc).item() == pytest.approx(ce.item())  # no teacher: labels only
    with pytest.raises(ValueError, match="do not match"):
        bt.training_loss(s, y, tc, t[:, :5])


def test_a_distilled_student_learns_what_its_teacher_says(synthetic_data):
    teacher = ConstantTeacher(favourite=3)
    r = train_run(run_cfg(distill=1.0, distill_temperature=1.0, label_smoothing=0.0), synthetic_data,
                  device="cpu", epochs=1, teacher=teacher)
    assert r.status == COMPLETE and teacher.calls == r.steps  # one teacher pass per training batch
    model = build_model(TINY, synthetic_data.info.shape)
    model.load_state_dict(r.state_dict)
    with torch.no_grad():
        from budgetnet.data import normalizer

        x = normalizer(synthetic_data.info, "cpu")(synthetic_data.val.images)
        predicted = model.eval()(x).argmax(1)
    # the labels are uniform over 10 classes; the teacher's answer, not the labels, is what was learnt
    assert (predicted == 3).float().mean() > 0.9
    with pytest.raises(ValueError, match="go together"):
        train_run(run_cfg(), synthetic_data, device="cpu", epochs=1, teacher=teacher)
    with pytest.raises(ValueError, match="go together"):
        train_run(run_cfg(distill=0.5), synthetic_data, device="cpu", epochs=1)


@pytest.mark.timing
def test_the_teachers_time_counts_against_the_students_slice(synthetic_data, warm_torch):
    slow = ConstantTeacher(favourite=0, delay_s=0.1)  # far slower than the tiny student's own step
    r = train_run(run_cfg(distill=0.5, eval_points=2), synthetic_data, device="cpu", seconds=3.0, teacher=slow)
    assert r.status == COMPLETE
    assert r.seconds <= 3.0 + 1.5  # the slice holds with the teacher's passes inside it (one late step and an evaluation)
    assert slow.calls == r.steps <= 3.0 / 0.1  # every step paid for its teacher pass out of the slice


@pytest.mark.timing
def test_compilation_is_paid_out_of_the_slice_and_left_out_of_the_rate(synthetic_data, warm_torch, monkeypatch):
    compiled = []

    def slow_compile(model):  # stands in for torch.compile: 1.5 s of "compilation" on the first call
        def forward(x):
            if not compiled:
                import time

                time.sleep(1.5)
            compiled.append(len(x))
            return model(x)
        return forward

    monkeypatch.setattr(torch, "compile", slow_compile)
    monkeypatch.setattr(comp, "COMPILE_ON_MIN_S", 0.0)  # a 4 s run stands in for a long one
    r = train_run(run_cfg(eval_points=2), synthetic_data, device="cpu", seconds=4.0, compile=True)
    assert r.status == COMPLETE and len(compiled) == r.steps  # every training step ran the compiled model
    assert r.first_step_s >= 1.5  # what compilation cost is reported ...
    assert r.seconds <= 4.0 + 1.5  # ... and was paid out of the slice
    # the rate is the compiled model's steady rate after step 1: at least the images of the later steps
    # over the run's time less the 1.5 s (diluted by it, it would be under steps * 64 / seconds)
    assert r.images_per_s >= (r.steps - 1) * 64 / (r.seconds - 1.5)


def test_compile_on_leaves_a_run_too_short_to_compile_in_eager_and_says_why(synthetic_data, monkeypatch):
    """A compilation cannot be stopped (up to 67 s on a CPU, 31 s on an H100): --compile on in a search
    trial's slice, or in a final run's last seconds, would overrun the budget. A run with a time budget
    under COMPILE_ON_MIN_S trains eager and records why; a run by epochs has no deadline, and compiles."""
    calls = spy_compile(monkeypatch)
    r = train_run(run_cfg(eval_points=1), synthetic_data, device="cpu", seconds=1.0, compile="on")
    assert r.status == COMPLETE and calls == [] and r.compile["compiled"] is False
    assert f"on from {comp.COMPILE_ON_MIN_S:.0f} s" in comp.compile_note(r.compile)
    r = train_run(run_cfg(eval_points=1), synthetic_data, device="cpu", epochs=0.2, compile="on")
    assert r.status == COMPLETE and len(calls) == r.steps and r.compile["compiled"] is True


def spy_compile(monkeypatch, delay_s: float = 0.0, fail: bool = False) -> list[int]:
    """Stands in for torch.compile (compiling for real takes minutes on a small CPU): the returned module
    runs the model, ``delay_s`` slower per call, or raises on its first call; records each call's batch."""
    calls: list[int] = []

    def fake_compile(model):
        def forward(x):
            if fail:
                raise RuntimeError("backend exploded\nsecond line")
            calls.append(len(x))
            time.sleep(delay_s)
            return model(x)
        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_auto_compile_is_not_tried_on_a_cpu_nor_in_a_short_run(synthetic_data, monkeypatch):
    calls = spy_compile(monkeypatch)
    r = train_run(run_cfg(eval_points=1), synthetic_data, device="cpu", epochs=2, compile="auto")
    assert r.status == COMPLETE and calls == [] and "auto compiles on cuda only" in r.compile["reason"]
    assert comp.compile_note(r.compile) is None  # the CPU's usual case: recorded, not said
    monkeypatch.setattr(comp, "COMPILE_AUTO_DEVICES", ("cpu",))  # the CUDA rule, run here
    r = train_run(run_cfg(eval_points=1), synthetic_data, device="cpu", epochs=2, compile="auto")
    assert r.status == COMPLETE and calls == []  # 62 steps of a tiny net: far under COMPILE_AUTO_MIN_S
    assert r.compile["compiled"] is False and r.compile["eager_images_per_s"] > 0
    assert f"under {comp.COMPILE_AUTO_MIN_S:.0f} s" in r.compile["reason"]
    assert comp.compile_note(r.compile).startswith("not compiled: ")
    r = train_run(run_cfg(eval_points=1), synthetic_data, device="cpu", epochs=2, compile="off")
    assert calls == [] and comp.compile_note(r.compile) is None


def test_auto_compile_goes_back_to_eager_when_compiled_steps_time_slower(synthetic_data, monkeypatch):
    monkeypatch.setattr(comp, "COMPILE_AUTO_DEVICES", ("cpu",))  # the CUDA rule, run here
    monkeypatch.setattr(comp, "COMPILE_AUTO_MIN_S", 0.0)  # a long run, as far as the rule is concerned
    calls = spy_compile(monkeypatch, delay_s=0.03)  # each "compiled" step 30 ms slower than eager
    r = train_run(run_cfg(eval_points=1), synthetic_data, device="cpu", epochs=2, compile="auto")
    m = comp.COMPILE_MEASURE_STEPS
    assert r.status == COMPLETE and r.steps == 62
    # Steps 2..1+m timed eager, step 2+m compiled, m more timed, then eager again for the rest.
    assert len(calls) == 1 + m
    assert r.compile["compiled"] is False and r.compile["compiled_images_per_s"] < r.compile["eager_images_per_s"]
    assert "not kept" in comp.compile_note(r.compile)
    assert r.images_per_s > r.compile["compiled_images_per_s"]  # the run's rate: mostly eager steps


def test_auto_compile_keeps_the_compiled_model_when_it_times_faster(synthetic_data, monkeypatch):
    monkeypatch.setattr(comp, "COMPILE_AUTO_DEVICES", ("cpu",))  # the CUDA rule, run here
    monkeypatch.setattr(comp, "COMPILE_AUTO_MIN_S", 0.0)
    monkeypatch.setattr(comp, "COMPILE_MIN_SPEEDUP", 0.0)  # any measured rate counts as faster
    calls = spy_compile(monkeypatch)
    r = train_run(run_cfg(eval_points=1), synthetic_data, device="cpu", epochs=2, compile="auto")
    m = comp.COMPILE_MEASURE_STEPS
    assert r.status == COMPLETE and len(calls) == r.steps - (1 + m)  # every step after the eager ones
    assert r.compile["compiled"] is True and r.compile["compile_s"] >= 0
    assert comp.compile_note(r.compile).endswith("; kept")


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_a_compilation_that_fails_trains_on_eager_with_the_reason(synthetic_data, monkeypatch, mode):
    monkeypatch.setattr(comp, "COMPILE_AUTO_DEVICES", ("cpu",))  # the CUDA rule, run here
    monkeypatch.setattr(comp, "COMPILE_AUTO_MIN_S", 0.0)
    spy_compile(monkeypatch, fail=True)
    r = train_run(run_cfg(eval_points=1), synthetic_data, device="cpu", epochs=2, compile=mode)
    assert r.status == COMPLETE and r.steps == 62 and r.compile["compiled"] is False
    assert r.compile["reason"] == "compilation failed (RuntimeError: backend exploded); trained eager"
    assert math.isfinite(r.metrics["val_loss"])


def test_compile_modes_are_checked():
    assert [comp.compile_mode(v) for v in (True, False, None, "auto", "on", "off")] == [
        "on", "off", "off", "auto", "on", "off"]
    with pytest.raises(ValueError, match="compile must be one of"):
        comp.compile_mode("fast")


def test_out_of_memory_ends_with_a_typed_result(synthetic_data, monkeypatch):
    import budgetnet.train as bt

    real_autocast = bt.autocast
    calls = {"n": 0}

    def exploding_autocast(device, precision):
        calls["n"] += 1
        if calls["n"] > 3:  # a few good steps, then the allocator gives up
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_autocast(device, precision)

    monkeypatch.setattr(bt, "autocast", exploding_autocast)
    cfg = RunConfig(model=PlainConfig(n_conv=2, width=4, hidden=()), train=TrainConfig(batch_size=64),
                    data=DataConfig(dataset="synthetic"))
    result = bt.train_run(cfg, synthetic_data, device="cpu", epochs=1)
    assert result.status == "oom" and "out of memory" in result.reason
    assert result.state_dict is None


def test_a_model_whose_training_state_cannot_fit_ends_oom_before_allocating(synthetic_data):
    # doubling widths from 8 over 16 convs: ~4e11 parameters, 4.6 TiB of weights, gradients and momentum
    cfg = RunConfig(model=PlainConfig(n_conv=16, width=8, convs_per_block=16, hidden=()),
                    data=DataConfig(dataset="synthetic"))
    result = train_run(cfg, synthetic_data, device="cpu", seconds=5)
    assert result.status == "oom" and "GiB for weights, gradients and optimizer state" in result.reason
    assert result.state_dict is None and result.steps == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp32", "auto"])
def test_cuda_path_learns_in_each_precision(precision):
    # epochs, not seconds: in a 5 s slice on an H100 the first step (kernel loading, cuDNN's search) once
    # took most of the time-based schedule's warm-up, and this plain net without BN stayed at chance
    from budgetnet.data import load_data

    data = load_data(DataConfig(dataset="synthetic"), device="cuda")
    assert data.train.images.is_cuda and data.train.images.dtype == torch.uint8
    cfg = RunConfig(model=PlainConfig(n_conv=2, width=16, hidden=(64,)), train=TrainConfig(batch_size=128),
                    data=DataConfig(dataset="synthetic"))
    result = train_run(cfg, data, device="cuda", epochs=8, precision=precision)
    assert result.status == "complete" and result.metrics["val_acc"] > 0.5
    assert result.precision == dev.resolve_precision("cuda", precision)


@pytest.mark.timing
def test_a_kept_run_goes_on_where_it_stopped_over_other_data(synthetic_data):
    """``keep=True`` returns a stopped run's carry; ``resume=`` goes on with its weights, optimizer and step
    count over other data (train+validation), its schedule over the total seconds counted from the
    carried run's start; another config cannot resume it."""
    from budgetnet.data import merged

    cfg = run_cfg()
    started = time.perf_counter()
    leg = train_run(cfg, synthetic_data, device="cpu", seconds=6.0, keep=True,
                    stop=lambda: time.perf_counter() - started > 1.5)
    assert leg.status == STOPPED and leg.carry is not None and 1.4 < leg.carry.seconds < 4.0
    before = leg.carry.score(synthetic_data.val)
    steps, weights = leg.steps, {k: v.clone() for k, v in leg.carry.run.model.state_dict().items()}
    with pytest.raises(ValueError, match="its own config"):
        train_run(cfg.replace(seed=cfg.seed + 1), merged(synthetic_data), device="cpu", seconds=3.0,
                  resume=leg.carry)
    t0 = time.perf_counter()
    rest = train_run(cfg, merged(synthetic_data), device="cpu", seconds=leg.carry.seconds + 2.0, resume=leg.carry,
                     fit_images=500)
    assert rest.status == COMPLETE and rest.steps > steps  # the step count goes on from the leg's
    assert time.perf_counter() - t0 < 2.0 + 1.5  # only the seconds left of the total, not a whole run
    assert rest.seconds >= leg.carry.seconds + 1.5  # its seconds count the leg's
    assert not all(torch.equal(weights[k], v) for k, v in rest.state_dict.items())
    assert rest.metrics["fit_acc"] >= before["val_acc"] - 0.05  # it learned on from where it was, not anew
    assert len(merged(synthetic_data).train) == len(synthetic_data.train) + len(synthetic_data.val)
