"""Run configuration: frozen dataclasses with a strict JSON round trip.

One :class:`RunConfig` fully determines a training run; units stand next to every field. ``from_dict``
rejects unknown keys: a typo in a JSON file is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

ACTIVATIONS = ("relu", "leaky_relu", "prelu", "gelu", "silu", "mish")
INITS = ("default", "xavier", "kaiming", "orthogonal")


# -- the choices a command line offers: here, with no torch import, so that --help and a flag's mistake
# answer at once (device.py and train.py act on them) ---------------------------------------------------

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "on", "off")
# test-time augmentation of a deployed model: "flip" predicts the mean of the logits over each image and its
# mirror (two forward passes); a search's "auto" turns it on unless its validation shows harm (search/pick.py)
TTAS = ("none", "flip")
TTA_CHOICES = ("auto", *TTAS)
TTA_VIEWS = {"none": 1, "flip": 2}  # forward passes per prediction: what the FLOP and latency caps count
# compile="auto" tries torch.compile only with this much training left: a useless one costs a few percent
COMPILE_AUTO_MIN_S = 600.0  # (docs/benchmarks.md, "Compilation"); whether it is faster is measured then
# compile="on" needs this long in a timed run: a compilation cannot be stopped (runs by epochs always compile)
COMPILE_ON_MIN_S = 120.0
# budgetnet export: the formats, the CPUs an int8 model is quantised for (export.INT8_SCHEMES), and the
# gates: an fp32 export must agree with PyTorch on this share of top-1 answers, an int8 one may lose at most
# this much test top-1 against the fp32 graph (a default; --int8-max-drop sets it)
EXPORT_FORMATS = ("onnx", "torchscript")
INT8_TARGETS = ("auto", "x86", "x86-vnni", "arm")
EXPORT_MIN_AGREEMENT = 0.999
EXPORT_INT8_MAX_DROP = 0.02
EXPORT_CHECK_IMAGES = 1_000  # the seeded sample of test images each export is checked on
EXPORT_CALIBRATION_IMAGES = 300  # seeded training images that calibrate the int8 ranges


class ConfigError(ValueError):
    """A configuration value or key is invalid (a user mistake, reported in one line)."""


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


MAX_LAYERS = 2_000  # weight layers a config may describe (ResNet-1202, the deepest CIFAR net of He et al., fits):
# past it a typo (n_conv of 3,000,000) had the guard build layers on the meta device for minutes
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed


def _check_depth(cfg: ModelConfig) -> None:
    if cfg.min_layers() > MAX_LAYERS:
        raise ConfigError(f"a {cfg.family} config of {cfg.min_layers():,} layers or more is past the "
                          f"{MAX_LAYERS:,} any config may have")


def _check_positive(name: str, values) -> None:
    for v in values if isinstance(values, tuple) else (values,):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must hold positive integers, got {values!r}")


@dataclass(frozen=True)
class Shape:
    """What a model needs to know about its data: input channels, classes, image side in pixels."""

    channels: int
    num_classes: int
    image_size: int


@dataclass(frozen=True)
class ModelConfig:
    """Fields every model family shares. Subclasses set ``family``."""

    family: ClassVar[str] = ""
    activation: str = "relu"  # one of ACTIVATIONS
    init: str = "default"  # weight initialiser, one of INITS ("default" = PyTorch's own)
    dropout: float = 0.0  # dropout probability before the classifier
    # Output channels of every conv, in the order the model holds them (``model.modules()``); None = the
    # family's own widths. A pruned net has widths no pattern describes: ``budgetnet prune`` writes them
    # here and the builder honours them (``models.layers.ConvWidths``). Residual connections stay where
    # the family's own fields put them.
    conv_widths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("init", self.init, INITS)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.conv_widths is not None:
            _check_positive("conv_widths", self.conv_widths)

    def min_layers(self) -> int:
        """A lower bound on the weight layers (convs and linears) the config builds, from its numbers
        alone: a file whose state dict holds fewer tensors cannot be this model (checked before building)."""
        raise NotImplementedError


@dataclass(frozen=True)
class ResNetConfig(ModelConfig):
    """CIFAR ResNet (He et al. 2016, section 4.2): a 3x3 stem, three stages, global pool, linear head.

    ResNet-20/32/44/56 are ``depths=(n, n, n)`` with n = 3/5/7/9 and ``widths=(16, 32, 64)``. Shortcuts
    that change shape use the parameter-free "option A" (stride-2 subsample and zero-padded channels).
    """

    family: ClassVar[str] = "resnet"
    block: str = "basic"  # "basic" (two 3x3 convs) or "bottleneck" (1x1 -> 3x3 -> 1x1, expansion 4)
    depths: tuple[int, ...] = (3, 3, 3)  # residual blocks per stage
    widths: tuple[int, ...] = (16, 32, 64)  # channels per stage (bottleneck: inner width; output is 4x)
    stem_width: int = 16  # channels of the first 3x3 conv
    stem_bias: bool = True  # bias on the stem conv: the reference ResNet-20 count (275,588) includes these 16

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("block", self.block, ("basic", "bottleneck"))
        _check_positive("depths", self.depths)
        _check_positive("widths", self.widths)
        _check_positive("stem_width", self.stem_width)
        if len(self.depths) != len(self.widths):
            raise ConfigError("depths and widths must have one entry per stage")
        _check_depth(self)

    def min_layers(self) -> int:
        return 2 + sum(self.depths) * (2 if self.block == "basic" else 3)  # stem, blocks, head


@dataclass(frozen=True)
class PlainConfig(ModelConfig):
    """Plain ConvNet: ``[(conv -> [bn] -> act) x P -> pool] x (N/P) -> (fc -> act) x M -> fc``.

    Layer widths and kernel sizes follow patterns so that a handful of numbers describes a whole net
    (the form the reference reports swept by hand). The course report's 3-conv CIFAR-100 net is
    ``PlainConfig(n_conv=3, width=32, width_pattern="doubling", hidden=(420,), batch_norm=True)``.
    """

    family: ClassVar[str] = "plain"
    n_conv: int = 3  # N, conv layers in total
    convs_per_block: int = 1  # P, conv layers between two pools
    width: int = 32  # filters of the first conv layer
    width_pattern: str = "doubling"  # per layer: "equal", "doubling" or "halving"
    kernel: int = 3  # kernel size of the first conv layer (odd)
    kernel_pattern: str = "constant"  # per layer: "constant", "increasing" (+2) or "decreasing" (-2)
    hidden: tuple[int, ...] = (420,)  # widths of the M hidden fc layers
    batch_norm: bool = True  # BN after each conv (not after the fc layers)
    conv_bias: bool = True  # bias on convs (the reference nets keep it even with BN)
    pool: str = "max"  # "max" or "avg", 2x2 stride 2, skipped once the feature map is 1 pixel

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("n_conv", self.n_conv)
        _check_positive("convs_per_block", self.convs_per_block)
        _check_positive("width", self.width)
        _check_choice("width_pattern", self.width_pattern, ("equal", "doubling", "halving"))
        _check_choice("kernel_pattern", self.kernel_pattern, ("constant", "increasing", "decreasing"))
        _check_choice("pool", self.pool, ("max", "avg"))
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"kernel must be a positive odd integer, got {self.kernel}")
        if self.n_conv % self.convs_per_block:
            raise ConfigError("n_conv must be a multiple of convs_per_block")
        if self.hidden:
            _check_positive("hidden", self.hidden)
        if self.conv_widths is not None and len(self.conv_widths) != self.n_conv:
            raise ConfigError(f"conv_widths has {len(self.conv_widths)} entries for {self.n_conv} conv layers")
        _check_depth(self)

    def min_layers(self) -> int:
        return self.n_conv + len(self.hidden) + 1

    def layer_widths(self) -> tuple[int, ...]:
        """Output channels of every conv layer, from ``width`` and ``width_pattern`` (or ``conv_widths``)."""
        if self.conv_widths is not None:
            return self.conv_widths
        if self.width_pattern == "doubling":
            return tuple(self.width * 2**i for i in range(self.n_conv))
        if self.width_pattern == "halving":
            return tuple(max(1, self.width >> i) for i in range(self.n_conv))
        return (self.width,) * self.n_conv

    def layer_kernels(self) -> tuple[int, ...]:
        """Kernel size of every conv layer, from ``kernel`` and ``kernel_pattern``."""
        step = {"constant": 0, "increasing": 2, "decreasing": -2}[self.kernel_pattern]
        return tuple(max(1, self.kernel + step * i) for i in range(self.n_conv))


@dataclass(frozen=True)
class MobileNetConfig(ModelConfig):
    """Inverted-residual net (MobileNetV2-style, CIFAR strides): 1x1 expand -> depthwise kxk -> 1x1 project.

    A stage's first block may stride; blocks whose input and output match add a residual connection.
    """

    family: ClassVar[str] = "mobilenet"
    stem_width: int = 32  # channels of the stride-1 3x3 stem
    widths: tuple[int, ...] = (16, 24, 32, 64, 96)  # output channels per stage
    depths: tuple[int, ...] = (1, 2, 3, 3, 2)  # inverted-residual blocks per stage
    strides: tuple[int, ...] = (1, 1, 2, 2, 1)  # stride of each stage's first block
    expansion: int = 6  # hidden channels = expansion x input channels (first stage uses 1)
    kernel: int = 3  # depthwise kernel size (odd)
    head_width: int = 640  # channels of the final 1x1 conv before pooling (0 = none)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("stem_width", self.stem_width)
        _check_positive("widths", self.widths)
        _check_positive("depths", self.depths)
        _check_positive("expansion", self.expansion)
        if not (len(self.widths) == len(self.depths) == len(self.strides)):
            raise ConfigError("widths, depths and strides must have one entry per stage")
        if any(s not in (1, 2) for s in self.strides):
            raise ConfigError(f"strides must be 1 or 2, got {self.strides}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"kernel must be a positive odd integer, got {self.kernel}")
        if self.head_width < 0:
            raise ConfigError("head_width must be >= 0")
        _check_depth(self)

    def min_layers(self) -> int:
        return 2 + 2 * sum(self.depths)  # stem, head; each block has at least a depthwise and a projection


MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    c.family: c for c in (ResNetConfig, PlainConfig, MobileNetConfig)
}

OPTIMIZERS = ("sgd", "adamw")
MAX_EVAL_POINTS = 1_000  # validation evaluations a run may ask for (each scores the validation images)
EVAL_SUBSET = 2000  # validation images scored at intermediate marks (all of them at the last mark)
SCHEDULES = ("onecycle", "cosine", "linear", "step")
GRADUAL_SHARE = 0.2  # gradual: one more group unfrozen every this share of the run's progress
_FREEZE = re.compile(r"(none|head)|last:([1-9][0-9]*)|gradual(?::([0-9]*\.?[0-9]+(?:e-?[0-9]+)?))?")


def parse_freeze(text: str) -> tuple[str, float]:
    """A fine-tuning strategy (``budgetnet.finetune``): ``none``, ``head``, ``last:K`` (K >= 1 groups below
    the head train too), ``gradual[:SHARE]`` (0 < SHARE <= 1) -> (kind, K or SHARE; 0 for none and head)."""
    m = _FREEZE.fullmatch(str(text))
    share = float(m.group(3)) if m and m.group(3) else GRADUAL_SHARE
    if not m or not 0 < share <= 1:
        raise ConfigError(f"freeze={text!r} is not one of none, head, last:K (K >= 1), gradual[:SHARE] (0 < SHARE <= 1)")
    return (m.group(1), 0.0) if m.group(1) else ("last", float(m.group(2))) if m.group(2) else ("gradual", share)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule. The schedule is defined on progress p in [0, 1] of the run's own budget
    (seconds or epochs), so a run ends fully annealed exactly when its budget ends."""

    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adamw"
    lr: float = 0.1  # peak learning rate (per step, not scaled by batch size)
    momentum: float = 0.9  # SGD momentum, or AdamW beta1
    weight_decay: float = 5e-4  # L2 for SGD (coupled), decoupled for AdamW; not applied to BN/bias
    batch_size: int = 256  # images per step
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    warmup: float = 0.05  # fraction of progress spent in linear warm-up from 0
    schedule: str = "cosine"  # decay shape after warm-up: "onecycle", "cosine", "linear", "step"
    ema: float = 0.0  # EMA decay of weights per step (0 = off); evaluation then uses the average
    eval_points: int = 10  # validation evaluations per run, at equal progress steps
    distill: float = 0.0  # weight of a teacher's softened outputs in the loss (0 = labels only; needs a teacher)
    distill_temperature: float = 4.0  # softmax temperature of that term (Hinton et al.; 4 is the common choice)
    # fine-tuning only (a run from a checkpoint's weights): which groups train, the pretrained ones' lr factor
    freeze: str = "none"
    backbone_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        parse_freeze(self.freeze)
        if not 0 < self.backbone_lr_scale <= 1:
            raise ConfigError(f"backbone_lr_scale must be in (0, 1], got {self.backbone_lr_scale}")
        _check_choice("schedule", self.schedule, SCHEDULES)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        _check_positive("batch_size", self.batch_size)
        _check_positive("eval_points", self.eval_points)
        if self.eval_points > MAX_EVAL_POINTS:
            raise ConfigError(f"eval_points must be at most {MAX_EVAL_POINTS}, got {self.eval_points}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.distill <= 1:
            raise ConfigError(f"distill must be in [0, 1], got {self.distill}")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise ConfigError(f"distill_temperature must be a finite number > 0, got {self.distill_temperature}")


DATASETS = ("cifar100", "cifar10", "fashion_mnist", "synthetic")
FOLDER_PREFIX = "folder:"  # a dataset of one's own images: "folder:" + the absolute path of its root
FOLDER_IMAGE_SIZE = 32  # default side (pixels) a folder dataset's images are resized to
IMAGE_SIZE_RANGE = (8, 256)  # sides (pixels) a folder dataset may be resized to, both included


def is_folder(dataset: str) -> bool:
    """Whether ``dataset`` names an image folder (``folder:/abs/path``) rather than a built-in dataset."""
    return dataset.startswith(FOLDER_PREFIX)


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is split, and the on-device augmentation applied to training batches."""

    dataset: str = "cifar100"  # one of DATASETS, or "folder:" + an absolute path (an image folder)
    val_size: int | None = None  # images held out for validation; None = the dataset's default
    split_seed: int = 0  # seed of the train/validation split (shared by all trials, so they compare)
    crop_padding: int = 4  # random translate by up to this many pixels (zero padding); 0 = off
    flip: bool = True  # random horizontal flip
    cutout: int = 0  # side of a random zeroed square, in pixels; 0 = off
    image_size: int | None = None  # folder datasets only: pixels per side (None = FOLDER_IMAGE_SIZE)

    def __post_init__(self) -> None:
        if is_folder(self.dataset):
            if not self.dataset[len(FOLDER_PREFIX):].startswith("/"):
                raise ConfigError(f"dataset={self.dataset!r}: a folder dataset is stored with its absolute path")
            lo, hi = IMAGE_SIZE_RANGE
            if self.image_size is not None and not lo <= self.image_size <= hi:
                raise ConfigError(f"image_size must be between {lo} and {hi} pixels, got {self.image_size}")
        else:
            _check_choice("dataset", self.dataset, DATASETS)
            if self.image_size is not None:
                raise ConfigError(f"image_size applies to folder datasets only ({self.dataset} has its own size)")
        if (self.val_size is not None and self.val_size < 0) or self.crop_padding < 0 or self.cutout < 0:
            raise ConfigError("val_size, crop_padding and cutout must be >= 0")
        side = IMAGE_SIZE_RANGE[1]  # the largest image side of any dataset
        if self.crop_padding > side or self.cutout > side:
            raise ConfigError(f"crop_padding and cutout are pixels of an image side: at most {side}, got "
                              f"{self.crop_padding} and {self.cutout}")
        if not 0 <= self.split_seed <= MAX_SEED:
            raise ConfigError(f"split_seed must be from 0 to 2**63-1, got {self.split_seed}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run."""

    model: ModelConfig = field(default_factory=ResNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0  # seeds weights, batch order and augmentation

    # -- JSON round trip -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"family": self.model.family, **_plain(dataclasses.asdict(self.model))},
            "train": _plain(dataclasses.asdict(self.train)),
            "data": _plain(dataclasses.asdict(self.data)),
            "seed": self.seed,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        _reject_unknown("run config", d, {"model", "train", "data", "seed"})
        model_d = d.get("model", {"family": "resnet"})
        if not isinstance(model_d, dict):
            raise ConfigError("model must be a JSON object")
        model_d = dict(model_d)
        family = model_d.pop("family", None)
        if not isinstance(family, str) or family not in MODEL_CONFIGS:
            raise ConfigError(f"model.family={family!r} is not one of {', '.join(MODEL_CONFIGS)}")
        seed = d.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"seed must be an integer from 0 to 2**63-1, got {seed!r}")
        return cls(
            model=_build(MODEL_CONFIGS[family], model_d, "model"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
            data=_build(DataConfig, d.get("data", {}), "data"),
            seed=seed,
        )

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(d)

    def replace(self, **sections: Any) -> RunConfig:
        return dataclasses.replace(self, **sections)


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _reject_unknown(where: str, d: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def _build(cls: type, d: dict[str, Any], where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object")
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    _reject_unknown(where, d, fields)
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce(f"{where}.{name}", value, hints[name])
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a JSON value against a field's type; lists become tuples."""
    origin = get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item,) = {a for a in get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(name, v, item) for v in value)
    if origin is Union or origin is types.UnionType:  # Optional[X]: None or an X
        if value is None:
            return None
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return _coerce(name, value, inner)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value
