"""What a search ended with, in words and numbers: the trials by state, the best trial, why nothing was
trained, the caps as said to the user, the dashboard command. Read by the session's summary."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from budgetnet.latency import thread_label
from budgetnet.search import attrs as A
from budgetnet.search.attrs import State
from budgetnet.search.options import SearchOptions
from budgetnet.search.storage import shown_url
from budgetnet.search.trial import MIN_EPOCHS_PER_TRIAL


def caps_note(opts: SearchOptions) -> str:
    """The caps a search holds its models to, with their units."""
    said = [f"{opts.max_params:,.0f} parameters"]
    if opts.max_flops is not None:
        said.append(f"{opts.max_flops / 1e6:,.4g} M MACs per image ({2 * opts.max_flops / 1e6:,.4g} MFLOPs)")
    if opts.max_latency_ms is not None:
        said.append(f"{opts.max_latency_ms:g} ms at batch 1 on {opts.latency_device} "
                    f"({thread_label(opts.latency_threads)})")
    return ", ".join(said)


def cap_flags(opts: SearchOptions) -> list[str]:
    return ["--max-params"] + ["--max-flops"] * (opts.max_flops is not None) + \
        ["--max-latency-ms"] * (opts.max_latency_ms is not None)


def over_caps(check: dict, opts: SearchOptions) -> str:
    """The caps ``check`` (``final.check_caps``) breaks, with the figures."""
    said = {"n_params": f"{check['n_params']:,} parameters, cap {opts.max_params:,.0f}",
            "macs": f"{check['macs']:,} MACs, cap {opts.max_flops or 0:,.0f}",
            "latency_ms": f"{check['latency_ms']:.3f} ms, cap {opts.max_latency_ms or 0:g} ms"}
    return "; ".join(said[k] for k in check["over"])


def counts(study: optuna.Study) -> dict:
    """Trials by Optuna state (rejected apart from pruned), and ``pruned_by``: the pruned ones by budgetnet's
    state (pruned by the pruner, too slow, diverged, out of memory, stopped), as ``budgetnet report`` counts."""
    counted = {"complete": 0, "pruned": 0, "rejected": 0, "failed": 0}
    pruned_by: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            counted["complete"] += 1
        elif t.state == TrialState.PRUNED:
            state = A.STATE.of(t) or State.PRUNED
            counted["rejected" if state == State.REJECTED else "pruned"] += 1
            if state != State.REJECTED:
                pruned_by[state] = pruned_by.get(state, 0) + 1
        elif t.state == TrialState.FAIL:
            counted["failed"] += 1
    counted["pruned_by"] = dict(sorted(pruned_by.items(), key=lambda kv: -kv[1]))
    return counted


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(done, key=lambda t: t.value) if done else None


def picked_trial(study: optuna.Study, pick: dict | None) -> optuna.trial.FrozenTrial | None:
    """The trial the final phase's pick named (``attrs.PICK``), or None."""
    if not pick:
        return None
    return next((t for t in study.get_trials(deepcopy=False) if t.number == pick.get("trial")), None)


def pick_summary(pick: dict | None, race: dict | None, tta: dict | None = None) -> dict | None:
    """How the final config was picked, for ``best.json``: ``by`` observed, estimate or race, the trial, the
    observed best, the estimates of both, the race's figures when one ran or was skipped, and how the final
    model predicts (``tta``: one view or the flip average, and why)."""
    if not pick:
        return None
    est = pick.get("estimates", {})
    out = {k: pick.get(k) for k in ("asked", "by", "trial", "observed_best", "estimate_best", "final_seconds")}
    out["estimate"] = est.get(str(pick.get("trial")))
    out["observed_best_estimate"] = est.get(str(pick.get("observed_best")))
    out["finalists"] = pick.get("finalists", [])
    if race:
        out["race"] = race
    if tta:
        out["tta"] = tta
    out["line"] = pick_line(out)
    return out


def pick_line(pick: dict | None) -> str | None:
    """One line: how the final config was picked (None: no pick was made)."""
    if not pick:
        return None
    said = {"observed": "by its validation accuracy at the end of its slice",
            "estimate": "by its validation accuracy estimated at the final phase's epochs",
            "race": "by the final race"}[pick["by"]]
    line = f"final config: trial {pick['trial']}, picked {said} (--pick {pick['asked']})"
    est = pick.get("estimate")
    if pick["by"] == "estimate" and est:
        line += f": {est['observed']:.4f} observed, {est['value']:.4f} estimated at {est['final_epochs']:.1f} epochs"
    race = pick.get("race") or {}
    if race.get("legs"):
        legs = ", ".join(f"trial {n} {leg['val_acc']:.4f}" if "val_acc" in leg else f"trial {n} failed"
                         for n, leg in race["legs"].items())
        line += f"; race legs of {race['leg_seconds']:.0f} s: {legs}"
    elif race.get("why"):
        line += f"; race skipped: {race['why']}"
    if pick["trial"] != pick["observed_best"]:
        line += f"; the observed best was trial {pick['observed_best']}"
    if pick.get("tta"):
        line += f"; test-time flip averaging {'on' if pick['tta']['tta'] == 'flip' else 'off'}: {pick['tta']['why']}"
    return line


def nothing_trained(study: optuna.Study, opts: SearchOptions, slice_s: float, search_end: float,
                    train_images: int, precision: str) -> str:
    """One line: why a search completed no trial, and what to change."""
    states = [A.STATE.of(t) for t in study.get_trials(deepcopy=False)]
    more = "give more --hours or a smaller --max-params"
    if all(s in (None, State.STOPPED) for s in states):  # nothing trained (None: the queued warm start)
        return (f"no trial could run: the {search_end:.0f} s search phase cannot hold one {slice_s:.0f} s trial "
                f"slice after start-up; give more --hours (or a smaller --trial-seconds)")
    if State.TOO_SLOW in states and all(s in (State.TOO_SLOW, State.STOPPED, State.REJECTED) for s in states):
        rate = A.PROBE_IMAGES_PER_S.of(study) or 0.0
        return (f"no model could learn in its slice: this {opts.device} trains {rate:,.0f} images/s in {precision} "
                f"(a reference ResNet-14), so a {slice_s:.0f} s slice cannot show a sampled model "
                f"{MIN_EPOCHS_PER_TRIAL:g} epoch of the {train_images:,} training images; {more}")
    if all(s in (State.REJECTED, State.STOPPED) for s in states):
        return f"every sampled model was over a cap ({caps_note(opts)}); raise {' or '.join(cap_flags(opts))}"
    seen = ", ".join(f"{n} {s}" for s, n in sorted(
        {s: states.count(s) for s in set(states) if s}.items(), key=lambda kv: -kv[1]))
    return f"no trial completed ({seen}); see the reasons in the study (budgetnet dashboard); {more}"


def dashboard_command(storage: str, artifact_dir: str) -> str:
    """The command that serves the study in optuna-dashboard: the URL with its driver named (one this
    machine has), the password as ``***``."""
    return f"optuna-dashboard {shown_url(storage, resolve=True)} --artifact-dir {artifact_dir}"
