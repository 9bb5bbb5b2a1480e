"""Fine-tuning from a checkpoint: the source read and checked, the new data conformed to it, its weights
adapted, and the freezing rules a run follows.

- Groups: ``models.groups``, a net's trainable groups in forward order, the head last.
- Strategies (``TrainConfig.freeze``): ``none`` trains every group; ``head`` the head only; ``last:K`` the
  K groups below the head and the head; ``gradual[:SHARE]`` starts with the head and unfreezes one more
  group from the top every SHARE of the run's progress (the p the lr schedule follows). Frozen groups have
  ``requires_grad`` off and stay in eval mode: their BatchNorm statistics do not move. The pretrained
  groups train at ``backbone_lr_scale`` times the lr, the head at the lr.
- Data: the new images become what the checkpoint's net takes (``data.conform_images``): grayscale repeated
  into RGB, RGB to luminance, resized to the checkpoint's side (a folder is decoded at that side), and
  normalised with the checkpoint's mean and std unless ``normalise_with="data"`` (the new data's own).
- Head: kept when the new data's classes are the checkpoint's (same names, same order); otherwise a new
  one, initialised as the family initialises a fresh net's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from budgetnet.budget import BudgetExceeded, check_flops, count_params
from budgetnet.checkpoint import load_checkpoint, model_from_checkpoint, recorded_info
from budgetnet.config import ConfigError, DataConfig, RunConfig, Shape, TrainConfig, is_folder, parse_freeze
from budgetnet.data import CONFORM_CHUNK, DeviceData, ImageSet, conform_images, load_data
from budgetnet.datasets.info import DatasetInfo
from budgetnet.models import build_model, groups

NORMALISE_WITH = ("checkpoint", "data")


class FinetuneError(ConfigError):
    """A checkpoint that cannot serve this data or cap (a user mistake: one line)."""


@dataclass(frozen=True)
class Source:
    """A checkpoint to start from, read and checked once."""

    path: str
    sha256: str
    cfg: RunConfig
    info: DatasetInfo  # its recorded input: channels, side, class count, mean, std
    classes: tuple[str, ...]
    state: dict
    dataset: str


def load_source(path: str | Path) -> Source:
    """Read a checkpoint (``weights_only=True``) and check that its weights rebuild its net. Raises
    CheckpointError for anything else: a foreign file, an unknown family, weights that do not fit."""
    ckpt = load_checkpoint(path)
    info = recorded_info(ckpt)
    model_from_checkpoint(ckpt)  # on the meta device: a config its tensors do not fit is refused here
    return Source(str(Path(path).absolute()), ckpt["sha256"], ckpt["run_config"], info, tuple(ckpt["classes"]),
                  ckpt["state_dict"], str(ckpt.get("dataset", "")))


def target_data(source: Source, dataset: str) -> DataConfig:
    """The data config of a run on ``dataset`` from ``source``: its augmentation and split seed, a folder
    decoded at its side, the dataset's own validation hold-out."""
    return dataclasses.replace(source.cfg.data, dataset=dataset, val_size=None,
                               image_size=source.info.image_size if is_folder(dataset) else None)


def target_shape(source: Source, num_classes: int) -> Shape:
    return Shape(source.info.channels, num_classes, source.info.image_size)


def check_target(source: Source, target: DatasetInfo, max_params: float | None, max_macs: float | None = None) -> int:
    """The parameters of ``source``'s net with a head for ``target``'s classes; FinetuneError (one line)
    where its channels cannot be conformed or the net would exceed ``max_params`` (or ``max_macs``)."""
    c, t = source.info.channels, target.channels
    if c != t and {c, t} != {1, 3}:
        raise FinetuneError(f"{source.path} takes {c}-channel images and {target.name} has {t} channels: only "
                            f"grayscale and RGB convert into each other")
    shape = target_shape(source, target.num_classes)
    n = count_params(source.cfg.model, shape)
    if max_params and n > max_params:
        raise FinetuneError(f"{source.path}: its {source.cfg.model.family} net with a {target.num_classes}-class "
                            f"head has {n:,} parameters, over --max-params {max_params:,.0f}")
    try:
        check_flops(source.cfg.model, shape, max_macs)
    except BudgetExceeded as e:
        raise FinetuneError(f"{source.path}: {e}") from None
    return n


def load_target(source: Source, dataset: str, data_dir, device, *, merge_val: bool = False,
                download: bool = False, normalise_with: str = "checkpoint") -> tuple[DeviceData, dict]:
    """``dataset`` on ``device``, conformed to ``source``'s input, and what was adapted (for the record)."""
    data = load_data(target_data(source, dataset), data_dir, device, merge_val=merge_val, download=download)
    own, c = data.info, source.info.channels
    adapted = adaptation(source, own)
    data = conform_data(data, source.info)
    if normalise_with == "data" and own.channels == c:
        data.info = dataclasses.replace(data.info, mean=own.mean, std=own.std)
    elif normalise_with == "data":  # repeated grayscale keeps its statistics; luminance needs its own
        mean, std = (own.mean * 3, own.std * 3) if c == 3 else image_stats(data.train.images)
        data.info = dataclasses.replace(data.info, mean=tuple(mean), std=tuple(std))
    return data, adapted


def conform_data(data: DeviceData, info: DatasetInfo) -> DeviceData:
    """``data`` as a net whose input is ``info`` takes it: its images conformed (``data.conform_images``),
    normalised with ``info``'s statistics."""
    def conform(s: ImageSet | None) -> ImageSet | None:
        return None if s is None else ImageSet(conform_images(s.images, info.channels, info.image_size), s.labels)

    return DeviceData(dataclasses.replace(data.info, channels=info.channels, image_size=info.image_size,
                                          mean=info.mean, std=info.std), data.classes,
                      conform(data.train), conform(data.val))


def adaptation(source: Source, own: DatasetInfo) -> dict:
    """What conforming data of ``own`` shape to ``source``'s input changes, in words (for the record)."""
    c, size, adapted = source.info.channels, source.info.image_size, {}
    if own.channels != c:
        adapted["channels"] = f"{own.channels} -> {c} ({'repeated' if c == 3 else 'luminance, BT.601'})"
    if own.image_size != size:
        adapted["image_size"] = f"{own.image_size} -> {size} px (bilinear)"
    return adapted


def image_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1]."""
    c = images.shape[1]
    counts = torch.zeros(c, 256, dtype=torch.float64, device=images.device)
    for i in range(0, len(images), CONFORM_CHUNK):  # a histogram per channel, a chunk of images at a time
        x = images[i:i + CONFORM_CHUNK].transpose(0, 1).reshape(c, -1).long()
        counts += torch.stack([torch.bincount(row, minlength=256) for row in x]).double()
    values = torch.arange(256, dtype=torch.float64, device=counts.device) / 255
    p = counts / counts.sum(1, keepdim=True)
    mean = p @ values
    std = (p @ values**2 - mean**2).clamp(min=1e-6).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def head_keys(model: nn.Module, model_cfg) -> set[str]:
    """The state-dict keys of the model's head group."""
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = tuple(names[id(m)] + "." for m in groups(model, model_cfg)[-1][1])
    return {k for k in model.state_dict() if k.startswith(prefixes)}


def adapt_state(source: Source, shape: Shape, classes, seed: int) -> tuple[dict, bool]:
    """The weights a run on data of ``classes`` starts from, and whether its head is new: the source's,
    with a fresh head (seeded) where the classes are not the source's."""
    if tuple(classes) == source.classes and shape == source.info.shape:
        return source.state, False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(source.cfg.model, shape)
    head = head_keys(model, source.cfg.model)
    return {k: v if k in head else source.state[k] for k, v in model.state_dict().items()}, True


def group_names(source: Source) -> list[str]:
    """The names of the source net's groups, head last (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(source.cfg.model, source.info.shape)
    return [name for name, _ in groups(model, source.cfg.model)]


def trainable_groups(freeze: str, n: int, p: float) -> int:
    """How many of ``n`` groups, counted from the head, train at progress ``p`` under strategy ``freeze``."""
    kind, value = parse_freeze(freeze)
    if kind == "none":
        return n
    if kind == "head":
        return 1
    if kind == "last":
        return min(n, int(value) + 1)
    return min(n, 1 + int(max(p, 0.0) / value + 1e-9))


class Freezer:
    """A strategy applied to a model during a run. ``at(p)`` sets which groups train at progress ``p``, and
    puts the frozen ones back in eval mode where an evaluation (or the loop's start) set train mode."""

    def __init__(self, model: nn.Module, model_cfg, train_cfg: TrainConfig):
        self.groups = groups(model, model_cfg)
        self.freeze = train_cfg.freeze
        self.trainable = -1
        self.frozen: list[nn.Module] = []

    def head_params(self) -> list[nn.Parameter]:
        return [p for m in self.groups[-1][1] for p in m.parameters()]

    def at(self, p: float) -> None:
        k = trainable_groups(self.freeze, len(self.groups), p)
        if k != self.trainable:
            cut = len(self.groups) - k
            for i, (_, modules) in enumerate(self.groups):
                for m in modules:
                    m.requires_grad_(i >= cut).train(i >= cut)
            self.frozen = [m for _, modules in self.groups[:cut] for m in modules]
            self.trainable = k
        elif self.frozen and self.frozen[0].training:
            for m in self.frozen:
                m.eval()


def provenance(source: Source, train_cfg: TrainConfig, new_head: bool, adapted: dict,
               normalise_with: str) -> dict:
    """What a fine-tuned checkpoint records of where it came from (``extra["finetune"]``)."""
    return {"source": source.path, "source_sha256": source.sha256, "source_dataset": source.dataset,
            "source_classes": list(source.classes), "strategy": train_cfg.freeze,
            "backbone_lr_scale": train_cfg.backbone_lr_scale, "new_head": new_head, "adapted": dict(adapted),
            "normalisation": normalise_with}


def described(extra: dict) -> str | None:
    """"fine-tuned from <source> (<strategy>)" for a checkpoint's ``extra``; None if it was not."""
    ft = extra.get("finetune") if isinstance(extra, dict) else None
    if not isinstance(ft, dict):
        return None
    return f"fine-tuned from {ft.get('source')} ({ft.get('strategy')})"
