"""``budgetnet export``: a checkpoint as an ONNX graph (fp32, or int8 through onnxruntime's static
quantisation) or as TorchScript, checked against PyTorch every time, before anything is written.

The exported model takes pixel values: float32 N x C x H x W in [0, 255] (uint8 images cast to float, not
scaled); the checkpoint's own normalisation, (x / 255 - mean) / std, is the graph's first op, and the batch
axis is dynamic. A JSON file beside it (``model.json`` for ``model.onnx``) says so, with the class names,
the input size and the source checkpoint's SHA-256.

The check runs the exported model and the PyTorch model on a seeded sample of the checkpoint's test images
(its training images when the test split is missing; seeded random pixels, said so, when no data is found).
An fp32 export whose top-1 answers agree with PyTorch's on less than ``EXPORT_MIN_AGREEMENT`` of them is not
written. An int8 model is calibrated on seeded training images and is not written when its top-1 falls more
than ``int8_max_drop`` below the fp32 graph's on the same images (quantisation error is expected; a larger
loss means calibration failed this model).

Only this module imports onnx and onnxruntime (the optional extra ``budgetnet[export]``, imported when an
ONNX export runs); an import-linter contract in pyproject.toml keeps it so.
"""

from __future__ import annotations

import hashlib
import io
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from budgetnet import __version__
from budgetnet.checkpoint import deployed_model, load_checkpoint, recorded_info
from budgetnet.config import (
    EXPORT_CALIBRATION_IMAGES,
    EXPORT_CHECK_IMAGES,
    EXPORT_INT8_MAX_DROP,
    EXPORT_MIN_AGREEMENT,
)
from budgetnet.datasets.info import DatasetNotFound
from budgetnet.device import cpu_family
from budgetnet.errors import first_line
from budgetnet.evaluate import checkpoint_test_split
from budgetnet.files import write_atomic
from budgetnet.latency import threads as torch_threads

SIDECAR_FORMAT = "budgetnet-export"
SIDECAR_VERSION = 1
ONNX_OPSET = 17  # read by every onnxruntime since 1.14
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
SAMPLE_SEED, CALIBRATION_SEED = 0, 1
LATENCY_BATCHES = (1, 256)
RUN_BATCH = 256  # images per call while the check's logits are computed
CALIBRATION_BATCH = 32
# onnxruntime's advice for int8 on a CPU (quantize_static's docstring): activations, weights, reduce_range.
# Without VNNI, 8-bit products can saturate in x86's u8 x s8 instruction: 7-bit weights avoid it.
INT8_SCHEMES = {"x86": ("uint8", "int8", True), "x86-vnni": ("uint8", "int8", False),
                "arm": ("int8", "int8", False)}
INSTALL_HINT = "pip install 'budgetnet[export]'"

Runner = Callable[[np.ndarray], np.ndarray]  # float32 pixels N x C x H x W -> logits N x classes


class ExportError(Exception):
    """What was asked cannot be exported (a user mistake: one line, exit code 2)."""


class ExportCheckFailed(Exception):
    """The exported model does not compute what the checkpoint does: nothing was written (exit code 1)."""


def require_onnx():
    """(onnx, onnxruntime); ExportError, saying how to install them, where they are missing."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"--format onnx needs the optional packages onnx and onnxruntime ({e.name or e} is not "
                          f"installed): {INSTALL_HINT}") from None
    return onnx, onnxruntime


class PixelInput(nn.Module):
    """``model`` fed pixel values, float32 N x C x H x W in [0, 255]: the training normalisation,
    (x / 255 - mean) / std, as the same per-channel multiply and add ``data.normalizer`` does."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std_t)
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels * self.scale + self.shift)


def sidecar_path(out: str | Path) -> Path:
    """The JSON beside an exported model: ``model.onnx`` -> ``model.json``."""
    return Path(out).with_suffix(".json")


# -- the images the check runs on -------------------------------------------------------------------------

@dataclass
class Sample:
    """uint8 images N x C x H x W and their labels (None: random pixels), where they came from, and a note
    for the user when they are not the test split."""

    images: torch.Tensor
    labels: np.ndarray | None
    source: str  # "test", "train" or "synthetic"
    note: str = ""

    def pixels(self) -> np.ndarray:
        """The exported model's input: float32 N x C x H x W, contiguous."""
        return np.ascontiguousarray(self.images.float().numpy())


def _draw(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of a seeded sample of ``n`` of ``images`` (0 or more than there are: all), in order."""
    if not 0 < n < len(images):
        return torch.arange(len(images))
    return torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n].sort().values


def check_sample(path, ckpt: dict, n: int, data_dir=None, dataset: str | None = None) -> Sample:
    """A seeded sample of ``n`` test images of the checkpoint's data (0: all); its training images when
    the test split is missing; seeded random pixels when no data is found."""
    missing = ""
    for train in (False, True):
        try:
            split, _ = checkpoint_test_split(path, ckpt, data_dir, torch.device("cpu"), dataset=dataset,
                                             train=train)
        except DatasetNotFound as e:
            missing = missing or first_line(e)
            continue
        idx = _draw(split.images, n, SAMPLE_SEED)
        note = f"no test split ({missing}): checked on training images instead" if train else ""
        return Sample(split.images[idx].contiguous(), split.labels[idx].numpy(), "train" if train else "test", note)
    info = recorded_info(ckpt)
    gen = torch.Generator().manual_seed(SAMPLE_SEED)
    pixels = torch.randint(0, 256, (n or EXPORT_CHECK_IMAGES, info.channels, info.image_size, info.image_size),
                           generator=gen, dtype=torch.uint8)
    return Sample(pixels, None, "synthetic", f"no data found ({missing}): checked on seeded random pixels, "
                  f"synthetic inputs rather than images (agreement only, no top-1)")


def calibration_pixels(path, ckpt: dict, n: int, data_dir=None, dataset: str | None = None) -> np.ndarray:
    """A seeded sample of ``n`` training images as float32 pixels, what int8 ranges are calibrated on."""
    try:
        split, _ = checkpoint_test_split(path, ckpt, data_dir, torch.device("cpu"), dataset=dataset, train=True)
    except DatasetNotFound as e:
        raise ExportError(f"--int8 calibrates on the checkpoint's training images, and none were found "
                          f"({first_line(e)}); give --data-dir") from None
    return Sample(split.images[_draw(split.images, n, CALIBRATION_SEED)].contiguous(), None, "train").pixels()


# -- running a model ----------------------------------------------------------------------------------------

def eager_runner(module: nn.Module) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return run


def onnx_runner(model: bytes, threads: int) -> Runner:
    """An onnxruntime session on the CPU with ``threads`` intra-op threads."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # errors only: its optimiser's notes are not the user's business
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def torchscript_runner(model: bytes) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        return eager_runner(torch.jit.load(io.BytesIO(model), map_location="cpu").eval())


def logits(run: Runner, x: np.ndarray) -> np.ndarray:
    return np.concatenate([run(x[i:i + RUN_BATCH]) for i in range(0, len(x), RUN_BATCH)])


def compare(reference: np.ndarray, got: np.ndarray, labels: np.ndarray | None) -> dict:
    """Largest absolute logit difference, top-1 agreement with ``reference``, and top-1 (None unlabelled)."""
    return {"max_abs_diff": float(np.abs(reference - got).max()),
            "agreement": float((reference.argmax(1) == got.argmax(1)).mean()),
            "top1": _top1(got, labels)}


def _top1(logits_: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float((logits_.argmax(1) == labels).mean())


def latencies(runners: dict[str, Runner], shape: tuple[int, ...], batches=LATENCY_BATCHES, rounds: int = 3,
              seconds: float = 0.25) -> dict[str, dict[str, float]]:
    """Median latency (ms) of each runner at each batch size, on seeded random pixels. The runners take
    turns, ``rounds`` times, so that a load that comes and goes on a shared machine falls on all of them
    alike; a turn is one warm-up call, then calls for ``seconds`` (at least two)."""
    rng = np.random.default_rng(SAMPLE_SEED)
    out: dict[str, dict[str, float]] = {name: {} for name in runners}
    for batch in batches:
        x = rng.uniform(0, 255, (batch, *shape)).astype(np.float32)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                run(x)
                start, calls = time.perf_counter(), 0
                while calls < 2 or time.perf_counter() - start < seconds:
                    t = time.perf_counter()
                    run(x)
                    times[name].append(time.perf_counter() - t)
                    calls += 1
        for name in runners:
            out[name][str(batch)] = statistics.median(times[name]) * 1e3
    return out


# -- the exporters ------------------------------------------------------------------------------------------

def onnx_model(module: PixelInput, shape: tuple[int, ...]) -> bytes:
    """``module`` as an ONNX graph (opset ``ONNX_OPSET``) with a dynamic batch axis, checked by onnx."""
    onnx, _ = require_onnx()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # TorchScript-based exporter: its deprecation notice aside, it needs no onnxscript and no network
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, *shape),), buf, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    model = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(model))
    return model


def torchscript_model(module: PixelInput, shape: tuple[int, ...]) -> bytes:
    """``module`` traced and frozen (batch norm folded into its convs); any batch size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        frozen = torch.jit.freeze(torch.jit.trace(module.eval(), torch.zeros(2, *shape)))
        buf = io.BytesIO()
        torch.jit.save(frozen, buf)
    return buf.getvalue()


def int8_model(fp32: bytes, calibration: np.ndarray, target: str) -> bytes:
    """Static int8 quantisation (QDQ, per-channel weights) of an fp32 ONNX graph, its activation ranges
    calibrated on ``calibration`` (float32 pixels), in ``target``'s scheme (``INT8_SCHEMES``)."""
    require_onnx()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    activations, weights, reduce_range = INT8_SCHEMES[target]
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.starts = iter(range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self):
            i = next(self.starts, None)
            return None if i is None else {INPUT_NAME: calibration[i:i + CALIBRATION_BATCH]}

    with tempfile.TemporaryDirectory(prefix="budgetnet-int8-") as tmp:
        src, prepared, dst = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(prepared))  # shapes inferred and graph fused, as quantisation wants
        quantize_static(str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=types[activations], weight_type=types[weights])
        return dst.read_bytes()


# -- the command ----------------------------------------------------------------------------------------------

def _is_sidecar(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == SIDECAR_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_paths(checkpoint, out) -> None:
    """Refuse an ``out`` whose model or JSON would overwrite the checkpoint, or whose JSON would replace a
    file that is not an earlier export's (a search's ``best.json`` beside ``best.pt``)."""
    out, sidecar = Path(out), sidecar_path(out)
    if out.suffix.lower() == ".json":
        raise ExportError(f"--out {out} names the JSON; give the model's file (its JSON goes beside it)")
    for p in (out, sidecar):
        if p.absolute().resolve() == Path(checkpoint).absolute().resolve():
            raise ExportError(f"--out {out} would overwrite the checkpoint {checkpoint} ({p.name}); choose "
                              f"another --out")
    if sidecar.exists() and not _is_sidecar(sidecar):
        raise ExportError(f"{sidecar} exists and is not an export's JSON (a search's best.json?): the model's "
                          f"JSON goes there; choose another --out")


def _check_int8(fp32: bytes, reference: np.ndarray, fp32_logits: np.ndarray, sample: Sample, x: np.ndarray,
                calibration: np.ndarray, target: str, threads: int, max_drop: float) -> tuple[bytes, Runner, dict]:
    """The int8 graph, its runner and its numbers against PyTorch and the fp32 graph; ExportCheckFailed when
    its top-1 falls more than ``max_drop`` below the fp32 graph's."""
    int8 = int8_model(fp32, calibration, target)
    run = onnx_runner(int8, threads)
    got = logits(run, x)
    m = {"size_bytes": len(int8), **compare(reference, got, sample.labels), "target": target,
         "calibration_images": len(calibration),
         "agreement_fp32": float((got.argmax(1) == fp32_logits.argmax(1)).mean())}
    if m["top1"] is not None:
        fp32_top1 = _top1(fp32_logits, sample.labels)
        m["top1_drop"] = fp32_top1 - m["top1"]
        if m["top1_drop"] > max_drop:
            raise ExportCheckFailed(f"the int8 model's top-1 is {m['top1']:.2%} against the fp32 graph's "
                                    f"{fp32_top1:.2%} on {len(got):,} {sample.source} images, a loss over "
                                    f"--int8-max-drop {max_drop:.2%}; nothing written")
    return int8, run, m


def export_checkpoint(path, out, *, fmt: str = "onnx", int8: bool = False, images: int = EXPORT_CHECK_IMAGES,
                      calibration_images: int = EXPORT_CALIBRATION_IMAGES, int8_max_drop: float = EXPORT_INT8_MAX_DROP,
                      int8_for: str = "auto", data_dir=None, dataset: str | None = None, threads: int | None = None,
                      latency_seconds: float = 0.25, latency_rounds: int = 3, log=print) -> dict:
    """Export the checkpoint at ``path`` to ``out`` (``fmt`` "onnx" or "torchscript"; ``int8``: an ONNX graph
    quantised to int8) with its JSON beside it, after checking it against PyTorch on ``images`` seeded
    images (0: all). Returns the check's numbers. Nothing is written unless every check passes.
    Raises ExportError (and CheckpointError, DatasetNotFound) for what was asked, ExportCheckFailed when the
    exported model does not compute what the checkpoint does."""
    if int8 and fmt != "onnx":
        raise ExportError("--int8 quantises an ONNX graph: use it with --format onnx")
    check_paths(path, out)
    if fmt == "onnx":
        require_onnx()  # before any work
    ckpt = load_checkpoint(path)  # torch.load(weights_only=True): a file with code in it is refused unrun
    info = recorded_info(ckpt)
    shape = (info.channels, info.image_size, info.image_size)
    module = PixelInput(deployed_model(ckpt), info.mean, info.std).eval()  # a flip average exports as one graph
    calibration = calibration_pixels(path, ckpt, calibration_images, data_dir, dataset) if int8 else None
    sample = check_sample(path, ckpt, images, data_dir, dataset)
    if sample.note:
        log(f"note: {sample.note}")
    threads = threads or torch.get_num_threads()
    with torch_threads(threads):  # PyTorch and onnxruntime timed on as many threads
        eager, x = eager_runner(module), sample.pixels()
        reference = logits(eager, x)
        model = onnx_model(module, shape) if fmt == "onnx" else torchscript_model(module, shape)
        run = onnx_runner(model, threads) if fmt == "onnx" else torchscript_runner(model)
        got = logits(run, x)
        exported = {"size_bytes": len(model), **compare(reference, got, sample.labels)}
        if exported["agreement"] < EXPORT_MIN_AGREEMENT:
            raise ExportCheckFailed(f"the exported model agrees with PyTorch on {exported['agreement']:.2%} of "
                                    f"{len(got):,} top-1 answers, under {EXPORT_MIN_AGREEMENT:.1%} (largest logit "
                                    f"difference {exported['max_abs_diff']:.3g}); nothing written")
        runners = {"eager": eager, "fp32": run}
        report = {"checkpoint": str(path), "checkpoint_sha256": ckpt["sha256"], "out": str(out),
                  "sidecar": str(sidecar_path(out)), "format": fmt, "input_shape": list(shape), "threads": threads,
                  "runtime": _runtime(fmt), "check": {"source": sample.source, "images": len(got), "note": sample.note},
                  "eager": {"top1": _top1(reference, sample.labels)}, "fp32": exported}
        if int8:
            target = cpu_family() if int8_for == "auto" else int8_for
            model, runners["int8"], report["int8"] = _check_int8(model, reference, got, sample, x, calibration,
                                                                 target, threads, int8_max_drop)
        for name, ms in latencies(runners, shape, rounds=latency_rounds, seconds=latency_seconds).items():
            report[name]["latency_ms"] = ms
    report["model_sha256"] = hashlib.sha256(model).hexdigest()
    write_atomic(out, lambda f: f.write(model))
    write_atomic(sidecar_path(out), lambda f: f.write(json.dumps(sidecar(ckpt, report), indent=2).encode()))
    return report


def _runtime(fmt: str) -> str:
    if fmt == "torchscript":
        return f"torch.jit {torch.__version__}"
    _, ort = require_onnx()
    return f"onnxruntime {ort.__version__} (CPUExecutionProvider)"


def sidecar(ckpt: dict, report: dict) -> dict:
    """What a user of the exported model needs to feed it and read it, and where it came from."""
    info = recorded_info(ckpt)
    cfg = ckpt["run_config"]
    versions = {"budgetnet": __version__, "torch": str(torch.__version__)}
    if report["format"] == "onnx":
        onnx, ort = require_onnx()
        versions.update(onnx=onnx.__version__, onnxruntime=ort.__version__)
    return {
        "format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION,
        "model_file": Path(report["out"]).name, "model_format": report["format"], "int8": "int8" in report,
        "int8_target": report["int8"]["target"] if "int8" in report else None,
        "opset": ONNX_OPSET if report["format"] == "onnx" else None, "model_sha256": report["model_sha256"],
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW",
                  "shape": ["batch", info.channels, info.image_size, info.image_size],
                  "channels": info.channels, "height": info.image_size, "width": info.image_size,
                  "range": [0, 255], "batch": "dynamic",
                  "normalization": "in the graph: feed raw pixel values in [0, 255] (uint8 cast to float32, not "
                                   "divided by 255); the model computes (x / 255 - mean) / std per channel",
                  "mean": list(info.mean), "std": list(info.std)},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(ckpt["classes"])],
                   "meaning": "logits, one per class in the order of 'classes'; softmax gives probabilities"},
        "classes": list(ckpt["classes"]),
        "source": {"checkpoint": report["checkpoint"], "sha256": ckpt["sha256"], "dataset": cfg.data.dataset,
                   "family": cfg.model.family, "n_params": ckpt["n_params"], "flops": ckpt["flops"],
                   "tta": ckpt["tta"]},
        "check": {**report["check"], **{k: report[k] for k in ("eager", "fp32", "int8", "threads", "runtime")
                                         if k in report}},
        "versions": versions,
    }


def format_export_report(r: dict) -> str:
    """The check's numbers as a short table: PyTorch eager, the exported fp32 model and the int8 one."""
    kind = "int8 ONNX" if "int8" in r else {"onnx": "ONNX", "torchscript": "TorchScript"}[r["format"]]
    written = r["int8"] if "int8" in r else r["fp32"]
    check = r["check"]
    lines = [f"wrote {r['out']} ({kind}, {written['size_bytes'] / 1e6:.2f} MB) and {r['sidecar']}, from "
             f"{r['checkpoint']} (sha256 {r['checkpoint_sha256'][:12]})",
             f"  input: float32 N x {' x '.join(map(str, r['input_shape']))} pixel values in [0, 255], normalised "
             f"in the graph; any batch size N",
             f"  checked on {check['images']:,} {check['source']} images (seeded) against PyTorch: largest |logit "
             f"difference| {r['fp32']['max_abs_diff']:.2g}, top-1 agreement {r['fp32']['agreement']:.2%}",
             f"  {'':<20}{'size MB':>9}{'top-1':>9}{'agreement':>11}{'ms, batch 1':>13}{'ms, batch 256':>15}"]
    runtime = r["runtime"].split(" ")[0]
    rows = [("PyTorch eager", r["eager"], None), (f"{runtime} fp32", r["fp32"], r["fp32"]["size_bytes"])]
    if "int8" in r:
        rows.append((f"{runtime} int8", r["int8"], r["int8"]["size_bytes"]))
    for name, m, size in rows:
        top1 = "-" if m["top1"] is None else f"{m['top1']:.2%}"
        agreement = f"{m['agreement']:.2%}" if "agreement" in m else "-"
        lines.append(f"  {name:<20}{'-' if size is None else f'{size / 1e6:.2f}':>9}{top1:>9}{agreement:>11}"
                     f"{m['latency_ms']['1']:>13.3f}{m['latency_ms']['256']:>15.2f}")
    if "int8" in r:
        q = r["int8"]
        lines.append(f"  int8: quantised for {q['target']} CPUs, calibrated on {q['calibration_images']} training "
                     f"images; largest |logit difference| against PyTorch {q['max_abs_diff']:.2g}; agrees with the "
                     f"fp32 graph on {q['agreement_fp32']:.2%}")
    lines.append(f"  latency: median, {r['threads']} thread{'s' if r['threads'] > 1 else ''}, {r['runtime']}")
    return "\n".join(lines)
