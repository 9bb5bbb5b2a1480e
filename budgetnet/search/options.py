"""What a search is asked to do (``SearchOptions``), and how its budget is cut, worked out once (``Plan``).

The budget bounds the whole command from its first second (docs/search.md has the rules): the search
phase gets ``1 - final_fraction`` of it, cut into equal trial slices after a short speed probe; the final
phase gets the rest. Imports neither torch nor optuna.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from budgetnet.config import ConfigError
from budgetnet.search.clock import (
    AUTO_SEARCH_MIN,
    CLOCK_SAVE_MAX_S,
    CLOCK_SAVE_MIN_S,
    CLOCK_SAVE_SHARE,
    PROBE_MAX_S,
    PROBE_MIN_S,
    PROBE_SHARE,
    clamp,
    slice_fits,
    trial_deadline,
)


@dataclass
class SearchOptions:
    max_params: float
    budget_seconds: float
    dataset: str = "cifar100"
    image_size: int | None = None  # folder datasets: the side images are resized to (None: 32 px)
    data_dir: str | None = None
    storage: str = "sqlite:///studies/budgetnet.db"
    study_name: str | None = None
    out: str = "best.pt"
    seed: int = 0
    pruner: str = "median"
    sampler: str = "tpe"
    grid: tuple[dict, dict] | None = None  # (base config dict, grid) for sampler="grid"
    # The CLI's default is --final-fraction auto (final_auto, 0.25); these are the library's fixed share.
    final_fraction: float = 0.35  # with final_auto: the least the final phase gets
    final_auto: bool = False  # --final-fraction auto: the search ends early once its best value stagnates
    trial_seconds: float | None = None  # None: the search phase divided into TRIALS_PER_SEARCH slices
    device: str = "cpu"
    artifact_dir: str = "studies/artifacts"
    download: bool = False
    warm_start: bool = True
    precision: str = "auto"  # auto (the device's best, decided on this machine), fp32, bf16 or fp16
    workers: int = 1  # local worker processes on the study (the leader is one of them)
    pick: str = "observed"  # the final phase's config: observed, estimate, race, estimate+race (search/pick.py)
    tta: str = "auto"  # the final model's test-time augmentation: auto (flip unless validation shows harm), flip, none
    teacher: str | None = None  # a checkpoint the final model is distilled from (its forward passes are timed)
    backend: str = "optuna"  # "ray": the search phase runs as a Ray Tune experiment (search/ray_backend.py)
    ray_address: str | None = None  # an existing Ray cluster to join; None starts a local one
    gpus_per_trial: float | None = None  # Ray's share of a GPU per trial; None: 1/workers on CUDA, 0 on a CPU
    ray_scheduler: str = "median"  # median (MedianStoppingRule) or asha, on the shared progress axis
    compile: str = "auto"  # torch.compile of trials and the final run: auto (tried in long runs only, kept if
    # measured faster), on, off
    max_flops: float | None = None  # --max-flops: multiply-accumulates per image (papers' "FLOPs"); None: no cap
    max_latency_ms: float | None = None  # --max-latency-ms: batch-1 latency measured before training; None: none
    latency_device: str = "cpu"  # where latency is measured (the deployment target, whatever trains)
    latency_threads: int = 1  # CPU threads for the latency measurement only
    init: str | None = None  # a checkpoint to fine-tune: the architecture is its, the space the fine-tuning's
    normalise_with: str = "checkpoint"  # --init: the new images' mean and std, the checkpoint's or the data's


class StudyMismatch(ConfigError):
    """A resume asked for a different cap or dataset than the study was started with (a user mistake)."""


def default_study_name(dataset: str, max_params: float, hours: float, max_flops: float | None = None,
                       max_latency_ms: float | None = None) -> str:
    """The dataset, the caps and the budget: another cap or budget names another study. A cap not given
    adds nothing, so the names of studies without one stay what they were."""
    def short(x: float) -> str:
        for div, s in ((1e6, "M"), (1e3, "k")):
            if x >= div:
                return f"{x / div:g}{s}"
        return f"{x:g}"

    caps = (f"-{short(max_flops)}MACs" if max_flops else "") + (f"-{max_latency_ms:g}ms" if max_latency_ms else "")
    return f"{dataset}-{short(max_params)}params{caps}-{hours * 60:g}min"


def final_share(opts: SearchOptions) -> str:
    if opts.final_auto:
        return (f"what the search leaves (it ends when it stagnates, between {AUTO_SEARCH_MIN:.0%} and "
                f"{1 - opts.final_fraction:.0%} of the budget)")
    return f"{opts.final_fraction:.0%} of the budget"


@dataclass(frozen=True)
class Plan:
    """How one budget is cut, in budget seconds. Every process of a session reads the same plan."""

    budget: float
    search_end: float  # the search phase ends here (the final phase's least share after it)
    probe_s: float  # the speed probe's wall time; 0 for a grid or --init, whose nets are not sampled
    save_every: float  # the clock is saved this often: a kill -9 loses at most this much accounting
    slice_s: float = 0.0  # one trial's slice, fixed per study (``with_slice``)

    def with_slice(self, slice_s: float) -> Plan:
        return replace(self, slice_s=slice_s)

    @property
    def deadline(self) -> float:
        """Budget seconds past which a running trial is stopped whatever its slice says."""
        return trial_deadline(self.search_end, self.slice_s, self.budget)

    def fits(self, used: float) -> bool:
        """Whether a full slice started ``used`` seconds into the budget fits in the search phase."""
        return slice_fits(used, self.slice_s, self.search_end, self.budget)


def plan_budget(opts: SearchOptions) -> Plan:
    budget = opts.budget_seconds
    sampled = opts.grid is None and opts.init is None  # nets to sample: the probe sets their FLOP cap
    return Plan(budget=budget, search_end=budget * (1 - opts.final_fraction),
                probe_s=clamp(PROBE_SHARE * budget, PROBE_MIN_S, PROBE_MAX_S) if sampled else 0.0,
                save_every=clamp(CLOCK_SAVE_SHARE * budget, CLOCK_SAVE_MIN_S, CLOCK_SAVE_MAX_S))
