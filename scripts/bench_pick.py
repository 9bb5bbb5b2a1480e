"""The final pick (``--pick``) at equal budget on real Fashion-MNIST, paired: each seed's search phase is run
once, and every pick trains its final phase from that same search.

Per seed: one ``budgetnet search --pick observed`` (the full command; its model is observed's result). Its
study is then copied once per other pick, set back to the moment its final phase began (the seconds used
then, from the pick's record; no final run, no race), and ``budgetnet search --pick P`` resumes each copy:
the same trials, the same time left, only the pick and what it trains differ. A pick whose decision is
another's (estimate naming observed's trial; estimate+race racing race's finalists) trains what that one
trained: its result is that one's, not run again (``reused``). A
resumed copy also pays its process start-up (a few seconds) out of its final phase, a bias against the
picks other than observed. Each model is evaluated on the official test split.

    python scripts/bench_pick.py --minutes 10 --seeds 0 1 2 3 4 5

Results: OUT_DIR/results.json, and a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import evaluate_checkpoint  # noqa: E402

from budgetnet.search import attrs as A  # noqa: E402
from budgetnet.search.clock import WRITE_RESERVE_S  # noqa: E402

PICKS = ("observed", "estimate", "race", "estimate+race")  # in this order: a reused pick's source comes first


def search(args, seed: int, db: Path, ckpt: Path, pick: str, env: dict, log: Path) -> dict:
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "budgetnet", "search", "--dataset", args.dataset,
                           "--max-params", args.max_params, "--hours", f"{args.minutes / 60:.6f}", "--storage", f"sqlite:///{db}",
                           "--study-name", "pick", "--artifact-dir", str(db.parent / "artifacts"), "--out", str(ckpt),
                           "--seed", str(seed), "--pick", pick, "--device", args.device, "--json", *data],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout + proc.stderr)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = next((e for e in events if e.get("event") == "summary"), {})
    return {"wall_s": round(wall, 1), "rc": proc.returncode, "summary": summary,
            "messages": [e["text"] for e in events if e.get("event") == "message"]}


def set_back(src: Path, dst: Path) -> None:
    """Copy the study at ``src`` to ``dst`` as it stood when its final phase began."""
    import optuna

    shutil.copyfile(src, dst)
    study = optuna.load_study(study_name="pick", storage=f"sqlite:///{dst}")
    used = A.BUDGET_SECONDS.of(study) - WRITE_RESERVE_S - A.PICK.of(study)["final_seconds"]
    for attr, value in ((A.SECONDS_USED, used), (A.FINAL_RUNS, 0), (A.FINAL_DONE, False), (A.RACE, {}),
                        (A.FINAL_FAILED, None), (A.FINAL_SKIPPED, None), (A.FINAL_CHECK, None), (A.PICK, {}),
                        (A.TTA, None)):
        attr.set(study, value)


def row_of(pick: str, seed: int, run: dict, test: dict, reused: bool = False) -> dict:
    s = run["summary"]
    p = s.get("pick") or {}
    return {"pick": pick, "seed": seed, "trial": s.get("picked_trial"), "observed_best": p.get("observed_best"),
            "estimate_best": p.get("estimate_best"), "by": p.get("by"), "race": p.get("race"),
            "final_seconds": (p.get("final_seconds") if p else None), "phase": s.get("checkpoint_phase"),
            "family": s.get("family"), "n_params": s.get("n_params"), "seconds_used": s.get("seconds_used"),
            "wall_s": run["wall_s"], "rc": run["rc"], "reused": reused, **test}


def same_as(db: Path, pick: dict) -> dict[str, str]:
    """The picks whose decision is another's on this study: estimate is observed when both name the same
    trial; a race pick with no race to run is its ranking's pick; estimate+race is race when both would
    race the same finalists."""
    import optuna

    from budgetnet.search.pick import choose
    from budgetnet.search.race import plan

    study = optuna.load_study(study_name="pick", storage=f"sqlite:///{db}")
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    leader = pick["estimates"][str(pick["trial"])]
    rate = A.IMAGES_PER_S.of(next(t for t in done if t.number == pick["trial"]))
    images = round(rate * pick["final_seconds"] / leader["final_epochs"])  # train+validation
    racers = {}
    for name in ("race", "estimate+race"):  # who would race: the finalists the race's plan keeps
        planned = plan(choose(done, name, pick["final_seconds"], images)[0].finalists, pick["final_seconds"],
                       A.SLICE_SECONDS.of(study))
        racers[name] = [r.trial.number for r in planned[0]] if isinstance(planned, tuple) else []
    same = {}
    if pick.get("estimate_best") == pick.get("observed_best"):
        same["estimate"] = "observed"
    if not racers["race"]:
        same["race"] = "observed"
    if not racers["estimate+race"]:
        same["estimate+race"] = "estimate"
    if racers["race"] and racers["race"] == racers["estimate+race"]:
        same["estimate+race"] = "race"
    return same


def one_seed(args, seed: int, out_dir: Path, env: dict, done: list[dict]) -> list[dict]:
    db = out_dir / f"s{seed}-observed.db"
    rows = [r for r in done if r["seed"] == seed]
    if not rows:
        run = search(args, seed, db, out_dir / f"s{seed}-observed.pt", "observed", env,
                     out_dir / f"s{seed}-observed.log")
        rows.append(row_of("observed", seed, run, evaluate_checkpoint(out_dir / f"s{seed}-observed.pt", args, env)))
        print(json.dumps(rows[0]), flush=True)
    import optuna

    pick = A.PICK.of(optuna.load_study(study_name="pick", storage=f"sqlite:///{db}"))
    same = same_as(db, pick)
    for name in args.picks:
        if any(r["pick"] == name for r in rows):
            continue
        if name in same:  # the same decision: the same final, not trained again
            rows.append({**next(r for r in rows if r["pick"] == same[name]), "pick": name, "reused": True})
            print(json.dumps(rows[-1]), flush=True)
            continue
        copy = out_dir / f"s{seed}-{name}.db"
        set_back(db, copy)
        ckpt = out_dir / f"s{seed}-{name}.pt"
        branch = search(args, seed, copy, ckpt, name, env, out_dir / f"s{seed}-{name}.log")
        rows.append(row_of(name, seed, branch, evaluate_checkpoint(ckpt, args, env)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], picks) -> list[str]:
    lines = ["| pick | test top-1 mean | worst seed | spread | per seed | trial picked (observed's) | where it differed from observed "
             "| flip averaging on | one view: mean / worst |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {r["seed"]: r.get("test_acc") for r in rows if r["pick"] == "observed"}
    for p in picks:
        rs = [r for r in rows if r["pick"] == p and r.get("test_acc") is not None]
        if not rs:
            continue
        accs = [r["test_acc"] for r in rs]
        per = " / ".join(f"{r['test_acc']:.2%}" for r in rs)
        which = " / ".join(f"{r['trial']} ({r['observed_best']})" for r in rs)
        moved = [r["test_acc"] - base[r["seed"]] for r in rs if r["trial"] != r["observed_best"] or r.get("race")]
        moved_s = ", ".join(f"{m * 100:+.2f}" for m in moved) + " pts" if moved else "never differed"
        single = [r.get("test_single") or r["test_acc"] for r in rs]  # rows from before tta: one view
        flips = sum(r.get("tta") == "flip" for r in rs)
        lines.append(f"| {p} | {statistics.mean(accs):.2%} | {min(accs):.2%} | {(max(accs) - min(accs)) * 100:.2f} pts "
                     f"| {per} | {which} | {moved_s} | {flips} of {len(rs)} | {statistics.mean(single):.2%} / "
                     f"{min(single):.2%} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--picks", nargs="+", default=list(PICKS), choices=PICKS)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 2))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--max-params", default="1e6")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--resume", action="store_true", help="keep the rows OUT_DIR/results.json has, run the rest")
    args = p.parse_args()
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_pick_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    print(f"seeds {args.seeds}, {args.minutes} min each, picks {args.picks}; files in {out_dir}", flush=True)
    results = out_dir / "results.json"
    earlier = json.loads(results.read_text())["rows"] if args.resume and results.exists() else []
    rows = [r for r in earlier if r["seed"] not in args.seeds]  # a resumed file keeps the seeds not run now
    for seed in args.seeds:
        rows += one_seed(args, seed, out_dir, env, earlier)
        results.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print("\n".join(["", *table(sorted(rows, key=lambda r: r["seed"]), args.picks)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
