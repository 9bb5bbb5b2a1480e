"""What a study found, after the fact: ``budgetnet report``.

It reads any budgetnet study (finished, running or resumed) and writes, into one folder:

- ``trials.csv``: ``study.trials_dataframe()`` (pandas), one row per trial, with budgetnet's own columns
  named plainly (``TRIAL_ATTRS``) and the sampled parameters as ``params_*``;
- ``summary.json``: budget used, trials by state, the best trial and config, the checkpoint and its test
  accuracy if ``budgetnet evaluate`` saved one for these exact bytes;
- one HTML file per plot (``PLOTS``), Optuna's own ``optuna.visualization`` figures where Optuna has the
  plot and small plotly figures of our own where it has not (accuracy against parameters and FLOPs with
  the Pareto front and the cap; best-so-far against wall-clock time with the phases; the state breakdown);
- ``index.html``: the summary, then every plot, in one page that needs no network. plotly.js is written
  once beside it (``plotly.min.js``), and every page loads it from there.

Every file is written atomically (temp + rename), so a report folder never holds half a file. The study
is only read: a storage that does not exist is refused, never created.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from budgetnet.checkpoint import CheckpointError, load_checkpoint
from budgetnet.config import ConfigError
from budgetnet.evaluate import evaluation_path
from budgetnet.files import write_atomic
from budgetnet.search.runner import REPORT_STEPS, check_journal, error_line, make_storage
from budgetnet.search.workers import lease_lapsed

# trials_dataframe() column -> the report's column. Trials written by another budgetnet version may lack
# some of them: a missing one is an empty column, never an error.
TRIAL_ATTRS = {
    "number": "number",
    "state": "state",  # Optuna's: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    "user_attrs_state": "budgetnet_state",  # complete, pruned, rejected, too slow, diverged, out of memory, ...
    "user_attrs_reason": "reason",
    "value": "val_acc",
    "user_attrs_family": "family",
    "user_attrs_n_params": "n_params",
    "user_attrs_flops": "flops",  # forward FLOPs per image
    "user_attrs_seconds": "seconds",  # training seconds of the trial's slice
    "user_attrs_images_per_s": "images_per_s",
    "user_attrs_epochs": "epochs",
    "datetime_start": "datetime_start",
    "datetime_complete": "datetime_complete",
}
DROPPED = ("user_attrs_config",)  # the whole config JSON: in summary.json for the best trial, too wide for a table
# The study's user attrs the summary shows (written by search/runner.py and search/clock.py); missing: None.
STUDY_ATTRS = ("dataset", "max_params", "budget_seconds", "seconds_used", "phase", "precision", "slice_seconds",
               "final_runs", "final_done", "final_failed", "probe_images_per_s", "time_feasible_flops", "best_artifact_id")
# budgetnet's state of a trial that has none recorded (still running, or from before the attr existed)
STATE_OF = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
            "WAITING": "waiting"}


class ReportError(ConfigError):
    """No such storage or study, or nowhere to write (a user mistake: one line, exit code 2)."""


def _local_path(url: str) -> Path | None:
    """The file behind a SQLite URL or a journal path; None for a server database."""
    if "://" not in url:
        return Path(url)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ReportError(f"malformed --storage {url!r}: expected sqlite:///FILE, postgresql://..., "
                            f"mysql://... or a journal file") from None
    if parsed.drivername.split("+")[0] == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ReportError(f"--storage {url!r} names no database file")
        return Path(parsed.database)
    return None


def _read_storage(url: str) -> tuple[optuna.storages.BaseStorage, list[str]]:
    """Storage ``url``, opened once, and the names of its studies. Raises ReportError (one line) for a
    storage file that does not exist, which is not created, or one Optuna cannot read."""
    path = _local_path(url)
    if path is not None and not path.is_file():
        raise ReportError(f"no study storage at {path} (--storage {url})")
    check_journal(url)
    try:
        storage = make_storage(url, create=False)
        return storage, [s.study_name for s in storage.get_all_studies()]
    except Exception as e:  # noqa: BLE001 - not a database optuna can read: say so in one line
        raise ReportError(f"cannot read --storage {url}: {error_line(e)}") from None


def study_names(url: str) -> list[str]:
    """The names of the studies in storage ``url`` (ReportError as ``_read_storage``)."""
    return _read_storage(url)[1]


def open_study(url: str, name: str | None = None) -> optuna.Study:
    """Load a study for reading. Without ``name``, the storage's only study. Raises ReportError (one
    line) for a storage file that does not exist, which is not created, or a study that is not in it."""
    storage, names = _read_storage(url)
    if not names:
        raise ReportError(f"--storage {url} holds no study")
    if name is None:
        if len(names) > 1:
            raise ReportError(f"--storage {url} holds {len(names)} studies ({', '.join(sorted(names))}); "
                              f"choose one with --study-name")
        name = names[0]
    elif name not in names:
        raise ReportError(f"no study named {name!r} in {url}; it holds: {', '.join(sorted(names))}")
    study = optuna.load_study(study_name=name, storage=storage)
    try:
        study.get_trials(deepcopy=False)  # a damaged file fails here, in one line, not halfway through a report
    except Exception as e:  # noqa: BLE001
        raise ReportError(f"cannot read the trials of study {name!r} in {url}: {error_line(e)}") from None
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
    for col in ("val_acc", "seconds", "images_per_s", "epochs"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    # Counts stay integers where a trial lacks them (a rejected one has no FLOPs).
    for col in ("number", "n_params", "flops"):
        df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
    df["state"] = df["state"].astype("string")
    df["budgetnet_state"] = df["budgetnet_state"].astype("string").fillna(df["state"].map(STATE_OF))
    # A RUNNING trial whose lease ran out, with no process alive here, is a killed search's (the next run of
    # the command fails it). Ray's trials hold no lease to judge them by.
    if "ray_experiment" not in study.user_attrs:
        now = time.time()
        lapsed = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                  if lease_lapsed(t, now) is not None]
        df.loc[df["number"].isin(lapsed) & (df["state"] == "RUNNING"), "budgetnet_state"] = "interrupted"
    steps = {t.number: max(t.intermediate_values) / REPORT_STEPS
             for t in study.get_trials(deepcopy=False) if t.intermediate_values}
    df.insert(df.columns.get_loc("val_acc") + 1, "progress", df["number"].map(steps).astype("Float64"))
    duration = (df["datetime_complete"] - df["datetime_start"]).dt.total_seconds()
    df.insert(df.columns.get_loc("datetime_complete") + 1, "duration_s", duration)
    complete = df["state"] == "COMPLETE"
    for key in ("n_params", "flops"):
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
            "evaluation": None, "written": written}
    saved = evaluation_path(path)
    if saved.is_file():
        try:
            ev = json.loads(saved.read_text())
        except (OSError, ValueError):
            return info
        if ev.get("checkpoint_sha256") == ckpt["sha256"]:  # the bytes read above; else another model's
            info.update(test_top1=ev.get("top1"), test_top5=ev.get("top5"), evaluation=str(saved),
                        evaluated_precision=ev.get("precision"), evaluated_device=ev.get("device"))
    return info


def study_summary(study: optuna.Study, df: pd.DataFrame, checkpoint: dict | None,
                  checkpoint_note: str | None = None) -> dict:
    """The page's summary block as a dict (also ``summary.json`` and ``--json``). ``checkpoint`` is
    ``checkpoint_info``'s; ``checkpoint_note`` says why there is none."""
    attrs = study.user_attrs
    summary = {"study": study.study_name, **{k: attrs.get(k) for k in STUDY_ATTRS},
               "trials": {str(k): int(v) for k, v in df["budgetnet_state"].value_counts().items()},
               "n_trials": len(df), "best": None, "checkpoint": checkpoint, "checkpoint_note": checkpoint_note,
               "importances": importances(study)}
    done = df[df["state"] == "COMPLETE"].dropna(subset=["val_acc"])
    if len(done):
        row = done.loc[done["val_acc"].idxmax()]
        trial = study.trials[int(row["number"])]
        config = trial.user_attrs.get("config")
        summary["best"] = {"trial": int(row["number"]), "val_acc": float(row["val_acc"]),
                           **{k: _number(row.get(k)) for k in ("family", "n_params", "flops", "seconds", "epochs")},
                           "params": trial.params, "config": json.loads(config) if config else None}
    return summary


# -- plots ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plot:
    name: str  # file stem
    title: str
    caption: str
    build: Callable  # (study, frame, summary) -> plotly Figure


def _empty(why: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=why, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font={"size": 14})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _accuracy_vs(cost: str, label: str, cap_attr: str, cap_label: str):
    def build(study, df: pd.DataFrame, summary: dict):
        import plotly.graph_objects as go

        done = df[(df["state"] == "COMPLETE")].dropna(subset=[cost, "val_acc"])
        if done.empty:
            return _empty("no completed trial yet")
        fig = go.Figure()
        hover = "trial %{customdata[0]} (%{customdata[1]})<br>" + label + " %{x:,.0f}<br>val acc %{y:.4f}<extra></extra>"
        for family, part in done.groupby(done["family"].fillna("?").astype(str)):
            fig.add_scatter(x=part[cost], y=part["val_acc"], mode="markers", name=family, opacity=0.7,
                            customdata=part[["number", "family"]].astype(str).to_numpy(), hovertemplate=hover)
        front = done[done[f"pareto_{cost}"]].sort_values(cost)
        fig.add_scatter(x=front[cost], y=front["val_acc"], mode="lines+markers", name="Pareto front",
                        line={"shape": "hv", "color": "black"}, marker={"symbol": "diamond-open", "size": 11},
                        hoverinfo="skip")
        cap = summary.get(cap_attr)
        if cap:  # the cap on this axis, where the study recorded one
            fig.add_vline(x=cap, line_dash="dash", line_color="red",
                          annotation_text=f"{cap_label} {cap:,.0f}", annotation_position="top left")
        fig.update_layout(xaxis_title=label, yaxis_title="validation accuracy", legend_title="family")
        return fig

    return build


def _learning_curves(study, df: pd.DataFrame, summary: dict):
    fig = optuna.visualization.plot_intermediate_values(study)
    if not fig.data:
        return _empty("no trial has reported yet")
    state = dict(zip(df["number"].astype(int), df["budgetnet_state"]))
    for trace in fig.data:  # Optuna names each trace "Trial<number>"
        digits = (trace.name or "").removeprefix("Trial")
        if not digits.isdigit():
            continue
        number = int(digits)
        faded = state.get(number) != "complete"
        trace.update(opacity=0.25 if faded else 1.0, name=f"trial {number} ({state.get(number)})",
                     line={"dash": "dot" if faded else "solid"})
    fig.update_layout(title=None, xaxis_title="progress (% of the trial's time slice)",
                      yaxis_title="validation accuracy")
    return fig


def _best_so_far(study, df: pd.DataFrame, summary: dict):
    import plotly.graph_objects as go

    timed = df.dropna(subset=["datetime_start"])
    if timed.empty:
        return _empty("no trial has started yet")
    t0 = timed["datetime_start"].min()
    done = df[df["state"] == "COMPLETE"].dropna(subset=["val_acc", "datetime_complete"])
    done = done.sort_values("datetime_complete")
    minutes = (done["datetime_complete"] - t0).dt.total_seconds() / 60
    fig = go.Figure()
    fig.add_scatter(x=minutes, y=done["val_acc"], mode="markers", name="completed trial", opacity=0.5,
                    customdata=done["number"], hovertemplate="trial %{customdata}: %{y:.4f}<extra></extra>")
    fig.add_scatter(x=minutes, y=done["val_acc"].cummax(), mode="lines", name="best so far",
                    line={"shape": "hv", "width": 3})
    search_end = (timed["datetime_complete"].max() if timed["datetime_complete"].notna().any() else t0)
    search_end_min = (search_end - t0).total_seconds() / 60
    fig.add_vrect(x0=0, x1=search_end_min, fillcolor="royalblue", opacity=0.08, line_width=0,
                  annotation_text="search", annotation_position="top left")
    ckpt = summary.get("checkpoint") or {}
    if ckpt.get("phase") == "final":  # the final training ran from the last trial's end to the checkpoint
        written_min = (pd.Timestamp(ckpt["written"]) - t0).total_seconds() / 60
        fig.add_vrect(x0=search_end_min, x1=written_min, fillcolor="seagreen", opacity=0.12, line_width=0,
                      annotation_text="final training", annotation_position="top left")
        if ckpt.get("test_top1") is not None:
            fig.add_scatter(x=[written_min], y=[ckpt["test_top1"]], mode="markers", name="final model, test acc",
                            marker={"symbol": "star", "size": 16, "color": "seagreen"})
    fig.update_layout(xaxis_title="wall-clock minutes since the first trial started", yaxis_title="accuracy")
    return fig


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances (PED-ANOVA) over completed trials, largest first; {} while fewer than
    two trials have completed."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "few trials in a regime": true early in any search, and shown as is
        return optuna.importance.get_param_importances(study)


def _optuna_plot(fn, needs: int, top: int | None = None):
    """An ``optuna.visualization`` figure once ``needs`` trials have completed. ``top``: only the most
    important parameters, so that a conditional space of twenty-odd parameters stays readable."""
    def build(study, df: pd.DataFrame, summary: dict):
        if (df["state"] == "COMPLETE").sum() < needs:
            return _empty(f"needs at least {needs} completed trial{'s' if needs > 1 else ''}")
        kw = {"params": list(summary["importances"])[:top]} if top and summary.get("importances") else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig = fn(study, **kw)
        return fig.update_layout(title=None, width=None)  # width: plot_slice fixes one; the page sizes it

    return build


def _states(study, df: pd.DataFrame, summary: dict):
    import plotly.express as px

    if df.empty:
        return _empty("no trials")
    counts = df.groupby(["budgetnet_state", "state"]).size().reset_index(name="trials")
    fig = px.bar(counts, x="budgetnet_state", y="trials", color="state", text="trials",
                 category_orders={"budgetnet_state": df["budgetnet_state"].value_counts().index.tolist()})
    return fig.update_layout(xaxis_title="budgetnet state", yaxis_title="trials", legend_title="Optuna state")


def _timeline(study, df: pd.DataFrame, summary: dict):
    if df.empty:
        return _empty("no trials")
    return optuna.visualization.plot_timeline(study).update_layout(title=None)


PLOTS = (
    Plot("accuracy_vs_params", "Validation accuracy against parameters",
         "Completed trials by family; the Pareto front (no trial with fewer parameters is more accurate) and "
         "the parameter cap (dashed red).", _accuracy_vs("n_params", "parameters", "max_params", "cap")),
    Plot("accuracy_vs_flops", "Validation accuracy against FLOPs",
         "Forward FLOPs per image; the dashed red line is the time-feasible FLOP limit the speed probe set, "
         "where the study recorded one.",
         _accuracy_vs("flops", "FLOPs per image", "time_feasible_flops", "time-feasible limit")),
    Plot("learning_curves", "Learning curves",
         "Validation accuracy at each report, on the shared axis the median pruner compares; trials that did "
         "not complete are faded and dotted.", _learning_curves),
    Plot("best_so_far", "Best so far against wall-clock time",
         "Each completed trial's accuracy at the time it ended, the best so far, and the search and final "
         "phases.", _best_so_far),
    Plot("states", "Trials by state", "budgetnet's state of each trial, coloured by Optuna's state.", _states),
    Plot("param_importances", "Parameter importances", "Optuna's PED-ANOVA importances over completed trials.",
         _optuna_plot(optuna.visualization.plot_param_importances, 2)),
    Plot("parallel_coordinate", "Parallel coordinates", "The six most important sampled parameters of the "
         "completed trials, coloured by validation accuracy.",
         _optuna_plot(optuna.visualization.plot_parallel_coordinate, 1, top=6)),
    Plot("slice", "Slices", "Validation accuracy against each of the four most important sampled parameters.",
         _optuna_plot(optuna.visualization.plot_slice, 1, top=4)),
    Plot("timeline", "Timeline", "When each trial ran, and how it ended (Optuna's states).", _timeline),
)


# -- the page ---------------------------------------------------------------------------------------------

PLOTLY_JS = "plotly.min.js"  # written once beside the pages; no page loads anything from the network
_STYLE = """body{font-family:system-ui,sans-serif;margin:1em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin:.4em 0}h3{font-size:1em;margin:.8em 0 .3em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.15em .5em;text-align:left}
th{background:#f3f3f3;font-weight:600}pre{background:#f7f7f7;padding:.5em;overflow-x:auto;font-size:.8em}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:1em}
.plots{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:.5em 1.5em}\n@media (max-width:1000px){.plots{grid-template-columns:minmax(0,1fr)}}
.plot{border-top:1px solid #ddd;min-width:0}.wide{grid-column:1/-1}.caption{color:#555;margin:.2em 0;font-size:.9em}
.bar{display:inline-block;width:120px;height:10px;background:#eee;vertical-align:middle}
.bar span{display:block;height:100%;background:#4a7bd0}"""


def _fmt(x, spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f'<script src="{PLOTLY_JS}"></script>\n<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n')


def _table(rows) -> str:
    return "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _summary_html(s: dict, df: pd.DataFrame) -> str:
    """The summary cards: the study and its budget, trials by state, the best trial, the model file."""
    esc = html.escape
    used, total = s.get("seconds_used"), s.get("budget_seconds")
    share = min(max(used / total, 0.0), 1.0) if used is not None and total else 0.0
    study = _table([("dataset", esc(str(s.get("dataset") or "-"))), ("parameter cap", _fmt(s.get("max_params"))),
                    ("budget used", f'<span class="bar"><span style="width:{share:.1%}"></span></span> '
                                    f'{_fmt(used, ",.0f", " s")} of {_fmt(total, ",.0f", " s")}'),
                    ("phase", esc(str(s.get("phase") or "-"))), ("precision", esc(str(s.get("precision") or "-"))),
                    ("trial slice", _fmt(s.get("slice_seconds"), ",.1f", " s")), ("trials", str(s["n_trials"]))])
    states = df.groupby("budgetnet_state").size().sort_values(ascending=False).rename("trials").to_frame()
    cards = [f"<div><h3>Study</h3>{study}</div>",
             "<div><h3>Trials by state</h3>" + states.to_html(border=0, index_names=False) + "</div>"]
    best = s.get("best")
    if best:
        config = (f"<details><summary>config</summary><pre>{esc(json.dumps(best['config'], indent=2))}</pre>"
                  f"</details>" if best.get("config") else "")
        cards.append(f"<div><h3>Best trial: {best['trial']}</h3>" + _table([
            ("validation accuracy", f"{best['val_acc']:.4f}"), ("family", esc(str(best.get("family")))),
            ("parameters", _fmt(best.get("n_params"))), ("FLOPs per image", _fmt(best.get("flops"))),
            ("epochs in its slice", _fmt(best.get("epochs"), ",.2f"))]) + config + "</div>")
    else:
        cards.append("<div><h3>Best trial</h3><p>No trial has completed yet.</p></div>")
    ck = s.get("checkpoint")
    if ck:
        top5 = f", {ck['test_top5']:.2%} top-5" if ck.get("test_top5") is not None else ""
        test = (f"<b>{ck['test_top1']:.2%}</b> top-1{top5} (in "
                f"{esc(str(ck.get('evaluated_precision')))}, <code>{esc(ck['evaluation'])}</code>)"
                if ck.get("test_top1") is not None else
                f"not evaluated yet: <code>budgetnet evaluate {esc(ck['path'])}</code>")
        cards.append("<div><h3>Model</h3>" + _table([
            ("file", f"<code>{esc(ck['path'])}</code>"),
            ("from", f"{esc(str(ck.get('phase')))} phase, trial {ck.get('trial')}"),
            ("parameters", _fmt(ck.get("n_params"))), ("test accuracy", test)]) + "</div>")
    elif s.get("checkpoint_note"):
        cards.append(f"<div><h3>Model</h3><p>{esc(s['checkpoint_note'])}</p></div>")
    return '<div class="cards">' + "\n".join(cards) + "</div>"


@contextlib.contextmanager
def _optuna_quiet():
    """Optuna's plots log "[W ...] Study instance does not contain trials" and the like on stderr for a
    young study; its page shows that plainly, and one line on stderr is kept for the user's mistakes."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def write_report(study: optuna.Study, df: pd.DataFrame, summary: dict, out: str | Path) -> dict:
    """Write the report folder (see the module docstring) of ``trials_frame`` and ``study_summary``;
    return the summary with ``files`` added."""
    import plotly.offline

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; give a folder for the report")
    files = {"csv": out / "trials.csv", "summary": out / "summary.json", "index": out / "index.html"}
    # Rewritten every time: the figures must meet the plotly.js of the plotly that drew them.
    write_atomic(out / PLOTLY_JS, lambda f: f.write(plotly.offline.get_plotlyjs().encode()))
    write_atomic(files["csv"], lambda f: df.to_csv(f, index=False))
    sections = []
    for plot in PLOTS:
        with _optuna_quiet():
            built = plot.build(study, df, summary)
        fig = built.update_layout(template="plotly_white", height=420, margin={"l": 60, "r": 20, "t": 30, "b": 50})
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{plot.name}",
                          config={"responsive": True, "displaylogo": False})
        caption = f'<p class="caption">{html.escape(plot.caption)}</p>'
        path = files[plot.name] = out / f"{plot.name}.html"
        write_atomic(path, lambda f, d=div, c=caption, p=plot: f.write(
            _page(f"{p.title}: {study.study_name}", f"<h2>{html.escape(p.title)}</h2>{c}{d}").encode()))
        wide = " wide" if plot is PLOTS[-1] and len(PLOTS) % 2 else ""  # an odd last plot takes the whole row
        sections.append(f'<section class="plot{wide}"><h2><a href="{path.name}">{html.escape(plot.title)}</a></h2>'
                        f"{caption}{div}</section>")
    summary["files"] = {k: str(v) for k, v in files.items()}
    body = (f"<h1>budgetnet report: {html.escape(study.study_name)}</h1>\n"
            f'<p class="caption">Written {datetime.now():%Y-%m-%d %H:%M}. Every trial: '
            f'<a href="trials.csv">trials.csv</a>; this summary: <a href="summary.json">summary.json</a>.</p>\n'
            + _summary_html(summary, df) + '\n<div class="plots">\n' + "\n".join(sections) + "\n</div>")
    write_atomic(files["summary"], lambda f: f.write(json.dumps(summary, indent=2, default=str).encode()))
    write_atomic(files["index"], lambda f: f.write(_page(f"budgetnet report: {study.study_name}", body).encode()))
    return summary
