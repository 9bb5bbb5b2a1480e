"""The device's speed, and the model size it allows: the probe before the search, then trials' own rates.

What a slice can train is measured on the device, never assumed; the FLOP cap only keeps sampling among
models that can see ``MIN_EPOCHS_PER_TRIAL`` of their data in a slice (each trial checks its own speed).
"""

from __future__ import annotations

from budgetnet.config import DataConfig, ResNetConfig, RunConfig, TrainConfig
from budgetnet.data import DeviceData
from budgetnet.search.trial import MIN_EPOCHS_PER_TRIAL, measure_rate

PROBE_MODEL = ResNetConfig(depths=(2, 2, 2))  # a small reference net: 16-32-64 channels, 14 convs
LEARNED_MARGIN = 1.25  # a trial's rate raises the cap only past this factor: no churn on noise


def probe_speed(data: DeviceData, device: str, seconds: float, *, precision: str = "auto",
                stop=None) -> float | None:
    """This device's training throughput (images/s, after the first step) of ``PROBE_MODEL`` at batch
    128, measured for at most ``seconds`` of wall time, start-up included. ``stop()`` ends it early.
    None if it could not finish one step."""
    ref = RunConfig(model=PROBE_MODEL, train=TrainConfig(batch_size=128), data=DataConfig(dataset=data.info.name))
    return measure_rate(ref, data, device=device, seconds=seconds, stop=stop, precision=precision)


def feasible_flops(images_per_s: float, flops_per_image: float, train_images: int, slice_s: float) -> float:
    """Forward FLOPs per image a model may have so that one slice covers ``MIN_EPOCHS_PER_TRIAL`` of the
    training split, scaled from a measured rate (``images_per_s`` of a model of ``flops_per_image``: the
    probe net, or a trial's). A FLOP-based guess; ``train_run(min_epochs=)`` checks each trial's speed."""
    return images_per_s * flops_per_image * slice_s / (MIN_EPOCHS_PER_TRIAL * train_images)


def learned_cap(max_flops: float | None, images_per_s: float, flops: int | None, steps: int,
                train_images: int, slice_s: float) -> float | None:
    """The higher FLOP cap a trial's rate shows (``images_per_s`` of a model of ``flops`` over ``steps``
    steps), or None. The probe is one short measurement, which a busy moment can make far too low
    (docs/benchmarks.md, "Speed probe"); the cap only rises, and a model too slow still ends at its own speed check."""
    if max_flops is None or not flops or steps < 2 or not images_per_s > 0:
        return None
    cap = feasible_flops(images_per_s, flops, train_images, slice_s)
    return cap if cap > LEARNED_MARGIN * max_flops else None
