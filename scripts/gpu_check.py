"""Everything we need to know from a lent GPU, within a deadline, as one Markdown block for docs/benchmarks.md.

Run it through ``scripts/gpu_check.sh`` (which installs the offline wheels on a bare GPU host). The steps
run most informative first, each in subprocesses, calling budgetnet through its CLI or a benchmark script:

1. the machine: GPU, driver, torch, and the precision ``--precision auto`` picks;
2. a short Fashion-MNIST search, then ``budgetnet report`` and ``budgetnet evaluate`` of it: trials that
   ended "too slow", the speed probe's rate against the trials' own rates, the precision it trained in;
3. the same search with 4 workers: trials per minute and test top-1 against step 2;
4. the CUDA tests (``pytest -m gpu``), where pytest is installed;
5. the throughput tables: by precision and eager against compiled (``bench_precision.py``), then the data
   pipeline at ResNet-20 and ResNet-56 size (``bench_pipeline.py``).

The run has a deadline (``--deadline``, from the start of ``gpu_check.sh``). Before each step its
estimated cost is set against the time left: a step that would not fit is cut, and the block's steps
table says which and why. A step is stopped at ``SLACK`` times its estimate or at the deadline, whichever
comes first, so that one hung step cannot take the others' time.

``--smoke`` runs the same steps on the CPU at toy sizes (the test suite runs it, so the script cannot rot).
Raw outputs go to ``--out`` (default ``gpu_check_out``); the block is printed last and written to
``gpu_check.md`` there, and with no ``--out``, to ``$OUT`` too beside an archive of the text outputs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 480.0  # a GPU is lent for 15 minutes, its start-up included
RESERVE_S = 20.0  # kept back for the block, and for a stopped step's grace
SLACK = 1.5  # a step is stopped at this multiple of its estimate ...
SMOKE_SLACK = 4.0  # ... or this one under --smoke: a shared CPU's times vary several-fold
GRACE_S = 5.0  # from SIGTERM (a search then writes its summary) to SIGKILL
SEARCH_S = 120.0  # each search's budget on the GPU: several 10 s trial slices per worker


@dataclass
class Check:
    """What every step needs: the interpreter, the mode, where raw outputs go, and the searches so far."""
    py: str
    smoke: bool
    out: Path
    data: list[str]  # --data-dir .data, where Fashion-MNIST was brought along
    searches: dict[str, dict] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    @property
    def slack(self) -> float:
        return SMOKE_SLACK if self.smoke else SLACK


@dataclass
class Result:
    """A step's lines: ``rows`` under its section's heading, ``notes`` after all the section's rows."""
    rows: list[str]
    notes: list[str] = field(default_factory=list)
    outcome: str = "ok"


@dataclass
class Step:
    name: str
    section: str
    cost: float  # estimated seconds (docs/benchmarks.md, "GPU"; on a 2-core CPU for --smoke)
    fn: Callable[[Check, float], Result]  # (check, the time.time() at which to stop it)


SECTIONS = {
    "machine": [],
    "searches": ["**Searches** (`budgetnet search --json`, then `budgetnet report` and `budgetnet evaluate "
                 "best.pt`):", "",
                 "| search | run | precision | slice | complete / pruned / rejected / failed | too slow | "
                 "trials per minute (all; complete) | best val | test top-1 | budget used |",
                 "|---|---|---|---:|---|---:|---|---:|---:|---|"],
    "tests": ["**CUDA tests** (`pytest -m gpu`):"],
    "precision": ["**Training throughput by precision** (`bench_precision.py`, ratio against fp32 in the same "
                  "run):", ""],
    "compile": ["**Eager against compiled training steps** (`bench_precision.py --compile`, in the precision "
                "auto picks; the warm-up column includes the compilation):", ""],
    "resnet20": ["**Data pipeline, resnet20** (`bench_pipeline.py`):", ""],
    "resnet56": ["**Data pipeline, resnet56** (`bench_pipeline.py`):", ""],
}


def run(cmd: list[str], until: float, log: Path) -> tuple[int | None, str, float]:
    """Run ``cmd`` from the repository root, its output to ``log``, until ``until`` (``time.time()``);
    (exit code, or None when it was stopped there; the output; seconds)."""
    return run_all([(cmd, log)], until)[0]


def run_all(jobs: list[tuple[list[str], Path]], until: float) -> list[tuple[int | None, str, float]]:
    """``run`` for several (command, log) jobs side by side; their results in the same order."""
    t, procs = time.time(), []
    for cmd, log in jobs:
        with log.open("w") as f:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                          env=dict(os.environ, PYTHONUNBUFFERED="1")))
    results = []
    for p, (_, log) in zip(procs, jobs):
        try:
            rc = p.wait(timeout=max(1.0, until - time.time()))
        except subprocess.TimeoutExpired:
            rc = None
            stop(p)
        results.append((rc, log.read_text(errors="replace"), time.time() - t))
    return results


def stop(p: subprocess.Popen) -> None:
    """End ``p``'s process group: SIGTERM, then SIGKILL for whatever is left after a grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pass


def ended(rc: int | None) -> str:
    return "timed out" if rc is None else "ok" if rc == 0 else f"exit {rc}"


def status(rc: int | None, seconds: float) -> str:
    return f"{ended(rc)}, {seconds:.0f} s"


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


def json_objects(text: str) -> list[dict]:
    """Every JSON object that starts a line of ``text``: one-line events, or a pretty-printed report."""
    decoder, found = json.JSONDecoder(), []
    for m in re.finditer(r"^\{", text, re.M):
        try:
            found.append(decoder.raw_decode(text, m.start())[0])
        except ValueError:
            continue
    return found


MACHINE = r"""
import json, sys, torch
d = torch.device(sys.argv[1]); cuda = d.type == "cuda"
p = torch.cuda.get_device_properties(d) if cuda else None
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": p.name if p else None,
        "capability": f"{p.major}.{p.minor}" if p else None,
        "memory_gib": round(p.total_memory / 2**30, 1) if p else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability()}
try:  # budgetnet's own decision; if its module moved, only this line is lost
    from budgetnet.device import cpu_profile, cuda_profile, resolve_precision
    info["auto"] = resolve_precision(d)
    info["profile"] = (cuda_profile(torch.cuda.current_device()) if cuda else cpu_profile()).__dict__
except Exception as e:
    info["auto"], info["profile"] = None, f"{type(e).__name__}: {e}"
print(json.dumps(info))
"""


def machine(check: Check, until: float) -> Result:
    """The device, driver, torch, and the precision ``--precision auto`` picks here."""
    rc, text, secs = run([check.py, "-c", MACHINE, check.device], until, check.out / "machine.log")
    found = json_objects(text)
    if not found:
        last = text.strip().splitlines()[-1:] or [status(rc, secs)]
        return Result([f"- machine: could not be read ({last[0][:200]})"], outcome=ended(rc))
    info = found[-1]
    smi = "-"
    if info["gpu"]:
        try:
            p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            smi = p.stdout.strip() if p.returncode == 0 else "-"
        except (OSError, subprocess.TimeoutExpired):
            pass
    profile = info["profile"]
    if isinstance(profile, dict):
        profile = {k: round(v, 2) if isinstance(v, float) else v for k, v in profile.items()}
    return Result([
        f"- device: {info['gpu'] or 'cpu'}"
        + (f", compute capability {info['capability']}, {info['memory_gib']} GiB" if info["gpu"] else ""),
        f"- nvidia-smi: {smi}",
        f"- torch {info['torch']} (CUDA {info['cuda']}), CPU capability {info['cpu_capability']}, "
        f"{os.cpu_count()} CPU cores",
        f"- `--precision auto` picks **{info['auto'] or '?'}** ({'GPU' if info['gpu'] else 'CPU'} profile: "
        f"{profile})",
    ], outcome=ended(rc))


def search(check: Check, until: float, name: str, args: list[str], workers: int, evaluate: bool = True) -> Result:
    """``budgetnet search --json`` with ``workers``, then ``budgetnet report`` of its trials and (with
    ``evaluate``) ``budgetnet evaluate`` of its best.pt: a row of the searches table, and notes on the speed
    probe and on the workers."""
    folder = check.out / name
    folder.mkdir(parents=True, exist_ok=True)
    # several processes share a journal file, the documented storage for local workers
    storage = str(folder / "journal.log") if workers > 1 else f"sqlite:///{folder / 'study.db'}"
    cmd = [check.py, "-m", "budgetnet", "search", *args, "--workers", str(workers), "--device", check.device,
           "--storage", storage, "--artifact-dir", str(folder / "artifacts"), "--out", str(folder / "best.pt"),
           "--json"]
    rc, text, secs = run(cmd, until, folder / "search.log")
    summary = next((e for e in reversed(json_objects(text)) if e.get("event") == "summary"), None)
    if summary is None:
        return Result([f"| {name} | {status(rc, secs)} |" + " - |" * 8], outcome=ended(rc))
    # the trials table and the test accuracy, side by side: each is mostly a process's start-up
    table, model = folder / "trials.csv", str(folder / "best.pt")
    jobs = [([check.py, "-m", "budgetnet", "report", "--storage", storage, "--csv", str(table), "--json"],
             folder / "report.log")]
    if evaluate and summary.get("checkpoint"):
        jobs.append(([check.py, "-m", "budgetnet", "evaluate", model, "--json", "--device", check.device,
                      *check.data], folder / "evaluate.log"))
    (report_rc, _, _), *evaluated = run_all(jobs, until)
    trials = read_trials(table) if report_rc == 0 else None
    top1, top1_text = top1_of(*evaluated[0][:2]) if evaluated else (None, "-")
    check.searches[name] = {"summary": summary, "top1": top1, "workers": workers}
    t, (all_per_min, complete_per_min) = summary["trials"], per_minute(summary)
    best = f"{summary['best_val_acc']:.4f}" if summary.get("best_val_acc") is not None else "-"
    row = (f"| {name} | {status(rc, secs)} | {summary['precision']} | {summary['slice_seconds']:.1f} s | "
           f"{t['complete']} / {t['pruned']} / {t['rejected']} / {t['failed']} | "
           f"{t.get('pruned_by', {}).get('too slow', 0)} | {all_per_min:.1f}; {complete_per_min:.1f} | "
           f"{best} | {top1_text} | {summary['seconds_used']:.1f} of {summary['budget_seconds']:.0f} s "
           f"(overshoot {summary['overshoot_s']:.1f} s) |")
    notes = [speed_note(name, summary, trials)]
    if workers > 1:
        notes += against_one_worker(check, name)
    return Result([row], notes, ended(rc))


def per_minute(summary: dict) -> tuple[float, float]:
    """Trials per minute of a search's budget: all of them, and the complete ones."""
    t, minutes = summary["trials"], summary["budget_seconds"] / 60
    return (t["complete"] + t["pruned"] + t["rejected"] + t["failed"]) / minutes, t["complete"] / minutes


def read_trials(table: Path) -> list[dict] | None:
    """The study's trials as ``budgetnet report --csv`` wrote them (None if it did not)."""
    if not table.exists():
        return None
    with table.open(newline="") as f:
        return list(csv.DictReader(f))


def top1_of(rc: int | None, text: str) -> tuple[float | None, str]:
    """Test top-1 from ``budgetnet evaluate --json``'s output, as a number and as the table shows it."""
    report = next((o for o in reversed(json_objects(text)) if "top1" in o), None)
    if rc != 0 or report is None:
        return None, "-"
    return report["top1"], f"{report['top1']:.2%} ({report['precision']})"


def speed_note(name: str, summary: dict, trials: list[dict] | None) -> str:
    """The speed probe's rate against the trials' own, and the trials that ended too slow."""
    probe = summary.get("probe_images_per_s")
    note = f"- {name}: the speed probe read " + (f"{probe:,.0f} img/s" if probe else "nothing")
    if trials is None:
        return note + " (no trials table: see report.log)"
    rates = sorted(float(t["images_per_s"]) for t in trials if t.get("images_per_s"))
    if rates:
        note += (f"; the trials' own rates: median {statistics.median(rates):,.0f} img/s, "
                 f"{rates[0]:,.0f} to {rates[-1]:,.0f} ({len(rates)} trials)")
    slow = [t.get("reason") or "?" for t in trials if t.get("budgetnet_state") == "too slow"]
    note += f"; {len(slow)} of {len(trials)} trials ended too slow"
    return note + (f" (first: {slow[0]})" if slow else "")


def against_one_worker(check: Check, name: str) -> list[str]:
    """Trials per minute and test top-1 of search ``name`` against the one-worker search before it."""
    one = next((s for s in check.searches.values() if s["workers"] == 1), None)
    many = check.searches[name]
    if one is None:
        return [f"- {name}: no one-worker search to compare with (cut or failed)"]
    (all1, done1), (alln, donen) = per_minute(one["summary"]), per_minute(many["summary"])

    def ratio(n: float, base: float) -> str:
        return f"{n / base:.2f}x" if base else "- (none with one worker)"

    top1 = (f"test top-1 {many['top1']:.2%} against {one['top1']:.2%}"
            if many["top1"] is not None and one["top1"] is not None else "test top-1: -")
    return [f"- {many['workers']} workers against 1: {ratio(alln, all1)} the trials per minute "
            f"({ratio(donen, done1)} the complete ones); {top1}"]


def cuda_tests(check: Check, until: float) -> Result:
    """``pytest -m gpu`` over the test files that hold a GPU test (collecting the rest costs seconds)."""
    if importlib.util.find_spec("pytest") is None:  # the steps run this interpreter
        return Result(["pytest is not installed on this host: skipped"], outcome="skipped")
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text()) or ["tests"]
    rc, text, secs = run([check.py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files], until,
                         check.out / "cuda_tests.log")
    last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
    return Result([f"{status(rc, secs)}: {last[0]}" + (" (exit 5: no CUDA test ran here)" if rc == 5 else "")],
                  outcome=ended(rc))


def bench(script: str, args: list[str], log: str) -> Callable[[Check, float], Result]:
    """A step that runs ``scripts/<script>`` with ``args`` and keeps the Markdown tables it prints."""
    def step(check: Check, until: float) -> Result:
        rc, text, secs = run([check.py, f"scripts/{script}", *args], until, check.out / f"{log}.log")
        return Result(tables(text) or [f"({status(rc, secs)}; see {log}.log)"], outcome=ended(rc))
    return step


def plan(check: Check) -> list[Step]:
    """The steps in order, most informative first, with each one's estimated cost."""
    dev, out, smoke = check.device, check.out, check.smoke
    if smoke:
        toy = ["--dataset", "synthetic", "--max-params", "30k", "--trial-seconds", "2"]
        # 22 s: start-up (imports, data, the precision probe) once took 7 s of a 14 s budget under the suite
        one = ("synthetic, 22 s", [*toy, "--hours", "0.006"])
        many = ("synthetic, 14 s, 2 workers", [*toy, "--hours", "0.004"])
        workers, costs = 2, (40, 25)
    else:
        fm = ["--dataset", "fashion_mnist", "--max-params", "1e6", "--hours", f"{SEARCH_S / 3600:.6f}", *check.data]
        one, many = ("Fashion-MNIST, 2 min", fm), ("Fashion-MNIST, 2 min, 4 workers", fm)
        workers, costs = 4, (SEARCH_S + 25, SEARCH_S + 30)
    toy_bench = ["--batch-size", "8", "--steps", "1", "--warmup", "1", "--repeats", "1", "--models", "plain"]
    prec = [*toy_bench, "--fp16"] if smoke else ["--fp16", "--batch-size", "256", "--steps", "30", "--warmup", "10",
                                                  "--repeats", "3"]
    comp = ["--compile", "eager", *toy_bench] if smoke else ["--compile", "inductor", "--batch-size", "256",
                                                             "--steps", "30", "--warmup", "3", "--repeats", "1"]
    steps = [
        Step("machine", "machine", 8 if smoke else 30, machine),
        Step("search, 1 worker", "searches", costs[0], lambda c, u: search(c, u, *one, 1)),
        # under --smoke the first search shows evaluate runs: the suite's time
        Step(f"search, {workers} workers", "searches", costs[1],
             lambda c, u: search(c, u, *many, workers, evaluate=not smoke)),
        Step("CUDA tests", "tests", 10 if smoke else 30, cuda_tests),
        Step("precision table", "precision", 10 if smoke else 45,
             bench("bench_precision.py", ["--device", dev, "--json", str(out / "precision.json"), *prec], "precision")),
        Step("compile table", "compile", 10 if smoke else 90,
             bench("bench_precision.py", ["--device", dev, "--json", str(out / "compile.json"), *comp], "compile")),
    ]
    for model, repeats, cost in (("resnet20", 2, 60), ("resnet56", 1, 50))[:1 if smoke else 2]:
        pipe = ["--images", "64", "--batch-size", "32", "--workers", "0", "--warmup", "1", "--repeats", "1",
                "--no-train-run"] if smoke else ["--repeats", str(repeats)]
        pipe = ["--device", dev, "--model", model, "--json", str(out / f"pipeline_{model}.json"), *pipe]
        steps.append(Step(f"pipeline, {model}", model, 15 if smoke else cost,
                          bench("bench_pipeline.py", pipe, f"pipeline_{model}")))
    return steps


def run_steps(steps: list[Step], check: Check, end: float, clock: Callable[[], float] = time.time
              ) -> tuple[list[tuple[Step, Result]], list[str]]:
    """Run ``steps`` in order, cutting each whose estimate does not fit before ``end`` (less ``RESERVE_S``);
    each runs until ``check.slack`` times its estimate at most. The results, and the steps table's rows."""
    done, rows = [], []
    for step in steps:
        left = end - RESERVE_S - clock()
        if step.cost > left:
            rows.append(f"| {step.name} | {step.cost:.0f} s | - | cut: needs about {step.cost:.0f} s, "
                        f"{max(left, 0):.0f} s left |")
            continue
        print(f"gpu_check: {step.name} (about {step.cost:.0f} s; {left:.0f} s left)", file=sys.stderr, flush=True)
        t = clock()
        try:
            result = step.fn(check, t + min(left, check.slack * step.cost))
        except Exception as e:  # a broken step must not cost the block
            result = Result([f"({step.name} failed: {type(e).__name__}: {e})"[:300]], outcome="failed")
        done.append((step, result))
        rows.append(f"| {step.name} | {step.cost:.0f} s | {clock() - t:.0f} s | {result.outcome} |")
    return done, rows


def render(done: list[tuple[Step, Result]]) -> list[str]:
    """The sections in the order their first step ran: heading, every step's rows, then their notes."""
    lines: list[str] = []
    for section in dict.fromkeys(step.section for step, _ in done):
        results = [r for step, r in done if step.section == section]
        lines += ["", *SECTIONS[section]]
        lines += [row for r in results for row in r.rows]
        notes = [note for r in results for note in r.notes]
        lines += ["", *notes] if notes else []
    return lines


def bring_back(out: Path, dest: Path) -> None:
    """Copy the block, and one archive of the text outputs (logs, JSON, CSV), into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "gpu_check.md", dest)
    with tarfile.open(dest / "gpu_check_logs.tar.gz", "w:gz") as tar:
        for p in sorted(out.rglob("*")):
            if p.is_file() and p.suffix in (".log", ".json", ".csv", ".md"):
                tar.add(p, arcname=str(p.relative_to(out)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the same steps on the CPU at toy sizes")
    ap.add_argument("--out", type=Path, default=None, help="raw outputs (default gpu_check_out)")
    ap.add_argument("--deadline", type=float, default=DEADLINE_S,
                    help=f"seconds for the whole run, from gpu_check.sh's start (default {DEADLINE_S:.0f})")
    args = ap.parse_args(argv)
    started = float(os.environ.get("GPU_CHECK_T0") or time.time())  # gpu_check.sh's start: its install counts
    out = (args.out or ROOT / "gpu_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = ["--data-dir", ".data"] if (ROOT / ".data" / "fashion-mnist").is_dir() else []
    check = Check(sys.executable, args.smoke, out, data)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    block = [f"### GPU check ({'smoke, CPU' if args.smoke else 'cuda'}), {datetime.date.today()}, "
             f"commit {commit.stdout.strip() or '?'}", "",
             "Command: `scripts/gpu_check.sh" + (" --smoke" if args.smoke else "")
             + (f" --deadline {args.deadline:g}" if args.deadline != DEADLINE_S else "") + "`"]
    done, step_rows = run_steps(plan(check), check, started + args.deadline)
    block += render(done)
    block += ["", f"**Steps** (deadline {args.deadline:.0f} s; estimates for "
              f"{'a 2-core CPU' if args.smoke else 'an H100'}; a step that would not fit is cut):", "",
              "| step | estimate | took | outcome |", "|---|---:|---:|---|", *step_rows,
              "", f"({time.time() - started:.0f} s in all; raw logs and JSON in `{out}`)"]
    text = "\n".join(block) + "\n"
    (out / "gpu_check.md").write_text(text)
    print(text)
    if args.out is None and os.environ.get("OUT"):
        bring_back(out, Path(os.environ["OUT"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
