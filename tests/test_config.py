"""RunConfig: strict JSON round trip, unknown keys, types and choices are rejected with ConfigError."""

from __future__ import annotations

import json

import pytest

from budgetnet.config import (
    MODEL_CONFIGS,
    ConfigError,
    DataConfig,
    MobileNetConfig,
    PlainConfig,
    ResNetConfig,
    RunConfig,
    TrainConfig,
)

NON_DEFAULT_MODELS = [
    ResNetConfig(block="bottleneck", depths=(2, 1), widths=(8, 24), stem_width=12, stem_bias=False,
                 activation="mish", init="orthogonal", dropout=0.25),
    PlainConfig(n_conv=4, convs_per_block=2, width=24, width_pattern="halving", kernel=5,
                kernel_pattern="decreasing", hidden=(64, 32), batch_norm=False, conv_bias=False, pool="avg",
                activation="prelu", init="xavier", dropout=0.5),
    PlainConfig(hidden=()),  # an empty tuple must survive too
    MobileNetConfig(stem_width=8, widths=(8, 16), depths=(1, 2), strides=(2, 1), expansion=3, kernel=5,
                    head_width=0, activation="silu", init="kaiming"),
]
NON_DEFAULT_TRAIN = TrainConfig(optimizer="adamw", lr=3e-3, momentum=0.85, weight_decay=0.05, batch_size=96,
                                label_smoothing=0.0, warmup=0.2, schedule="onecycle", ema=0.999, eval_points=4)
NON_DEFAULT_DATA = DataConfig(dataset="fashion_mnist", val_size=123, split_seed=7, crop_padding=2, flip=False,
                              cutout=8)


def test_every_family_has_a_config_class():
    assert set(MODEL_CONFIGS) == {"resnet", "plain", "mobilenet"}
    for family, cls in MODEL_CONFIGS.items():
        assert cls.family == family


@pytest.mark.parametrize("model_cls", [ResNetConfig, PlainConfig, MobileNetConfig])
def test_round_trip_defaults(model_cls):
    cfg = RunConfig(model=model_cls())
    text = cfg.to_json()
    back = RunConfig.from_json(text)
    assert back == cfg
    assert type(back.model) is model_cls
    assert json.loads(text)["model"]["family"] == model_cls.family
    assert back.to_json() == text  # stable


@pytest.mark.parametrize("model", NON_DEFAULT_MODELS, ids=lambda m: f"{m.family}")
def test_round_trip_non_defaults(model):
    cfg = RunConfig(model=model, train=NON_DEFAULT_TRAIN, data=NON_DEFAULT_DATA, seed=42)
    back = RunConfig.from_json(cfg.to_json(indent=None))
    assert back == cfg
    assert hash(back) == hash(cfg)  # usable as a cache key (count_params is lru_cached on it)
    assert back.model.family == model.family
    # everything that was a tuple comes back as a tuple (not a list)
    for name, value in vars(model).items():
        if isinstance(value, tuple):
            assert isinstance(getattr(back.model, name), tuple), name


def test_to_dict_is_plain_json():
    d = RunConfig(model=PlainConfig(hidden=(420, 10))).to_dict()
    assert d["model"]["hidden"] == [420, 10]  # lists in JSON
    assert d["model"]["family"] == "plain"
    assert set(d) == {"model", "train", "data", "seed"}
    assert json.loads(json.dumps(d)) == d


def test_lists_become_tuples():
    cfg = RunConfig.from_dict({"model": {"family": "resnet", "depths": [1, 2], "widths": [4, 8]}})
    assert cfg.model.depths == (1, 2) and isinstance(cfg.model.depths, tuple)
    assert cfg.model.widths == (4, 8) and isinstance(cfg.model.widths, tuple)
    cfg = RunConfig.from_dict({"model": {"family": "plain", "hidden": []}})
    assert cfg.model.hidden == () and isinstance(cfg.model.hidden, tuple)
    hash(cfg)  # hashable only if every list became a tuple


def test_missing_sections_take_defaults():
    assert RunConfig.from_dict({}) == RunConfig()
    assert RunConfig.from_dict({"model": {"family": "plain"}}).model == PlainConfig()
    assert RunConfig.from_dict({"data": {"dataset": "synthetic"}}).data == DataConfig(dataset="synthetic")


def test_int_accepted_for_float_field():
    cfg = RunConfig.from_dict({"train": {"lr": 1, "weight_decay": 0}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_optional_val_size():
    assert RunConfig.from_dict({"data": {"val_size": None}}).data.val_size is None
    assert RunConfig.from_dict({"data": {"val_size": 10}}).data.val_size == 10
    with pytest.raises(ConfigError):
        RunConfig.from_dict({"data": {"val_size": "10"}})


@pytest.mark.parametrize("d, key", [
    ({"modle": {}}, "modle"),
    ({"seed": 1, "epochs": 3}, "epochs"),
    ({"model": {"family": "resnet", "widht": [1, 2, 3]}}, "widht"),
    ({"model": {"family": "plain", "depths": [3, 3, 3]}}, "depths"),  # a ResNet key on a plain net
    ({"model": {"family": "mobilenet", "hidden": [10]}}, "hidden"),
    ({"train": {"learning_rate": 0.1}}, "learning_rate"),
    ({"data": {"datset": "cifar10"}}, "datset"),
])
def test_unknown_keys_rejected(d, key):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_dict(d)
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_json(json.dumps(d))


@pytest.mark.parametrize("d", [
    {"seed": "1"},
    {"seed": 1.5},
    {"seed": True},
    {"train": {"lr": "0.1"}},
    {"train": {"lr": True}},
    {"train": {"batch_size": 12.5}},
    {"train": {"batch_size": False}},
    {"train": {"optimizer": 1}},
    {"data": {"flip": 1}},
    {"data": {"flip": "yes"}},
    {"data": {"crop_padding": 4.0}},
    {"model": {"family": "resnet", "depths": 3}},
    {"model": {"family": "resnet", "depths": [3, "3", 3]}},
    {"model": {"family": "resnet", "depths": [3, 3.0, 3]}},
    {"model": {"family": "resnet", "stem_bias": 0}},
    {"model": {"family": "plain", "hidden": 420}},
    {"model": {"family": "plain", "batch_norm": "true"}},
    {"model": {"family": "mobilenet", "strides": [1, True]}},
    {"train": [0.1]},
    {"data": "synthetic"},
])
def test_wrong_types_rejected(d):
    with pytest.raises(ConfigError):
        RunConfig.from_dict(d)


@pytest.mark.parametrize("model", ["resnet", None, 3, [["family", "plain"]]], ids=repr)
def test_non_object_model_section_rejected(model):
    with pytest.raises(ConfigError):
        RunConfig.from_dict({"model": model})


@pytest.mark.parametrize("d", [
    {"model": {"family": "vgg"}},
    {"model": {}},  # no family
    {"model": {"family": "resnet", "activation": "tanh"}},
    {"model": {"family": "resnet", "init": "uniform"}},
    {"model": {"family": "resnet", "block": "wide"}},
    {"model": {"family": "resnet", "depths": [3, 3], "widths": [16, 32, 64]}},
    {"model": {"family": "resnet", "widths": [16, 0, 64]}},
    {"model": {"family": "resnet", "dropout": 1.0}},
    {"model": {"family": "plain", "width_pattern": "tripling"}},
    {"model": {"family": "plain", "kernel_pattern": "random"}},
    {"model": {"family": "plain", "pool": "min"}},
    {"model": {"family": "plain", "kernel": 4}},
    {"model": {"family": "plain", "n_conv": 3, "convs_per_block": 2}},
    {"model": {"family": "mobilenet", "strides": [1, 3, 2, 2, 1]}},
    {"model": {"family": "mobilenet", "widths": [16, 24]}},
    {"model": {"family": "mobilenet", "head_width": -1}},
    {"train": {"optimizer": "adam"}},
    {"train": {"schedule": "exponential"}},
    {"train": {"lr": 0}},
    {"train": {"warmup": 1.0}},
    {"train": {"ema": -0.1}},
    {"train": {"eval_points": 0}},
    {"data": {"dataset": "imagenet"}},
    {"data": {"cutout": -1}},
    # past what any run could use: each had ended in a traceback, a hang or a 10^12-entry list
    {"model": {"family": ["plain"]}},
    {"model": {"family": {"plain": 1}}},
    {"data": {"split_seed": -1}},
    {"seed": -1},
    {"seed": 2**64},
    {"data": {"cutout": 10**20}},
    {"data": {"crop_padding": 257}},
    {"train": {"eval_points": 10**12}},
    {"model": {"family": "plain", "n_conv": 3_000_000, "convs_per_block": 3_000_000, "hidden": []}},
    {"model": {"family": "resnet", "depths": [1000, 1000, 1000]}},
    {"model": {"family": "mobilenet", "depths": [1, 2, 3, 3, 10**6]}},
])
def test_bad_values_rejected(d):
    with pytest.raises(ConfigError):
        RunConfig.from_dict(d)


def test_error_names_the_section():
    with pytest.raises(ConfigError, match=r"^model: activation='tanh'"):
        RunConfig.from_dict({"model": {"family": "resnet", "activation": "tanh"}})
    with pytest.raises(ConfigError, match=r"train\.lr"):
        RunConfig.from_dict({"train": {"lr": "fast"}})


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError):
        PlainConfig(kernel=2)
    with pytest.raises(ConfigError):
        TrainConfig(schedule="nope")
    with pytest.raises(ConfigError):
        DataConfig(crop_padding=-1)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", "3", '"cfg"'])
def test_from_json_rejects_non_objects(text):
    with pytest.raises(ConfigError):
        RunConfig.from_json(text)


def test_configs_are_frozen():
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.model.widths = (1, 2, 3)  # type: ignore[misc]
    assert cfg.replace(seed=3).seed == 3 and cfg.seed == 0


@pytest.mark.parametrize("train", [{"momentum": -0.1}, {"optimizer": "adamw", "momentum": 1.0},
                                   {"weight_decay": -1.0}, {"lr": float("inf")}], ids=repr)
def test_train_numbers_validated(train):
    with pytest.raises(ConfigError):
        RunConfig.from_dict({"train": train})


def test_the_deepest_reference_net_still_fits_the_layer_bound():
    from budgetnet.config import MAX_LAYERS

    resnet1202 = ResNetConfig(depths=(200, 200, 200))  # He et al.'s CIFAR ResNet-1202
    assert resnet1202.min_layers() == 1202 <= MAX_LAYERS
