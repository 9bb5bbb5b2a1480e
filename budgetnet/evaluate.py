"""What a checkpoint really does on the official test split: accuracy, cost, latency, confusions."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from budgetnet.budget import count_flops, count_macs, count_params
from budgetnet.checkpoint import (
    CheckpointError,
    deployed_model,
    load_checkpoint,
    model_from_checkpoint,
    recorded_info,
)
from budgetnet.config import TTA_VIEWS, is_folder
from budgetnet.data import conform_images, load_test, normalizer
from budgetnet.device import DTYPES, memory_format, resolve_precision
from budgetnet.files import write_atomic
from budgetnet.finetune import described
from budgetnet.latency import deployment_latency, measure_latency, thread_label
from budgetnet.models.tta import deployed

GRID_IMAGES = 32  # test images in the prediction grid (4 rows of 8)
GRID_SEED = 0  # the same images every time, so grids of two checkpoints compare image by image


def inference_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The model with its weights cast once to ``precision`` (fp32: unchanged). Autocast would cast every
    weight again on every call, which is not what a deployed model pays; the inputs are cast per batch
    (``model_input``)."""
    return model if precision == "fp32" else model.to(dtype=DTYPES[precision])


def model_input(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype of the model's weights."""
    return x.to(next(model.parameters()).dtype)


@torch.no_grad()
def test_metrics(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize,
                 device: torch.device, num_classes: int, batch_size: int = 1024, tta: str = "none") -> dict:
    """Top-1, top-5, mean loss and the confusion matrix (rows: true class, columns: predicted) of the net
    ``model`` as deployed under ``tta`` (``models.tta``: "flip" averages the logits over each image and its
    mirror), in the precision of its weights; beside them ``top1_single`` and ``top1_flip``, the top-1 of
    one view and of the flip average, both always. With 5 classes or fewer top-5 is 100% by construction:
    it is None then."""
    loss_sum, top1, top5, top1_single, top1_flip = 0.0, 0, 0, 0, 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    k = min(5, num_classes)
    for i in range(0, len(labels), batch_size):
        x = normalize(images[i:i + batch_size])  # in the layout the normalizer was made for
        y = labels[i:i + batch_size]
        single = model(model_input(model, x)).float()
        mirrored = model(model_input(model, x.flip(3).contiguous(memory_format=_layout(x)))).float()
        averaged = (single + mirrored) / 2
        logits = averaged if tta == "flip" else single
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        predicted = logits.argmax(1)  # argmax everywhere: one tie-break, so one view's top-1 is top1 under none
        top1 += (predicted == y).sum().item()
        top5 += (logits.topk(k, dim=1).indices == y[:, None]).any(1).sum().item()
        top1_single += (single.argmax(1) == y).sum().item()
        top1_flip += (averaged.argmax(1) == y).sum().item()
        confusion += torch.bincount(y * num_classes + predicted, minlength=num_classes**2).view_as(confusion)
    n = len(labels)
    return {"top1": top1 / n, "top5": top5 / n if num_classes > 5 else None, "loss": loss_sum / n,
            "top1_single": top1_single / n, "top1_flip": top1_flip / n, "confusion": confusion.cpu()}


def class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Each class's test accuracy from the confusion matrix's rows; NaN for a class with no test image (a
    small folder's split can leave one without), which is then no class's worst and no part of a mean."""
    return confusion.diag().double() / confusion.sum(1).double()


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def checkpoint_latency(ckpt: dict, device: str | torch.device = "cpu", n_threads: int = 1) -> dict:
    """``latency.deployment_latency`` of a loaded checkpoint's model, rebuilt in fp32 on ``device``: the
    figure ``--max-latency-ms`` caps, for ``budgetnet evaluate`` and the search's final check alike."""
    device = torch.device(device)
    model = deployed_model(ckpt, device).to(memory_format=memory_format(device))
    return deployment_latency(model, recorded_info(ckpt).shape, device, n_threads)


def checkpoint_test_split(path: str | Path, ckpt: dict, data_dir, device: torch.device, *,
                          download: bool = False, dataset: str | None = None, train: bool = False):
    """The official test split of the data a loaded checkpoint was trained on, on ``device``, and its class
    names (``train``: its training split); ``dataset`` points a model trained on an image folder at that
    folder elsewhere. Raises CheckpointError when the data does not fit the model (other data, classes or
    input shape)."""
    info, name = recorded_info(ckpt), ckpt["run_config"].data.dataset
    if dataset is not None and dataset != name:
        if not (is_folder(dataset) and is_folder(name)):
            raise CheckpointError(f"{path} was trained on {name}, not {dataset}; only a folder dataset may be "
                                  f"pointed elsewhere (--dataset folder:PATH)")
        name = dataset
    test, classes = load_test(name, data_dir, device, download=download,
                              image_size=info.image_size if is_folder(name) else None, train=train)
    if list(classes) != list(ckpt["classes"]):
        raise CheckpointError(f"{path}: the test data's classes differ from the checkpoint's")
    if described(ckpt["extra"]) and test.images.shape[1] in (1, 3):  # fine-tuned on conformed images
        test.images = conform_images(test.images, info.channels, info.image_size)
    if tuple(test.images.shape[1:]) != (info.channels, info.image_size, info.image_size):
        raise CheckpointError(f"{path}: the test images are {list(test.images.shape[1:])}, the checkpoint's "
                              f"input is {[info.channels, info.image_size, info.image_size]}")
    return test, classes


def evaluate_checkpoint(path: str | Path, data_dir=None, device: str | torch.device = "cpu", *,
                        plots: str | Path | None = None, latency_repeats: int = 20,
                        download: bool = False, precision: str = "auto", dataset: str | None = None,
                        latency_device: str | torch.device = "cpu", latency_threads: int = 1) -> dict:
    """Evaluate a checkpoint on its dataset's test split. Raises CheckpointError for a bad file.

    The model's input shape and normalisation are the ones the file recorded. ``dataset`` points a model
    trained on an image folder at that folder elsewhere (``folder:PATH``); by default the checkpoint's own.
    Accuracy and latency are measured in ``precision`` ("auto": the device's best, as for training), with
    the weights cast once; the report says which, and what the checkpoint was trained in.
    ``deployment_latency`` is the latency the search's ``--max-latency-ms`` caps, measured the same way
    (``latency.deployment_latency``: batch 1, fp32, on ``latency_device`` with ``latency_threads``)."""
    device = torch.device(device)
    ckpt = load_checkpoint(path)
    cfg = ckpt["run_config"]
    info = recorded_info(ckpt)
    precision = resolve_precision(device, precision)
    net = inference_model(model_from_checkpoint(ckpt, device).to(memory_format=memory_format(device)), precision)
    model = deployed(net, ckpt["tta"])  # what the latency and the prediction grid see
    test, classes = checkpoint_test_split(path, ckpt, data_dir, device, download=download, dataset=dataset)
    normalize = normalizer(info, device, memory_format(device))
    m = test_metrics(net, test.images, test.labels, normalize, device, len(classes), tta=ckpt["tta"])
    confusion = m.pop("confusion")
    per_class = class_accuracy(confusion).tolist()
    worst = sorted((c for c in range(len(classes)) if not math.isnan(per_class[c])), key=lambda c: per_class[c])[:5]
    off_diag = confusion.clone().fill_diagonal_(0)
    pairs = torch.topk(off_diag.flatten(), min(5, off_diag.numel())).indices.tolist()
    n_params = count_params(cfg.model, info.shape)
    report = {
        "checkpoint": str(path),
        "checkpoint_sha256": ckpt["sha256"],  # of the bytes evaluated, whatever has replaced the file since
        "fine_tuned": described(ckpt["extra"]),  # "fine-tuned from <source> (<strategy>)", or None
        "dataset": dataset or cfg.data.dataset,
        "test_images": len(test),
        **m,
        "n_params": n_params,
        "n_params_recorded": ckpt["n_params"],
        "n_params_match": n_params == ckpt["n_params"],
        "tta": ckpt["tta"],  # "flip": every figure is the flip average's, two forward passes an image
        "flops": count_flops(cfg.model, info.shape) * TTA_VIEWS[ckpt["tta"]],
        "macs": count_macs(cfg.model, info.shape) * TTA_VIEWS[ckpt["tta"]],  # what --max-flops caps
        "device": str(device),
        "precision": precision,
        "trained_precision": ckpt.get("precision", "unknown"),  # files written before it was recorded: unknown
        # flip averaging shows a model mirrored images; one trained without flips has never seen any
        "trained_with_flips": bool(cfg.data.flip),
        "latency": [measure_latency(model, (info.channels, info.image_size, info.image_size), device, bs,
                                    repeats=latency_repeats) for bs in (1, 256)],
        "deployment_latency": checkpoint_latency(ckpt, latency_device, latency_threads),
        "worst_classes": [{"class": classes[c], "accuracy": per_class[c]} for c in worst],
        "classes_without_test_images": [classes[c] for c in range(len(classes)) if math.isnan(per_class[c])],
        "top_confusions": [{"true": classes[i // len(classes)], "predicted": classes[i % len(classes)],
                            "count": int(off_diag.flatten()[i])} for i in pairs if off_diag.flatten()[i] > 0],
        "train_seconds": ckpt["train_seconds"],
        "recorded_metrics": ckpt["metrics"],
    }
    if plots is not None:
        report["confusion_png"] = str(plot_confusion(confusion, classes, Path(plots) / "confusion.png"))
        idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(GRID_SEED))[:GRID_IMAGES]
        idx = idx.sort().values.to(device)
        images, labels = test.images[idx], test.labels[idx]
        with torch.no_grad():
            x = normalize(images.contiguous(memory_format=memory_format(device)))
            predicted = model(model_input(model, x)).argmax(1)
        report["predictions_png"] = str(plot_predictions(images, labels, predicted, classes,
                                                         Path(plots) / "predictions.png"))
    return report


def evaluation_path(checkpoint: str | Path) -> Path:
    """Where ``budgetnet evaluate`` keeps its last report of ``checkpoint``: ``best.pt`` -> ``best.eval.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".eval.json")


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 (hex): ties a saved report to the exact bytes it evaluated."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()  # a checkpoint under the cap: a few MB


def save_evaluation(report: dict) -> Path:
    """Write ``report`` beside its checkpoint (``evaluation_path``), atomically. It carries the SHA-256 of
    the bytes it evaluated, so that ``budgetnet report`` shows its test accuracy only while the file is
    those bytes."""
    return write_atomic(evaluation_path(report["checkpoint"]), lambda f: f.write(json.dumps(report, indent=2).encode()))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: torch.Tensor, classes: list[str], out: Path) -> Path:
    """Row-normalised confusion matrix as a PNG, with each class's test accuracy as a bar beside its row."""
    plt = _pyplot()
    out.parent.mkdir(parents=True, exist_ok=True)
    norm = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1).float()
    per_class = class_accuracy(confusion).numpy()  # NaN: no test image (no bar, left out of the mean)
    n = len(classes)
    size = max(6.0, min(24.0, n * 0.22))
    fig, (ax, bars) = plt.subplots(1, 2, sharey=True, figsize=(size * 1.3, size), layout="constrained",
                                   gridspec_kw={"width_ratios": [4, 1]})
    im = ax.imshow(norm.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")  # rows as tall as the bars
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (row-normalised)")
    fig.colorbar(im, ax=[ax, bars], fraction=0.04, label="share of the true class's images")
    # Bars on the rows' own y positions: a class's accuracy sits beside its row of confusions.
    shown = np.nan_to_num(per_class)
    mean = float(np.nanmean(per_class)) if not np.isnan(per_class).all() else 0.0
    bars.barh(range(n), shown, height=0.8, color=plt.cm.viridis(shown))
    bars.axvline(mean, color="grey", linestyle="--", linewidth=1)
    if n <= 30:
        for y, acc in enumerate(per_class):
            bars.text(0.02, y, "no test images" if np.isnan(acc) else f"{acc:.0%}", va="center", fontsize=8,
                      color="black" if np.isnan(acc) or acc > 0.5 else "white")
    bars.set_xlim(0, 1)
    bars.set_xlabel("accuracy")
    bars.set_title(f"per class\n(mean {mean:.0%}, dashed)")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_predictions(images: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor, classes: list[str],
                     out: Path, columns: int = 8) -> Path:
    """A grid of test images (uint8, N x C x H x W) titled with their predicted class; a mistake is framed
    and titled in red, with the true class under the prediction."""
    plt = _pyplot()
    out.parent.mkdir(parents=True, exist_ok=True)
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()  # N x H x W x C, as imshow wants it
    labels, predicted = labels.cpu().tolist(), predicted.cpu().tolist()
    rows = max(1, -(-len(labels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.5, rows * 1.8), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for ax, img, true, pred in zip(axes.flat, pixels, labels, predicted):
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        wrong = pred != true
        ax.set_title(f"{classes[pred]}\n(true: {classes[true]})" if wrong else classes[pred], fontsize=7,
                     color="red" if wrong else "black")
        if wrong:
            ax.set_frame_on(True)
            for spine in ax.spines.values():
                spine.set_color("red")
                spine.set_linewidth(2.5)
    mistakes = sum(p != t for p, t in zip(predicted, labels))
    fig.suptitle(f"predictions on {len(labels)} test images: {mistakes} wrong (red, true class below)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def format_report(r: dict) -> str:
    """Human-readable summary of ``evaluate_checkpoint``'s report."""
    lines = [
        f"{r['checkpoint']}  ({r['dataset']} test, {r['test_images']:,} images)",
        f"  top-1 {r['top1']:.2%}   " + (f"top-5 {r['top5']:.2%}   " if r["top5"] is not None else "")
        + f"loss {r['loss']:.4f}   "
        + (f"(predicts the flip average; one view's top-1 {r['top1_single']:.2%})" if r.get("tta") == "flip" else
           f"(flip-averaged top-1 {r['top1_flip']:.2%}"
           + ("" if r.get("trained_with_flips", True) else "; trained without flips, so mirrored images are new to it")
           + ")"),
        f"  params {r['n_params']:,} ({'matches' if r['n_params_match'] else 'DIFFERS FROM'} the file's "
        f"{r['n_params_recorded']:,})   FLOPs/image {r['flops'] / 1e6:.1f} M ({r['flops'] / 2e6:.1f} M MACs)",
        f"  evaluated in {r['precision']} (trained in {r['trained_precision']})",
    ]
    if r.get("fine_tuned"):
        lines.insert(1, f"  {r['fine_tuned']}")
    for lat in r["latency"]:
        lines.append(f"  batch {lat['batch_size']:>3} on {r['device']} in {r['precision']}: {lat['latency_ms']:.2f} ms, "
                     f"{lat['images_per_s']:,.0f} images/s")
    dep = r.get("deployment_latency")
    if dep:  # the figure --max-latency-ms caps
        lines.append(f"  deployment latency (batch 1, fp32, {dep['device']}, {thread_label(dep['threads'])}): "
                     f"{dep['latency_ms']:.2f} ms, median of {dep['repeats']}")
    lines.append("  worst classes: " + ", ".join(f"{w['class']} {w['accuracy']:.0%}" for w in r["worst_classes"]))
    if r.get("classes_without_test_images"):
        lines.append("  no test images: " + ", ".join(r["classes_without_test_images"]))
    if r["top_confusions"]:
        lines.append("  most confused: " + ", ".join(
            f"{c['true']}->{c['predicted']} ({c['count']})" for c in r["top_confusions"][:3]))
    if "confusion_png" in r:
        lines.append(f"  confusion matrix and per-class accuracy: {r['confusion_png']}")
        lines.append(f"  prediction grid: {r['predictions_png']}")
    return "\n".join(lines)
