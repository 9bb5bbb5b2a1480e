"""The ``budgetnet`` flags: one function per command's flags, and the parsers of their values.

Nothing here imports torch (seconds): --help and a flag's mistake answer at once.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from budgetnet import __version__
from budgetnet.config import (
    COMPILE_AUTO_MIN_S,
    COMPILE_MODES,
    COMPILE_ON_MIN_S,
    DATASETS,
    EXPORT_CALIBRATION_IMAGES,
    EXPORT_CHECK_IMAGES,
    EXPORT_FORMATS,
    EXPORT_INT8_MAX_DROP,
    EXPORT_MIN_AGREEMENT,
    FOLDER_IMAGE_SIZE,
    FOLDER_PREFIX,
    GRADUAL_SHARE,
    IMAGE_SIZE_RANGE,
    INT8_TARGETS,
    PRECISIONS,
    TTA_CHOICES,
    ConfigError,
    parse_freeze,
)
from budgetnet.search.clock import (
    AUTO_SEARCH_MAX,
    AUTO_SEARCH_MIN,
    MIN_SLICE_S,
    MIN_TRIALS,
    STAGNANT_TRIALS,
    TRIALS_PER_SEARCH,
)
from budgetnet.search.pick import MAX_FINALISTS, PICKS, RACE_SHARE

DEFAULT_STORAGE = "sqlite:///studies/budgetnet.db"
DEFAULT_ARTIFACTS = "studies/artifacts"


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise UserError(f"{message} (see '{self.prog} --help')")


def parse_count(text: str) -> float:
    """'1e6', '1M', '250k', '1,000,000' -> a positive number."""
    m = re.fullmatch(r"\s*([0-9][0-9_,]*\.?[0-9]*(?:e[+-]?[0-9]+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (try 1e6, 1M or 250k)")
    value = float(m.group(1).replace(",", "").replace("_", "")) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[
        m.group(2).lower()]
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _number(text: str, ok, wanted: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
    return value


MAX_WORKERS = 1_024  # local worker processes (each imports torch and holds its share of the device)
MAX_SAMPLER_SEED = 2**32 - 1 - MAX_WORKERS  # numpy's seeds end at 2**32-1; worker k samples with seed + k


def worker_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_WORKERS}, got {text!r}")
    return value


def _whole(text: str, lo: int, hi: int, what: str) -> int:
    """A whole number from ``lo`` to ``hi``, both included (``what`` names it in the error)."""
    if not text.strip().isdigit() or not lo <= int(text) <= hi:
        raise argparse.ArgumentTypeError(f"must be {what} from {lo} to {hi}, got {text!r}")
    return int(text)


def sampler_seed(text: str) -> int:
    return _whole(text, 0, MAX_SAMPLER_SEED, "a whole number")


def port_number(text: str) -> int:
    return _whole(text, 1, 65535, "a TCP port")


def positive_float(text: str) -> float:
    return _number(text, lambda v: v > 0, "a positive number")


MAX_HOURS = 8_760.0  # a year: a budget must stay a finite number of seconds (1e308 hours were inf)


def hours(text: str) -> float:
    return _number(text, lambda v: 0 < v <= MAX_HOURS, f"more than 0 and at most {MAX_HOURS:,.0f} (a year)")


def positive_int(text: str) -> int:
    value = _number(text, lambda v: v >= 1 and v == int(v), "a whole number of at least 1")
    return int(value)


def fraction(text: str) -> float:
    return _number(text, lambda v: 0 <= v < 1, "between 0 and 1 (1 excluded)")


def final_share(text: str) -> float | str:
    return "auto" if text.strip().lower() == "auto" else fraction(text)


def dataset_name(text: str) -> str:
    """The dataset as users type it: fashion_mnist, fashion-mnist, FashionMNIST, CIFAR-100, ..., or
    folder:PATH (an image folder; PATH is made absolute, so the name means the same from any folder)."""
    if text.lower().startswith(FOLDER_PREFIX):
        path = text[len(FOLDER_PREFIX):]
        if not path.strip():
            raise argparse.ArgumentTypeError("folder: needs a path, e.g. folder:~/photos")
        return FOLDER_PREFIX + str(Path(path).expanduser().absolute())
    key = re.sub(r"[-_\s]", "", text.lower())
    for name in DATASETS:
        if name.replace("_", "") == key:
            return name
    raise argparse.ArgumentTypeError(f"unknown dataset {text!r} (choose from {', '.join(DATASETS)}, "
                                     f"or folder:PATH for a folder of class folders of images)")


def image_size(text: str) -> int:
    """--image-size: a side in pixels within config.IMAGE_SIZE_RANGE."""
    return _whole(text, *IMAGE_SIZE_RANGE, "a whole number of pixels")


def freeze_strategy(text: str) -> str:
    """--freeze: none, head, last:K or gradual[:SHARE] (``config.parse_freeze``)."""
    try:
        parse_freeze(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).replace("freeze=", "")) from None
    return text


def _init_flags(sp, what: str) -> None:
    """--init and --normalise-with, for the commands that can start from a checkpoint."""
    sp.add_argument("--init", default=None, metavar="CKPT",
                    help=f"start from this budgetnet checkpoint (read with weights_only=True): {what}. A new "
                    "classifier head where the data's classes differ; grayscale images are repeated into an RGB "
                    "net, RGB ones turned to luminance for a grayscale net, and every image resized to the "
                    "checkpoint's side")
    sp.add_argument("--normalise-with", choices=("checkpoint", "data"), default="checkpoint",
                    help="--init: normalise the new images with the checkpoint's mean and std (default), or "
                    "with the new data's own")


def _compile_flag(sp, what=""):
    """--compile, for the commands that train (``what`` names what is compiled in its help)."""
    sp.add_argument("--compile", nargs="?", const="on", choices=COMPILE_MODES, default="auto",
                    help=f"train {what}through torch.compile. auto (default): only a run on a GPU with at "
                    f"least {COMPILE_AUTO_MIN_S:.0f} s of training left tries it, after timing its eager steps, and "
                    "keeps the compiled model only if its steps then time faster; on (or --compile alone): "
                    f"every run by epochs, and every run of at least {COMPILE_ON_MIN_S:.0f} s (a compilation "
                    "cannot be stopped); off: never. Compiling is paid out of the run's time")


def _data_flags(sp):
    """Where the data is and what trains on it: --data-dir, --download, --device, --precision."""
    sp.add_argument("--data-dir", default=None, help="folder holding the dataset in torchvision's layout "
                    "(default ./data; Fashion-MNIST also looks in /usr/share/datasets/fashion-mnist)")
    sp.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                    help="fetch a missing CIFAR/Fashion-MNIST into --data-dir through torchvision (off by "
                    "default: budgetnet makes no network access unless asked; a missing dataset is one "
                    "line naming the expected path)")
    sp.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    sp.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="auto (default) decides on this machine: on a GPU its low precision (bf16 from compute "
                    "capability 8.0, fp16 with loss scaling on 7.x), and on a CPU bf16 where it is native, each "
                    "only where a training step measured there runs at least 1.15x faster than fp32; fp32, bf16 "
                    "or fp16 force one")


MAX_FLOPS_HELP = ("cap on the multiply-accumulates (MACs) of one image's forward pass, as papers quote "
                  "'FLOPs' (budgetnet's FLOP counts are 2 per MAC), e.g. 20M or 1.5e7; checked exactly on the "
                  "meta device before anything is built (default: none)")


def _cap_flags(sp) -> None:
    """The deployment caps beside --max-params: --max-flops, and --max-latency-ms where it is measured."""
    sp.add_argument("--max-flops", type=parse_count, default=None, metavar="MACS", help=MAX_FLOPS_HELP)
    sp.add_argument("--max-latency-ms", type=positive_float, default=None, metavar="MS",
                    help="cap on the batch-1 latency: after the parameter and MAC checks and before any training, "
                    "each sampled model is built on --latency-device in fp32 and its forward timed (warm-up, then "
                    "the median of repeats, about a second); a model over the cap is rejected untrained "
                    "(default: none)")
    sp.add_argument("--latency-device", default="cpu",
                    help="where latency is measured: cpu (default, the usual deployment target, even when "
                    "training on a GPU), cuda or cuda:N")
    sp.add_argument("--latency-threads", type=positive_int, default=1, metavar="N",
                    help="CPU threads for the latency measurement only (default 1)")


def _search_flags(sub) -> None:
    s = sub.add_parser("search", help="search architectures and schedules under a parameter and time budget")
    s.add_argument("--max-params", type=parse_count, default=1e6, help="parameter cap, e.g. 1e6, 1M, 250k")
    _cap_flags(s)
    s.add_argument("--hours", type=hours, default=1.0,
                   help="wall-clock budget for the whole command (search + final training)")
    s.add_argument("--dataset", type=dataset_name, default="cifar100",
                   help=f"{', '.join(DATASETS)} (fashion-mnist, FashionMNIST and the like are accepted), or "
                   f"folder:PATH: class folders of images (PATH/train/<class>/ + PATH/test/<class>/, or "
                   f"PATH/<class>/)")
    s.add_argument("--image-size", type=image_size, default=None,
                   help=f"folder:PATH datasets: the side images are resized to, in pixels (default "
                   f"{FOLDER_IMAGE_SIZE}; e.g. 64 or 96)")
    _data_flags(s)
    s.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL, or a journal file (*.log)")
    s.add_argument("--study-name", default=None, help="default: from the dataset and the caps")
    s.add_argument("--out", default="best.pt", help="where the best model goes (best.json beside it)")
    s.add_argument("--seed", type=sampler_seed, default=0, help="the sampler's seed (worker k uses seed + k)")
    s.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
    s.add_argument("--sampler", choices=("tpe", "random", "grid"), default="tpe")
    s.add_argument("--grid", default=None, help='grid file for --sampler grid: {"base": {...}, "grid": {...}}')
    s.add_argument("--final-fraction", type=final_share, default="auto", metavar="F|auto",
                   help="share of the budget for training the best config on train+validation. auto (default): "
                   f"the search ends once past {AUTO_SEARCH_MIN:.0%}% of the budget when {STAGNANT_TRIALS} "
                   "judged trials in a row (complete, or pruned below the median) have not beaten the best "
                   f"(at {AUTO_SEARCH_MAX:.0%}% at the latest), and the final phase gets the rest. F: a fixed share (e.g. 0.35); 0 = no final "
                   "phase, best.pt is the best search trial's model")
    s.add_argument("--trial-seconds", type=positive_float, default=None,
                   help=f"time slice of one trial (default: search time / {TRIALS_PER_SEARCH}, at least "
                   f"{MIN_SLICE_S:g} s, shorter only where {MIN_TRIALS} such slices would not fit)")
    s.add_argument("--workers", type=worker_count, default=1,
                   help="local worker processes searching the study at once (default 1); each gets 1/N of the "
                   "CPU threads or of the GPU's memory, and one of them alone runs the final phase")
    s.add_argument("--backend", choices=("optuna", "ray"), default="optuna",
                   help="optuna (default): trials in this process (and --workers); ray: a Ray Tune experiment on "
                   "a local Ray or --ray-address, --workers trials at once, same study, guard and budget")
    s.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="--backend ray: join this running cluster (ray start --head); default: start a local "
                   "Ray on 127.0.0.1. On several machines, --out must be on storage they all share")
    s.add_argument("--gpus-per-trial", type=lambda t: _number(t, lambda v: 0 <= v <= 1, "between 0 and 1"),
                   default=None, metavar="F",
                   help="--backend ray: the share of a GPU each trial gets (and its memory fraction; default "
                   "1/--workers on CUDA, 0 on a CPU)")
    s.add_argument("--ray-scheduler", choices=("median", "asha"), default=None,
                   help="--backend ray: stop weak trials with Ray's median stopping rule (default) or ASHA, "
                   "on the shared progress axis (a report per 10%% of a slice, judged from 30%%)")
    s.add_argument("--artifact-dir", default=DEFAULT_ARTIFACTS)
    s.add_argument("--no-warm-start", action="store_true", help="do not queue the built-in first trial")
    _init_flags(s, "its architecture is fixed, and the search samples the freezing strategy (with its K or "
                "SHARE), the lr and the pretrained layers' lr scale, augmentation, label smoothing and the batch "
                "size; the guard counts the new head against --max-params")
    s.add_argument("--pick", choices=PICKS, default="observed",
                   help="which trial's config the final phase trains. observed (default): the best accuracy at "
                   "the end of a slice. estimate: the best validation accuracy estimated at the epochs the final "
                   "phase can give each config, from its own curve (the observed value where the curve shows no "
                   "reliable rise). race, estimate+race: the configs within the validation noise of the "
                   f"leader (up to {MAX_FINALISTS}) train one leg each, {RACE_SHARE:.0%}% of the final phase in "
                   "all, and the leg's winner goes on alone, where each leg gets at least a trial's slice "
                   "(docs/search.md, \"The final pick\"; docs/benchmarks.md measures them)")
    s.add_argument("--tta", choices=TTA_CHOICES, default="auto",
                   help="test-time augmentation of the final model. auto (default): a config trained with flips "
                   "predicts the mean of the logits over each image and its mirror, unless the validation split "
                   "shows that this hurts it beyond the noise or two forward passes an image would break a cap. "
                   "flip: always (if the caps allow). none: one view. best.pt records it; "
                   "evaluate, export and the latency cap follow it (docs/search.md, \"Test-time flip averaging\")")
    s.add_argument("--teacher", default="none", metavar="auto|none|PATH",
                   help="knowledge distillation in the final phase: the final model also learns from a teacher's "
                   "outputs. PATH: a checkpoint of the same dataset, any size. auto: a larger net trained on "
                   "train+validation in the final phase's own time, only where the search's measured speed says "
                   "teacher and student both fit (docs/search.md). Every teacher pass is paid out of the budget "
                   "(default: none)")
    _compile_flag(s, "trials and the final phase ")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--quiet", action="store_true", help="print only the final summary (and warnings, on standard error)")
    out.add_argument("--json", action="store_true", help="print JSON lines (one per trial, then a summary)")


def _train_flags(sub) -> None:
    t = sub.add_parser("train", help="train one config (JSON) for a time slice or a number of epochs, or "
                       "fine-tune a checkpoint (--init)")
    t.add_argument("--config", default=None, help="RunConfig JSON file (or --init)")
    t.add_argument("--seconds", type=positive_float, default=None, help="time slice (the schedule follows it)")
    t.add_argument("--epochs", type=positive_float, default=None)
    t.add_argument("--out", default="model.pt")
    t.add_argument("--full", action="store_true", help="train on train+validation (no validation metrics)")
    t.add_argument("--max-params", type=parse_count, default=None, help="refuse a config over this cap")
    t.add_argument("--max-flops", type=parse_count, default=None, metavar="MACS",
                   help="refuse a config over this many multiply-accumulates per image (MACs, as papers quote "
                   "'FLOPs'; 2 FLOPs each)")
    t.add_argument("--seed", type=sampler_seed, default=None,
                   help="seeds the weights, batch order and augmentation (default: the config's, or the checkpoint's)")
    _compile_flag(t)
    t.add_argument("--dataset", type=dataset_name, default=None,
                   help="train on this dataset instead of the config's (e.g. folder:PATH)")
    t.add_argument("--image-size", type=image_size, default=None,
                   help=f"folder:PATH datasets: the side images are resized to (default {FOLDER_IMAGE_SIZE})")
    _init_flags(t, "its net and recipe, fine-tuned on --dataset (default: the checkpoint's)")
    t.add_argument("--freeze", type=freeze_strategy, default="none", metavar="STRATEGY",
                   help="--init: which layers train. none (default): all; head: the classifier only; last:K: the "
                   "last K stages (blocks, fc layers) and the head; gradual[:SHARE]: the head first, then one more "
                   f"stage from the top every SHARE of the run (default {GRADUAL_SHARE}). Frozen layers keep "
                   "their BatchNorm statistics")
    t.add_argument("--backbone-lr-scale", type=lambda v: _number(v, lambda x: 0 < x <= 1, "in (0, 1]"),
                   default=1.0, metavar="F", help="--init: the pretrained layers train at F times the lr (the "
                   "head at the lr; default 1)")
    t.add_argument("--lr", type=positive_float, default=None,
                   help="--init: the peak learning rate (default: a tenth of the checkpoint's)")
    _data_flags(t)


def _evaluate_flags(sub) -> None:
    e = sub.add_parser("evaluate", help="test-set accuracy, cost, latency and confusions of a checkpoint")
    e.add_argument("checkpoint")
    _data_flags(e)
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--plots", default=None, help="write confusion.png (with per-class accuracy bars) and "
                   "predictions.png (a grid of test images, mistakes in red) into this folder")
    e.add_argument("--dataset", type=dataset_name, default=None,
                   help="a model trained on folder:PATH: read the test images from this folder:PATH instead")
    e.add_argument("--latency-device", default="cpu",
                   help="where the deployment latency (batch 1, fp32: what search's --max-latency-ms caps) is "
                   "measured (default cpu)")
    e.add_argument("--latency-threads", type=positive_int, default=1, metavar="N",
                   help="CPU threads for that measurement (default 1)")


def _report_flags(sub) -> None:
    r = sub.add_parser("report", help="a study's trials table, plots and summary, in one offline HTML page")
    r.add_argument("--storage", default=DEFAULT_STORAGE, help="the study's storage URL or journal file")
    r.add_argument("--study-name", default=None, help="default: the storage's only study")
    r.add_argument("--out", default=None, help="folder for index.html, trials.csv, summary.json and one HTML "
                   "file per plot (default report/; with --csv - or --json, none unless given)")
    r.add_argument("--checkpoint", default=None, help="the study's model, shown with its test accuracy if "
                   "'budgetnet evaluate' saved one (default: best.pt, if it is this study's)")
    r.add_argument("--csv", default=None, metavar="FILE", help="also write the trials table here; '-' prints "
                   "it on stdout")
    r.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _datasets_flags(sub) -> None:
    ds = sub.add_parser("datasets", help="list the built-in datasets and where each is looked for, or "
                        "describe one (folder:PATH: classes, counts per split, image size, cache state)")
    ds.add_argument("dataset", nargs="?", type=dataset_name, default=None)
    ds.add_argument("--image-size", type=image_size, default=None,
                    help=f"folder:PATH: the cache size to report on (default {FOLDER_IMAGE_SIZE})")
    ds.add_argument("--data-dir", default=None, help="where the built-in datasets are looked for (default ./data)")
    ds.add_argument("--json", action="store_true")


def _prune_flags(sub) -> None:
    pr = sub.add_parser("prune", help="L1-norm filter pruning of a checkpoint, then fine-tuning for --seconds")
    pr.add_argument("checkpoint")
    amount = pr.add_mutually_exclusive_group(required=True)
    amount.add_argument("--amount", type=lambda t: _number(t, lambda v: 0 < v < 1, "between 0 and 1, both excluded"),
                        help="share of each prunable layer's filters to remove, smallest L1 norm first (e.g. 0.3)")
    amount.add_argument("--max-params", type=parse_count, default=None,
                        help="remove the smallest share of filters that brings the model within this many "
                        "parameters")
    amount.add_argument("--max-flops", type=parse_count, default=None, metavar="MACS",
                        help="remove the smallest share of filters that brings the model within this many "
                        "multiply-accumulates per image (MACs, as papers quote 'FLOPs')")
    pr.add_argument("--seconds", type=lambda t: _number(t, lambda v: v >= 0, "a number >= 0"), default=60.0,
                   help="fine-tuning time with the time-aware schedule, at a tenth of the checkpoint's lr "
                   "(default 60; 0 = none)")
    pr.add_argument("--out", required=True, help="where the pruned checkpoint goes (never the input)")
    _data_flags(pr)
    pr.add_argument("--json", action="store_true", help="print the numbers as JSON")


def _export_flags(sub) -> None:
    ex = sub.add_parser("export", help="a checkpoint as ONNX (fp32 or int8) or TorchScript for deployment, "
                        "checked against PyTorch on test images before it is written")
    ex.add_argument("checkpoint")
    ex.add_argument("--out", required=True, help="the model file, e.g. model.onnx; a JSON beside it (model.json) "
                    "gives the class names, the input (size, channels, range, layout) and the checkpoint's SHA-256")
    ex.add_argument("--format", choices=EXPORT_FORMATS, default="onnx",
                    help="onnx (default; needs the extra budgetnet[export]): run in onnxruntime; torchscript: "
                    "torch.jit, run in PyTorch. Either takes float32 N x C x H x W pixel values in [0, 255] "
                    "(the normalisation is in the model) at any batch size")
    ex.add_argument("--int8", action="store_true",
                    help="quantise the ONNX graph to int8 (onnxruntime static quantisation, QDQ, calibrated on "
                    "--calibration-images training images); it is written only if its test top-1 stays within "
                    "--int8-max-drop of the fp32 graph's")
    ex.add_argument("--int8-for", choices=INT8_TARGETS, default="auto",
                    help="the CPU the int8 model is for, which picks onnxruntime's advised scheme: x86 (no VNNI: "
                    "7-bit weights), x86-vnni, arm; auto (default): this machine's")
    ex.add_argument("--int8-max-drop", type=fraction, default=EXPORT_INT8_MAX_DROP, metavar="F",
                    help=f"the most test top-1 the int8 model may lose against the fp32 graph (default "
                    f"{EXPORT_INT8_MAX_DROP:g}: {EXPORT_INT8_MAX_DROP * 100:g} points)")
    ex.add_argument("--images", type=lambda t: _whole(t, 0, 10**9, "a whole number"), default=EXPORT_CHECK_IMAGES,
                    metavar="N", help=f"the seeded sample of test images the export is checked on (default {EXPORT_CHECK_IMAGES:,}; "
                    f"0: all). An fp32 export that agrees with PyTorch's top-1 on fewer than "
                    f"{EXPORT_MIN_AGREEMENT * 100:g}%% of them is not written (exit code 1)")
    ex.add_argument("--calibration-images", type=positive_int, default=EXPORT_CALIBRATION_IMAGES, metavar="N",
                    help=f"--int8: seeded training images the ranges are calibrated on (default "
                    f"{EXPORT_CALIBRATION_IMAGES})")
    ex.add_argument("--threads", type=positive_int, default=None, metavar="N",
                    help="CPU threads for PyTorch and onnxruntime while the latency is timed (default: PyTorch's, "
                    "this machine's cores)")
    ex.add_argument("--data-dir", default=None, help="where the checkpoint's dataset is (as evaluate); without "
                    "any, the check runs on seeded random pixels and says so")
    ex.add_argument("--dataset", type=dataset_name, default=None,
                    help="a model trained on folder:PATH: read its images from this folder:PATH instead")
    ex.add_argument("--json", action="store_true", help="print the check's numbers as JSON")


def _dashboard_flags(sub) -> None:
    d = sub.add_parser("dashboard", help="serve optuna-dashboard for the study storage")
    d.add_argument("--storage", default=DEFAULT_STORAGE)
    d.add_argument("--artifact-dir", default=DEFAULT_ARTIFACTS)
    d.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    d.add_argument("--port", type=port_number, default=8080, help="TCP port (default 8080)")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; ``args.command`` names the subcommand given."""
    p = _Parser(prog="budgetnet", description="Find the best small CNN a parameter cap and a time budget buy.")
    p.add_argument("--version", action="version", version=f"budgetnet {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add_flags in (_search_flags, _train_flags, _evaluate_flags, _report_flags, _datasets_flags,
                      _prune_flags, _export_flags, _dashboard_flags):
        add_flags(sub)
    return p
