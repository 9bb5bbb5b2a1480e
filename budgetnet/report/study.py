"""``budgetnet report``'s reading side: a study opened read-only, its trials as a table, its summary.

Any budgetnet study (finished, running or resumed) can be read; a storage that does not exist is refused,
never created. Trials written by another budgetnet version may lack some attrs: an empty column, never
an error.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from datetime import datetime
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from budgetnet.checkpoint import CheckpointError, load_checkpoint
from budgetnet.config import ConfigError
from budgetnet.errors import first_line
from budgetnet.evaluate import evaluation_path
from budgetnet.finetune import described
from budgetnet.search import attrs as A
from budgetnet.search.clock import REPORT_STEPS
from budgetnet.search.outcome import pick_summary
from budgetnet.search.record import guard_overhead
from budgetnet.search.storage import check_journal, local_path, make_storage, shown_url
from budgetnet.search.workers import orphaned

# trials_dataframe() column -> the report's column, in the table's order
TRIAL_ATTRS = {
    "number": "number",
    "state": "state",  # Optuna's: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    f"user_attrs_{A.STATE}": "budgetnet_state",
    f"user_attrs_{A.REASON}": "reason",
    "value": "val_acc",
    **{f"user_attrs_{a}": str(a) for a in (A.FAMILY, A.N_PARAMS, A.FLOPS, A.LATENCY_MS, A.SECONDS, A.IMAGES_PER_S,
                                           A.EPOCHS)},
    "datetime_start": "datetime_start",
    "datetime_complete": "datetime_complete",
}
DROPPED = (f"user_attrs_{A.CONFIG}", f"user_attrs_{A.CURVE}")  # the config JSON (summary.json has the best's),
# and the curve (the learning-curves page draws it)
STUDY_ATTRS = A.REPORTED_STUDY_ATTRS  # missing: None


class ReportError(ConfigError):
    """No such storage or study, or nowhere to write (a user mistake: one line, exit code 2)."""


def _read_storage(url: str) -> tuple[optuna.storages.BaseStorage, list[str]]:
    """Storage ``url``, opened once, and the names of its studies. Raises ReportError (one line) for a
    storage file that does not exist, which is not created, or one Optuna cannot read."""
    path = local_path(url)
    if path is not None and not path.is_file():
        raise ReportError(f"no study storage at {path} (--storage {url})")
    check_journal(url)
    try:
        storage = make_storage(url, create=False)
        return storage, [s.study_name for s in storage.get_all_studies()]
    except Exception as e:  # noqa: BLE001 - not a database optuna can read: say so in one line
        raise ReportError(f"cannot read --storage {shown_url(url)}: {first_line(e, cause=True)}") from None


def study_names(url: str) -> list[str]:
    """The names of the studies in storage ``url`` (ReportError as ``_read_storage``)."""
    return _read_storage(url)[1]


def open_study(url: str, name: str | None = None) -> optuna.Study:
    """Load a study for reading. Without ``name``, the storage's only study. Raises ReportError (one
    line) for a storage file that does not exist, which is not created, or a study that is not in it."""
    storage, names = _read_storage(url)
    if not names:
        raise ReportError(f"--storage {shown_url(url)} holds no study")
    if name is None:
        if len(names) > 1:
            raise ReportError(f"--storage {shown_url(url)} holds {len(names)} studies ({', '.join(sorted(names))}); "
                              f"choose one with --study-name")
        name = names[0]
    elif name not in names:
        raise ReportError(f"no study named {name!r} in {shown_url(url)}; it holds: {', '.join(sorted(names))}")
    study = optuna.load_study(study_name=name, storage=storage)
    try:
        study.get_trials(deepcopy=False)  # a damaged file fails here, in one line, not halfway through a report
    except Exception as e:  # noqa: BLE001
        raise ReportError(f"cannot read the trials of study {name!r} in {shown_url(url)}: "
                          f"{first_line(e, cause=True)}") from None
    return study


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: ``TRIAL_ATTRS`` (renamed), ``progress`` (the share of its slice the trial
    reached), ``duration_s``, the Pareto flags, then the sampled ``params_*`` and any other user attrs."""
    raw = study.trials_dataframe(attrs=("number", "value", "datetime_start", "datetime_complete", "params",
                                        "user_attrs", "state"))
    df = raw.reindex(columns=[*TRIAL_ATTRS, *[c for c in raw.columns if c not in TRIAL_ATTRS]])
    df = df.drop(columns=[c for c in DROPPED if c in df.columns]).rename(columns=TRIAL_ATTRS)
    for col in ("datetime_start", "datetime_complete"):  # typed even when empty or never set
        df[col] = pd.to_datetime(df[col])
    for col in ("val_acc", "latency_ms", "seconds", "images_per_s", "epochs"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    # Counts stay integers where a trial lacks them (a rejected one has no FLOPs).
    for col in ("number", "n_params", "flops"):
        df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
    df["state"] = df["state"].astype("string")
    df["budgetnet_state"] = df["budgetnet_state"].astype("string").fillna(df["state"].map(A.OF_OPTUNA_STATE))
    # A RUNNING trial whose lease ran out, with no process alive here, is a killed search's (the next run of
    # the command fails it). Ray's trials hold no lease to judge them by.
    if A.RAY_EXPERIMENT not in study.user_attrs:
        now = time.time()
        lapsed = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                  if orphaned(t, now) is not None]
        df.loc[df["number"].isin(lapsed) & (df["state"] == "RUNNING"), "budgetnet_state"] = A.State.INTERRUPTED
    steps = {t.number: max(t.intermediate_values) / REPORT_STEPS
             for t in study.get_trials(deepcopy=False) if t.intermediate_values}
    df.insert(df.columns.get_loc("val_acc") + 1, "progress", df["number"].map(steps).astype("Float64"))
    duration = (df["datetime_complete"] - df["datetime_start"]).dt.total_seconds()
    df.insert(df.columns.get_loc("datetime_complete") + 1, "duration_s", duration)
    if f"user_attrs_{A.ESTIMATE}" in df.columns:  # the estimate's value beside the observed one
        df[f"user_attrs_{A.ESTIMATE}"] = pd.to_numeric(df[f"user_attrs_{A.ESTIMATE}"].map(
            lambda e: e.get("value") if isinstance(e, dict) else None), errors="coerce")
    complete = df["state"] == "COMPLETE"
    for key in ("n_params", "flops", "latency_ms"):
        df[f"pareto_{key}"] = pareto_front(df[complete], key).reindex(df.index, fill_value=False)
    return df.rename(columns=lambda c: c.replace("user_attrs_", ""))


def pareto_front(df: pd.DataFrame, cost: str) -> pd.Series:
    """True for the rows no other row dominates: none costs less and is at least as accurate, none costs
    as much and is more accurate. (Equal rows are both on the front.)"""
    d = df[[cost, "val_acc"]].dropna()
    best_at = d.groupby(cost)["val_acc"].max()  # ascending cost
    best_cheaper = best_at.cummax().shift(fill_value=-math.inf)
    front = (d["val_acc"] > d[cost].map(best_cheaper)) & (d["val_acc"] >= d[cost].map(best_at))
    return front.reindex(df.index, fill_value=False)


def _number(x):
    """A JSON-safe plain number (pandas and numpy scalars, NaN -> None)."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA:
        return None
    return x.item() if hasattr(x, "item") else x


def checkpoint_info(path: str | Path, study_name: str) -> dict:
    """What the report says about a checkpoint: its phase and trial, and the test accuracy that
    ``budgetnet evaluate`` saved for these exact bytes (``None`` if it saved none, or for other bytes).
    Raises CheckpointError for a file that is not a budgetnet checkpoint or belongs to another study."""
    # The time before the bytes: a search may replace the file meanwhile, and then the time is the older one's.
    written = datetime.fromtimestamp(Path(path).stat().st_mtime).isoformat()
    ckpt = load_checkpoint(path)
    owner = ckpt["extra"].get("study")
    if owner != study_name:
        raise CheckpointError(f"{path} holds the model of study {owner!r}, not {study_name!r}")
    info = {"path": str(path), "phase": ckpt["extra"].get("phase"), "trial": ckpt["extra"].get("trial"),
            "n_params": ckpt["n_params"], "flops": ckpt["flops"], "test_top1": None, "test_top5": None,
            "evaluation": None, "written": written, "sha256": ckpt["sha256"],
            "fine_tuned": described(ckpt["extra"])}
    saved = evaluation_path(path)
    if saved.is_file():
        try:
            ev = json.loads(saved.read_text())
        except (OSError, ValueError):
            return info
        if ev.get("checkpoint_sha256") == ckpt["sha256"]:  # the bytes read above; else another model's
            info.update(test_top1=ev.get("top1"), test_top5=ev.get("top5"), evaluation=str(saved),
                        evaluated_precision=ev.get("precision"), evaluated_device=ev.get("device"),
                        deployment_latency=ev.get("deployment_latency"))
    return info


def study_summary(study: optuna.Study, df: pd.DataFrame, checkpoint: dict | None,
                  checkpoint_note: str | None = None) -> dict:
    """The page's summary block as a dict (also ``summary.json`` and ``--json``). ``checkpoint`` is
    ``checkpoint_info``'s; ``checkpoint_note`` says why there is none."""
    attrs = study.user_attrs
    summary = {"study": study.study_name, **{str(k): k.of(attrs) for k in STUDY_ATTRS},
               "trials": {str(k): int(v) for k, v in df["budgetnet_state"].value_counts().items()},
               "n_trials": len(df), "best": None, "checkpoint": checkpoint, "checkpoint_note": checkpoint_note,
               "importances": importances(study), "guard": guard_overhead(study.get_trials(deepcopy=False), A.BUDGET_SECONDS.of(attrs))}
    summary["pick"] = pick_summary(A.PICK.of(attrs), A.RACE.of(attrs), A.TTA.of(attrs))  # how best.pt's config was picked
    check = A.FINAL_CHECK.of(attrs)
    if checkpoint is not None and check and check.get("checkpoint_sha256") == checkpoint.get("sha256"):
        checkpoint["final_check"] = check  # the search's check of these very bytes
    done = df[df["state"] == "COMPLETE"].dropna(subset=["val_acc"])
    if len(done):
        row = done.loc[done["val_acc"].idxmax()]
        trial = study.trials[int(row["number"])]
        config = A.CONFIG.of(trial)
        summary["best"] = {"trial": int(row["number"]), "val_acc": float(row["val_acc"]),
                           **{k: _number(row.get(k)) for k in ("family", "n_params", "flops", "latency_ms", "seconds",
                                                               "epochs")},
                           "params": trial.params, "config": json.loads(config) if config else None}
    return summary


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances (PED-ANOVA) over completed trials, largest first; {} while fewer than
    two trials have completed."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "few trials in a regime": true early in any search, and shown as is
        return optuna.importance.get_param_importances(study)
