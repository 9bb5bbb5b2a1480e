"""``budgetnet report``'s pages: one HTML file per plot, ``index.html``, ``trials.csv``, ``summary.json``.

Optuna's own figures where it has the plot, small plotly figures of ours where it has not. plotly.js is
written once beside the pages, which need no network; every file is written atomically.
"""

from __future__ import annotations

import contextlib
import html
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
import pandas as pd

from budgetnet.files import write_atomic
from budgetnet.report.study import ReportError
from budgetnet.search import attrs as A


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


def _accuracy_vs(cost: str, label: str, caps, fmt: str = ",.0f", empty: str = "no completed trial yet"):
    """Validation accuracy against ``cost``, the Pareto front, and each of ``caps`` the study recorded:
    (study attr, label, scale onto this axis) drawn as a dashed line; the label formats ``cap`` (as recorded)
    and ``x`` (on this axis)."""
    def build(study, df: pd.DataFrame, summary: dict):
        import plotly.graph_objects as go

        done = df[(df["state"] == "COMPLETE")].dropna(subset=[cost, "val_acc"])
        if done.empty:
            return _empty(empty if (df["state"] == "COMPLETE").any() else "no completed trial yet")
        fig = go.Figure()
        hover = ("trial %{customdata[0]} (%{customdata[1]})<br>" + label + " %{x:" + fmt + "}<br>"
                 "val acc %{y:.4f}<extra></extra>")
        for family, part in done.groupby(done["family"].fillna("?").astype(str)):
            fig.add_scatter(x=part[cost], y=part["val_acc"], mode="markers", name=family, opacity=0.7,
                            customdata=part[["number", "family"]].astype(str).to_numpy(), hovertemplate=hover)
        front = done[done[f"pareto_{cost}"]].sort_values(cost)
        fig.add_scatter(x=front[cost], y=front["val_acc"], mode="lines+markers", name="Pareto front",
                        line={"shape": "hv", "color": "black"}, marker={"symbol": "diamond-open", "size": 11},
                        hoverinfo="skip")
        for (attr, cap_label, scale), colour in zip(caps, ("red", "darkorange")):
            cap = summary.get(attr)
            if cap:  # the cap on this axis, where the study recorded one
                fig.add_vline(x=cap * scale, line_dash="dash", line_color=colour,
                              annotation_text=cap_label.format(cap=cap, x=cap * scale), annotation_position="top left")
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
        faded = state.get(number) != A.State.COMPLETE
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
         "the parameter cap (dashed red).", _accuracy_vs("n_params", "parameters", [(A.MAX_PARAMS, "cap {x:,.0f}", 1)])),
    Plot("accuracy_vs_flops", "Validation accuracy against FLOPs",
         "Forward FLOPs per image (2 per multiply-accumulate); dashed, where the study recorded them: the "
         "--max-flops cap (red; it counts MACs, drawn here as FLOPs) and the time-feasible limit the speed "
         "probe set (orange).",
         _accuracy_vs("flops", "FLOPs per image", [(A.MAX_FLOPS, "--max-flops {cap:,.0f} MACs = {x:,.0f} FLOPs", 2),
                                                   (A.TIME_FEASIBLE_FLOPS, "time-feasible limit {x:,.0f}", 1)])),
    Plot("accuracy_vs_latency", "Validation accuracy against measured latency",
         "Batch-1 latency each trial's guard measured (fp32, on the study's latency device and threads; "
         "only under --max-latency-ms), and the latency cap (dashed red).",
         _accuracy_vs("latency_ms", "latency at batch 1 (ms)", [(A.MAX_LATENCY_MS, "cap {x:g} ms", 1)], fmt=",.3f",
                      empty="no trial's latency was measured: a search with --max-latency-ms measures each")),
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
    caps = [("parameter cap", _fmt(s.get("max_params")))]
    if s.get("max_flops"):
        caps.append(("MAC cap (--max-flops)", _fmt(s["max_flops"], ",.0f", " MACs")))
    if s.get("max_latency_ms"):
        caps.append(("latency cap", f"{s['max_latency_ms']:g} ms at batch 1 on {esc(str(s.get('latency_device')))}, "
                                    f"{s.get('latency_threads')} thread(s)"))
    guard = s.get("guard") or {}
    if guard.get("trials_latency_measured"):
        caps.append(("guard overhead", f"{guard['seconds']:,.1f} s ({guard['share_of_budget']:.1%} of the budget), "
                                       f"{guard['trials_latency_measured']} latencies measured"))
    study = _table([("dataset", esc(str(s.get("dataset") or "-"))), *caps,
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
            ("latency (guard)", _fmt(best.get("latency_ms"), ",.3f", " ms")),
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
            *([("picked", esc(s["pick"]["line"]))] if (s.get("pick") or {}).get("line") else []),
            *([("start", esc(ck["fine_tuned"]))] if ck.get("fine_tuned") else []),
            ("parameters", _fmt(ck.get("n_params"))), ("test accuracy", test), *_latency_rows(ck)]) + "</div>")
    elif s.get("checkpoint_note"):
        cards.append(f"<div><h3>Model</h3><p>{esc(s['checkpoint_note'])}</p></div>")
    return '<div class="cards">' + "\n".join(cards) + "</div>"


def _latency_rows(ck: dict) -> list[tuple[str, str]]:
    """The model card's latency: the search's check of these bytes against every cap, and what
    ``budgetnet evaluate`` measured, each with where and how."""
    rows = []
    check = ck.get("final_check")
    if check:
        over = ", ".join(check["over"])
        rows.append(("checked against the caps", f"{check['macs']:,} MACs, {check['latency_ms']:.3f} ms at batch 1 on "
                     f"{html.escape(check['latency_device'])} ({check['latency_threads']} thread(s)): "
                     + (f"<b>over {html.escape(over)}</b>" if over else "within every cap")))
    dep = ck.get("deployment_latency")
    if dep:
        rows.append(("latency (evaluate)", f"{dep['latency_ms']:.3f} ms at batch 1 on {html.escape(dep['device'])} "
                     f"({dep['threads']} thread(s), fp32)"))
    return rows


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
