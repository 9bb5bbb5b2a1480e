"""Everything we need to know from a lent GPU, in one command, as a Markdown block for docs/benchmarks.md.

Run it through ``scripts/gpu_check.sh`` (which installs the offline wheels on a bare GPU host). Steps, each
under its own time limit, each recorded even when it fails:

1. the machine: GPU, driver, compute capability, torch, and the precision ``--precision auto`` picks;
2. the CUDA tests (``pytest -m gpu``), where pytest is installed;
3. training throughput by precision (``bench_precision.py``: fp32, bf16, fp16, NCHW), and eager against
   ``torch.compile`` for three configs of the space (``bench_precision.py --compile inductor``);
4. the data pipeline (``bench_pipeline.py``): ResNet-20 and ResNet-56 size, a 50k-image epoch, the device
   pipeline against model-only and a DataLoader;
5. a 3-minute Fashion-MNIST search and ``budgetnet evaluate`` of its ``best.pt``: trials by state, best
   validation accuracy, test top-1, overshoot;
6. a 2-minute search on the synthetic task.

``--smoke`` runs the same steps on the CPU at toy sizes in well under a minute (the test suite runs it, so
the script cannot rot). Raw outputs go to ``--out`` (default ``$OUT`` or ``gpu_check_out``); the block is
printed last and written to ``gpu_check.md`` there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], limit: float, log: Path) -> tuple[int | None, str, float]:
    """Run ``cmd`` from the repository root; (exit code or None on timeout, stdout+stderr, seconds)."""
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    log.write_text(text)
    return rc, text, time.perf_counter() - t


def status(rc: int | None, seconds: float) -> str:
    return f"{'timed out' if rc is None else 'ok' if rc == 0 else f'exit {rc}'}, {seconds:.0f} s"


def tables(text: str) -> list[str]:
    """The Markdown tables a benchmark printed, a blank line between two."""
    out: list[str] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("|"):
            if out and not previous.startswith("|"):
                out.append("")
            out.append(line)
        previous = line
    return out


def machine(py: str, device: str) -> list[str]:
    code = (
        "import json, torch; from budgetnet.device import resolve_precision, cpu_profile, cuda_profile;"
        f"d = torch.device('{device}'); cuda = d.type == 'cuda';"
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,"
        " 'gpu': torch.cuda.get_device_name(d) if cuda else None,"
        " 'capability': torch.cuda.get_device_capability(d) if cuda else None,"
        " 'memory_gib': round(torch.cuda.get_device_properties(d).total_memory / 2**30, 1) if cuda else None,"
        " 'cpu_capability': torch.backends.cpu.get_cpu_capability(),"
        " 'auto_precision': resolve_precision(d),"
        " 'cpu_profile': None if cuda else cpu_profile().__dict__,"
        " 'cuda_profile': cuda_profile(torch.cuda.current_device()).__dict__ if cuda else None}))"
    )
    p = subprocess.run([py, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if p.returncode:
        return [f"- machine: could not be read ({p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode})"]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                          "--format=csv,noheader"], capture_output=True, text=True) if info["gpu"] else None
    return [
        f"- device: {info['gpu'] or 'cpu'}"
        + (f", compute capability {'.'.join(map(str, info['capability']))}, {info['memory_gib']} GiB" if info["gpu"] else ""),
        f"- nvidia-smi: {smi.stdout.strip()}" if smi is not None and smi.returncode == 0 else "- nvidia-smi: -",
        f"- torch {info['torch']} (CUDA {info['cuda']}), CPU capability {info['cpu_capability']}, "
        f"{os.cpu_count()} CPU cores",
        f"- `--precision auto` picks **{info['auto_precision']}**"
        + (f" (CPU profile: {info['cpu_profile']})" if info["cpu_profile"] else "")
        + (f" (GPU profile: {info['cuda_profile']})" if info.get("cuda_profile") else ""),
    ]


def search_rows(py: str, args: list[str], out: Path, name: str, limit: float,
                evaluate: list[str] | None) -> list[str]:
    """Run a search with --json (and ``budgetnet evaluate best.pt`` with ``evaluate``'s extra flags, unless
    None); one Markdown row."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [py, "-m", "budgetnet", "search", *args, "--storage", f"sqlite:///{folder / 'study.db'}",
           "--artifact-dir", str(folder / "artifacts"), "--out", str(folder / "best.pt"), "--json"]
    rc, text, secs = run(cmd, limit, folder / "search.log")
    summary = next((json.loads(line) for line in reversed(text.splitlines())
                    if line.startswith("{") and '"event": "summary"' in line), None)
    if summary is None:
        return [f"| {name} | {status(rc, secs)} | - | - | - | - | - | - |"]
    t = summary["trials"]
    top1 = "-"
    if evaluate is not None and summary.get("checkpoint"):
        erc, etext, _ = run([py, "-m", "budgetnet", "evaluate", str(folder / "best.pt"), "--json", *evaluate],
                            120, folder / "evaluate.log")
        if erc == 0:
            report = json.loads(etext[etext.index("{"):])
            top1 = f"{report['top1']:.2%} ({report['precision']})"
    best = f"{summary['best_val_acc']:.4f}" if summary.get("best_val_acc") is not None else "-"
    return [f"| {name} | {status(rc, secs)} | {summary['precision']} | {summary['slice_seconds']:.1f} s | "
            f"{t['complete']} / {t['pruned']} / {t['rejected']} / {t['failed']} | {best} | {top1} | "
            f"{summary['seconds_used']:.1f} of {summary['budget_seconds']:.0f} s "
            f"(overshoot {summary['overshoot_s']:.1f} s) |"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the same steps on the CPU at toy sizes")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"))
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    device = "cpu" if args.smoke else "cuda"
    fm = ["--data-dir", ".data"] if (ROOT / ".data" / "fashion-mnist").is_dir() else []
    t0 = time.perf_counter()
    block = [f"### GPU check ({'smoke, CPU' if args.smoke else 'cuda'}), {datetime.date.today()}, "
             f"commit {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip() or '?'}",
             "", "Command: `scripts/gpu_check.sh" + (" --smoke" if args.smoke else "") + "`", ""]
    block += machine(py, device)

    block += ["", "**CUDA tests** (`pytest -m gpu`):"]
    has_pytest = subprocess.run([py, "-c", "import pytest"], capture_output=True).returncode == 0
    if has_pytest:
        rc, text, secs = run([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], 150 if not args.smoke else 60,
                             out / "cuda_tests.log")
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
        block.append(f"{status(rc, secs)}: {last[0]}" + (" (exit 5: no CUDA test ran here)" if rc == 5 else ""))
    else:
        block.append("pytest is not installed on this host: skipped")

    block += ["", "**Training throughput by precision** (`bench_precision.py`, ratio against fp32 in the same run):", ""]
    prec = ["--device", device, "--fp16", "--json", str(out / "precision.json")]
    prec += ["--batch-size", "8", "--steps", "1", "--warmup", "1", "--repeats", "1", "--models", "plain"] if args.smoke \
        else ["--batch-size", "256", "--steps", "30", "--warmup", "10", "--repeats", "3"]
    rc, text, secs = run([py, "scripts/bench_precision.py", *prec], 180, out / "precision.log")
    block += tables(text) or [f"({status(rc, secs)}; see precision.log)"]

    block += ["", "**Eager against compiled training steps** (`bench_precision.py --compile`, in the precision "
              "auto picks; the warm-up column includes the compilation):", ""]
    comp = ["--device", device, "--json", str(out / "compile.json")]
    comp += ["--compile", "eager", "--models", "plain", "--batch-size", "8", "--steps", "1", "--warmup", "1",
             "--repeats", "1"] if args.smoke else ["--compile", "inductor", "--batch-size", "256", "--steps", "30",
                                                  "--warmup", "3", "--repeats", "1"]
    rc, text, secs = run([py, "scripts/bench_precision.py", *comp], 150, out / "compile.log")
    block += tables(text) or [f"({status(rc, secs)}; see compile.log)"]

    for model, repeats in (("resnet20", 2), ("resnet56", 1)):
        block += ["", f"**Data pipeline, {model}** (`bench_pipeline.py`):", ""]
        pipe = ["--device", device, "--model", model, "--json", str(out / f"pipeline_{model}.json")]
        pipe += ["--images", "64", "--batch-size", "32", "--workers", "0", "--warmup", "1", "--repeats", "1"] \
            if args.smoke else ["--repeats", str(repeats)]
        rc, text, secs = run([py, "scripts/bench_pipeline.py", *pipe], 200, out / f"pipeline_{model}.log")
        block += tables(text) or [f"({status(rc, secs)}; see pipeline_{model}.log)"]
        if args.smoke:
            break  # one model shows the step runs

    block += ["", "**Searches** (`budgetnet search --json`, then `budgetnet evaluate best.pt`):", "",
              "| search | run | precision | slice | complete / pruned / rejected / failed | best val | test top-1 | "
              "budget used |", "|---|---|---|---:|---|---:|---:|---|"]
    if args.smoke:
        # 22 s: start-up (imports, data, the precision probe) once took 7 s of a 14 s budget under the suite
        block += search_rows(py, ["--dataset", "synthetic", "--max-params", "30k", "--hours", "0.006",
                                  "--trial-seconds", "2", "--device", "cpu"], out, "synthetic, 22 s", 60, ["--device", "cpu"])
    else:
        block += search_rows(py, ["--dataset", "fashion_mnist", "--max-params", "1e6", "--hours", "0.05",
                                  "--device", "cuda", *fm], out, "Fashion-MNIST, 3 min", 240, ["--device", "cuda", *fm])
        block += search_rows(py, ["--dataset", "synthetic", "--max-params", "1e6", "--hours", "0.0333",
                                  "--device", "cuda"], out, "synthetic, 2 min", 170, None)
    block += ["", f"({time.perf_counter() - t0:.0f} s in all; raw logs and JSON in `{out}`)"]

    text = "\n".join(block) + "\n"
    (out / "gpu_check.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
