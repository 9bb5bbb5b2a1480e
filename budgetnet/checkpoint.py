"""Self-describing checkpoints: a checkpoint alone rebuilds its model.

The file is a plain dict of strings, numbers, lists and tensors, so ``torch.load(weights_only=True)``
reads it and nothing in it is a pickled Python object. It is written to a temporary file in the same
folder and renamed into place, so a crash never leaves a half-written ``best.pt``.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from budgetnet import __version__
from budgetnet.config import TTAS, ConfigError, RunConfig
from budgetnet.datasets.info import DatasetInfo
from budgetnet.datasets.read import dataset_info
from budgetnet.errors import first_line
from budgetnet.files import write_atomic

FORMAT = "budgetnet-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """The file is not a readable budgetnet checkpoint (a user mistake: one clear line)."""


def save_checkpoint(path: str | os.PathLike, cfg: RunConfig, state_dict: dict, *, metrics: dict,
                    n_params: int, flops: int, classes: list[str], train_seconds: float,
                    precision: str, extra: dict | None = None, info: DatasetInfo | None = None,
                    tta: str = "none") -> Path:
    """Write a checkpoint atomically (temp file + rename) and return its path. ``precision`` is what the
    weights were trained in (fp32, bf16 or fp16 autocast); they are stored in fp32 either way. The input
    shape and normalisation are the dataset's (``dataset_info``), so a folder dataset's own mean, std and
    size travel with the model. ``info``: the ``DatasetInfo`` of the data it trained on, when the caller
    holds it (a folder dataset is not scanned again). ``tta``: how the model predicts (``models.tta``);
    ``flops`` counts every view it runs."""
    if tta not in TTAS:
        raise ValueError(f"tta={tta!r} is not one of {', '.join(TTAS)}")
    info = info or dataset_info(cfg.data.dataset, cfg.data.image_size)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_json(indent=None),
        "state_dict": state_dict,
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        "n_params": int(n_params),
        "flops": int(flops),
        "dataset": cfg.data.dataset,
        "classes": list(classes),
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
        "input_shape": [info.channels, info.image_size, info.image_size],
        "train_seconds": float(train_seconds),
        "precision": str(precision),
        "tta": tta,
        "versions": {"budgetnet": __version__, "torch": str(torch.__version__)},  # str: TorchVersion is a class
        "extra": dict(extra or {}),
    }
    return write_atomic(path, lambda f: torch.save(payload, f))


REQUIRED = {"state_dict": dict, "metrics": dict, "n_params": int, "flops": int, "train_seconds": float,
            "extra": dict}  # what every reader of a checkpoint relies on, beside its config and its input


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint; adds ``run_config`` (a RunConfig) and ``sha256``, the hash of the
    very bytes read (a search may replace the file while it is evaluated). Raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        raw = path.read_bytes()  # a model under the cap is a few MB: read once, hashed and loaded alike
        ckpt = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle with code in it: all refused here
        raise CheckpointError(f"{path}: not a readable budgetnet checkpoint ({first_line(e, 160)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a budgetnet checkpoint (no '{FORMAT}' marker)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('format_version')} is not "
                              f"supported (this budgetnet reads version {FORMAT_VERSION})")
    try:
        ckpt["run_config"] = RunConfig.from_json(ckpt["config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: checkpoint config is invalid ({e})") from None
    for key, kind in REQUIRED.items():
        if not isinstance(ckpt.get(key), kind if kind is not float else (int, float)):
            raise CheckpointError(f"{path}: checkpoint has no valid {key!r}")
    ckpt.setdefault("tta", "none")  # files written before it was recorded predict with one view
    if ckpt["tta"] not in TTAS:
        raise CheckpointError(f"{path}: checkpoint's tta {ckpt['tta']!r} is not one of {', '.join(TTAS)}")
    ckpt["sha256"] = hashlib.sha256(raw).hexdigest()
    return ckpt


def recorded_info(ckpt: dict) -> DatasetInfo:
    """The data a loaded checkpoint was trained on, as the file recorded it: input shape, class count,
    normalisation. What rebuilding and evaluating the model use, so a folder model needs no dataset to be
    rebuilt. Raises CheckpointError for a record that does not hold together."""
    try:
        c, h, w = (int(v) for v in ckpt["input_shape"])
        mean = tuple(float(v) for v in ckpt["normalization"]["mean"])
        std = tuple(float(v) for v in ckpt["normalization"]["std"])
        n_classes = len(ckpt["classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint has no valid input shape, normalization or classes ({e})") from None
    if not (c >= 1 and h == w >= 1 and len(mean) == len(std) == c and all(s > 0 for s in std) and n_classes >= 1):
        raise CheckpointError(f"checkpoint records an inconsistent input: shape {[c, h, w]}, {len(mean)} means, "
                              f"{len(std)} stds, {n_classes} classes")
    return DatasetInfo(str(ckpt.get("dataset", "")), c, n_classes, h, 0, 0, mean, std)


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model a loaded checkpoint describes and load its weights (strictly)."""
    from budgetnet.models import build_model

    cfg: RunConfig = ckpt["run_config"]
    shape = recorded_info(ckpt).shape
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError("checkpoint has no state dict")
    # Refused from the config's numbers alone, before a layer is built: building a net whose config claims
    # more layers than the file holds tensors would take time in proportion to the claim, not to the file.
    if cfg.model.min_layers() > len(state):
        raise CheckpointError(f"checkpoint weights do not match its config: it claims at least "
                              f"{cfg.model.min_layers():,} layers, the file holds {len(state):,} tensors")
    # Built on the meta device and given the file's tensors (assign): a config that does not match them,
    # however large it claims to be, is refused before any memory is allocated, and nothing is initialised
    # only to be overwritten.
    try:
        with torch.device("meta"):
            model = build_model(cfg.model, shape)
        model.load_state_dict(state, strict=True, assign=True)
    except ConfigError as e:  # per-conv widths (conv_widths) that do not fit the net they describe
        raise CheckpointError(f"checkpoint config is invalid ({e})") from None
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint weights do not match its config: {first_line(e, None)}") from None
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"checkpoint weights do not match its config: no values for {', '.join(left[:3])}")
    return model.to(device).eval()


def deployed_model(ckpt: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model as the checkpoint deploys it: its net (``model_from_checkpoint``) under its recorded
    test-time augmentation. What evaluation's latency, the final cap check and export measure."""
    from budgetnet.models.tta import deployed

    return deployed(model_from_checkpoint(ckpt, device), ckpt["tta"])
