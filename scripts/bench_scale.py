"""Scaling a search out: trials per 10 minutes of budget, the test accuracy of each run's best.pt, and the
overhead per trial against a bare ``train_run``, for ``budgetnet search --workers N`` on each ``--backend``
(optuna: N local processes; ray: N trials at once in a local Ray, started and charged inside the budget).

Each run is a real ``budgetnet search`` process (journal-file storage, the documented one for several local
processes), then ``budgetnet evaluate`` of its ``best.pt`` on the official test split. Runs go one after
the other, so each has the machine to itself; seeds are the outer loop, so every worker count meets the
same machine conditions.

Overhead per trial: in each worker's own timeline, the time from one trial's start to its next trial's
start, less the trial's ``seconds`` (the wall time its ``train_run`` took, evaluations included): sampling,
width fitting, the guard, storage writes, best.pt writes and the time between trials. The last trial of
each worker has no successor and is left out. Ray trials carry no worker index: they are dealt to N lanes
in start order, each to the lane that freed first (a trial starts when the driver asks for it, so the gap
also holds Tune's scheduling and the actor's start).

With ``--join``: two ``budgetnet search`` commands on one study (a journal file), each pinned to one core with
``taskset`` and one thread to stand in for two machines, the second started once the first's session is
ready (it joins), against one command on both cores. Trials per 10 minutes count the study's trials of
both; the test accuracy is the leader's ``best.pt``.

    python scripts/bench_scale.py --minutes 10 --workers 1 2 --seeds 0 1            # Fashion-MNIST, > 40 min
    python scripts/bench_scale.py --minutes 10 --join --seeds 0 1                   # Fashion-MNIST, > 40 min
    python scripts/bench_scale.py --minutes 2 --join --no-pin --workers 2 --device cuda   # one GPU, two ways
    python scripts/bench_scale.py --dataset synthetic --minutes 0.7 --seeds 0 --max-params 30k \
        --backend optuna ray --workers 1 2                                          # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import evaluate_checkpoint, search_and_evaluate  # noqa: E402 - scripts is not a package


def _lanes(trials: list, n: int) -> dict[int, list]:
    """Trials dealt to ``n`` lanes in start order, each to the lane that freed first (Ray's N slots)."""
    free, lanes = [None] * n, {}
    for t in sorted(trials, key=lambda t: t.datetime_start):
        k = min(range(n), key=lambda i: (free[i] is not None, free[i] or t.datetime_start))
        lanes.setdefault(k, []).append(t)
        free[k] = t.datetime_complete
    return lanes


def overheads(storage: str, ray_lanes: int | None = None) -> tuple[list[float], dict]:
    """Per-trial overhead (seconds) of every worker's trials but its last, and the study's trial counts.
    ``ray_lanes``: a Ray study's trials are dealt to that many lanes instead of grouped by worker."""
    import optuna

    from budgetnet.search.storage import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = make_storage(storage)
    study = optuna.load_study(study_name=store.get_all_studies()[0].study_name, storage=store)
    by_worker: dict = {}  # (the joining command, the worker index): one process's trials
    timed = [t for t in study.trials if t.datetime_start is not None and t.datetime_complete is not None]
    for t in timed:
        by_worker.setdefault((t.user_attrs.get("joined"), t.user_attrs.get("worker", 0)), []).append(t)
    if ray_lanes:
        by_worker = _lanes(timed, ray_lanes)
    out = []
    for trials in by_worker.values():
        trials.sort(key=lambda t: t.datetime_start)
        for t, nxt in zip(trials, trials[1:]):
            out.append((nxt.datetime_start - t.datetime_start).total_seconds() - t.user_attrs.get("seconds", 0.0))
    states = [t.state.name for t in study.trials]
    return out, {s: states.count(s) for s in set(states)}


def run_one(backend: str, workers: int, seed: int, args, out_dir: Path) -> dict:
    budget_s = args.minutes * 60
    tag = f"{backend}-w{workers}-s{seed}"
    ckpt, storage = out_dir / f"{tag}.pt", str(out_dir / f"{tag}.study.log")  # TAG.log: the output
    run = search_and_evaluate(
        ["--dataset", args.dataset, "--max-params", args.max_params, "--hours", f"{budget_s / 3600:.6f}",
         "--storage", storage, "--artifact-dir", str(out_dir / "artifacts"), "--out", str(ckpt),
         "--seed", str(seed), "--workers", str(workers), "--backend", backend, "--json"],
        tag, ckpt, args, out_dir, dict(os.environ, PYTHONUNBUFFERED="1"))
    over, states = overheads(storage, workers if backend == "ray" else None) if Path(storage).exists() else ([], {})
    complete = states.get("COMPLETE", 0)
    row = {"backend": backend, "workers": workers, "seed": seed, "budget_s": budget_s, "wall_s": round(run["wall_s"], 1),
           "rc": run["rc"], "overshoot_s": round(max(0.0, run["wall_s"] - budget_s), 1), "states": states,
           "trials_per_10min": round(sum(states.values()) * 600 / budget_s, 1),
           "complete_per_10min": round(complete * 600 / budget_s, 1),
           "overhead_median_s": round(statistics.median(over), 3) if over else None,
           "overhead_mean_s": round(statistics.mean(over), 3) if over else None,
           "best_val_acc": run["summary"].get("best_val_acc"),
           "checkpoint_phase": run["summary"].get("checkpoint_phase"), "test_acc": run.get("test_acc")}
    print(json.dumps(row), flush=True)
    return row


def _session_ready(storage: str, name: str) -> bool:
    from budgetnet.search import attrs as A
    from budgetnet.search.storage import stored_study_attrs

    try:
        attrs = stored_study_attrs(storage, name) or {}
    except Exception:  # noqa: BLE001 - the database may be mid-creation
        return False
    return bool(A.READY.of(attrs)) and A.READY.of(attrs) == A.SESSION.of(attrs)


def run_join(seed: int, args, out_dir: Path) -> dict:
    """Two commands on one study, each pinned to its own core: the first leads, the second joins."""
    budget_s, tag = args.minutes * 60, f"join-s{seed}"
    storage = str(out_dir / f"{tag}.study.log")  # the journal file, as the one-command runs use
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.pin:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs, t0 = [], time.perf_counter()
    for core, who in (("0", "a"), ("1", "b")):
        pin = ["taskset", "-c", core] if args.pin else []
        cmd = [*pin, sys.executable, "-m", "budgetnet", "search", "--dataset", args.dataset,
               "--max-params", args.max_params, "--hours", f"{budget_s / 3600:.6f}", "--storage", storage,
               "--study-name", tag, "--artifact-dir", str(out_dir / "artifacts"), "--out",
               str(out_dir / f"{tag}-{who}.pt"), "--seed", str(seed), "--json", "--device", args.device, *data]
        log = open(out_dir / f"{tag}-{who}.log", "w")  # noqa: SIM115 - closed with its process
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log))
        while who == "a" and not _session_ready(storage, tag) and time.perf_counter() - t0 < 300:
            time.sleep(0.5)
    for proc, log in procs:
        proc.wait()
        log.close()
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in (out_dir / f"{tag}-a.log").read_text().splitlines()
              if line.startswith("{")]
    summary = next((e for e in events if e.get("event") == "summary"), {})
    over, states = overheads(storage)
    row = {"backend": "join", "workers": 2, "seed": seed, "budget_s": budget_s, "wall_s": round(wall, 1),
           "rc": [p.returncode for p, _ in procs], "overshoot_s": round(max(0.0, wall - budget_s), 1),
           "states": states, "trials_per_10min": round(sum(states.values()) * 600 / budget_s, 1),
           "complete_per_10min": round(states.get("COMPLETE", 0) * 600 / budget_s, 1),
           "overhead_median_s": round(statistics.median(over), 3) if over else None,
           "overhead_mean_s": round(statistics.mean(over), 3) if over else None,
           "best_val_acc": summary.get("best_val_acc"), "checkpoint_phase": summary.get("checkpoint_phase"),
           "test_acc": evaluate_checkpoint(out_dir / f"{tag}-a.pt", args, env).get("test_acc")}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of every run")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--backend", nargs="+", choices=("optuna", "ray"), default=["optuna"],
                   help="search backends to measure (each with every --workers count)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--max-params", default="1e6")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="default: budgetnet's search order (Debian's folder too)")
    p.add_argument("--out-dir", default=None, help="where journals, checkpoints and logs go")
    p.add_argument("--join", action="store_true",
                   help="two joined commands, one core each, against one command (with each --workers count)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="with --join: no taskset, default threads (two commands sharing one GPU)")
    args = p.parse_args()
    if args.join:
        args.backend = ["optuna", "join"]
        args.workers = args.workers if "--workers" in sys.argv else [1]

    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_scale_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = [(b, w) for b in args.backend for w in ([0] if b == "join" else args.workers)]
    print(f"{len(args.seeds) * len(configs)} runs of {args.minutes} min, one at a time; "
          f"files in {out_dir}", flush=True)
    rows = [run_join(s, args, out_dir) if b == "join" else run_one(b, w, s, args, out_dir)
            for s in args.seeds for b, w in configs]
    (out_dir / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))

    base = {}
    print("\n| backend | workers | trials / 10 min (all; complete) | vs optuna, 1 worker | test acc per seed | "
          "overhead per trial (median; mean) | max overshoot |")
    print("|---|---|---|---|---|---|---|")
    for b, w in configs:
        rs = [r for r in rows if r["backend"] == b and (r["workers"] == w or b == "join")]
        per10 = statistics.mean(r["trials_per_10min"] for r in rs)
        base.setdefault("per10", per10)
        accs = " / ".join(f"{r['test_acc']:.2%}" if r.get("test_acc") is not None else "-" for r in rs)
        med = [r["overhead_median_s"] for r in rs if r["overhead_median_s"] is not None]
        mean = [r["overhead_mean_s"] for r in rs if r["overhead_mean_s"] is not None]
        over = f"{statistics.mean(med):.2f} s; {statistics.mean(mean):.2f} s" if med else "-"
        joined = "2 commands" + (", 1 core each" if args.pin else "")
        print(f"| {b} | {joined if b == 'join' else w} | {per10:.1f}; {statistics.mean(r['complete_per_10min'] for r in rs):.1f} | "
              f"{per10 / base['per10']:.2f}x | {accs} | {over} | {max(r['overshoot_s'] for r in rs):.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
