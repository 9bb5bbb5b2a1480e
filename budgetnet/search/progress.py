"""Live progress of a search: one line per trial, a budget bar, a final summary. Plain, quiet or JSON."""

from __future__ import annotations

import json
import sys
from typing import TextIO


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}{unit}"
    return f"{x:.0f}{unit}"


def _duration(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def budget_bar(used: float, total: float, width: int = 24) -> str:
    frac = min(max(used / total, 0.0), 1.0) if total > 0 else 1.0
    filled = round(frac * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {_duration(used)} used, {_duration(total - used)} left"


def _pruned_by(trials: dict) -> str:
    """The closing line's " (2 too slow, 1 diverged)", when pruned trials ended for more than the pruner's
    reasons; empty otherwise."""
    by = trials.get("pruned_by") or {}
    if set(by) <= {"pruned"}:
        return ""
    return " (" + ", ".join(f"{n} {state}" for state, n in by.items()) + ")"


class Reporter:
    """Writes search events. ``mode`` is "text" (default), "quiet" (summary only) or "json" (JSON lines).
    Warnings go to ``err`` (standard error) in text and quiet modes, so that --quiet and a redirected
    standard output keep them, and are message events with ``"level": "warning"`` in JSON."""

    def __init__(self, mode: str = "text", stream: TextIO | None = None, err: TextIO | None = None):
        self.mode = mode
        self.stream = stream or sys.stdout
        self.err = err or sys.stderr

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.mode == "text":
            self._write(text)
        elif self.mode == "json":
            self._write(json.dumps({"event": "message", "text": text}))

    def warning(self, text: str) -> None:
        """Something the user must see whatever the mode: a search that learned nothing, a lost artifact."""
        text = text if text.startswith("warning: ") else f"warning: {text}"
        if self.mode == "json":
            self._write(json.dumps({"event": "message", "level": "warning", "text": text}))
        else:
            self.err.write(text + "\n")
            self.err.flush()

    def trial(self, row: dict, used: float, total: float) -> None:
        """``row``: number, family, n_params, flops, latency_ms (measured by the guard, or None), progress,
        val_acc, state, reason, seconds."""
        if self.mode == "json":
            self._write(json.dumps({"event": "trial", **row, "budget_used_s": round(used, 1),
                                    "budget_total_s": round(total, 1)}))
            return
        if self.mode != "text":
            return
        acc = f"{row['val_acc']:.4f}" if row.get("val_acc") is not None else "  -   "
        prog = f"{row['progress']:>4.0%}" if row.get("progress") is not None else "  - "
        state = row.get("state", "failed") + (f" ({row['reason']})" if row.get("reason") and row.get("state") != "complete" else "")
        who = f" [worker {row['worker']}]" if "worker" in row else ""
        latency = f" {row['latency_ms']:7.3f} ms" if row.get("latency_ms") is not None else ""  # under a latency cap
        self._write(f"trial {row['number']:>4}{who}  {row.get('family') or '-':<9} {_si(row.get('n_params')):>7} params "
                    f"{_si(row.get('flops'), 'FLOPs'):>11}{latency}  {prog}  val {acc}  {row.get('seconds', 0):6.1f}s  "
                    f"{state}")
        self._write(f"  budget {budget_bar(used, total)}")

    def joined(self, summary: dict, line: str) -> None:
        """A joining command's close: what it added to the study, and where its leader writes best.pt."""
        if self.mode == "json":
            self._write(json.dumps({"event": "joined", **summary, "text": line}))
        else:
            self._write(line)

    def summary(self, summary: dict) -> None:
        if self.mode == "json":
            self._write(json.dumps({"event": "summary", **summary}))
            return
        lines = [
            "",
            f"search finished: {summary['trials']['complete']} complete, {summary['trials']['pruned']} pruned"
            f"{_pruned_by(summary['trials'])}, "
            f"{summary['trials']['rejected']} rejected, {summary['trials']['failed']} failed "
            f"in {_duration(summary['seconds_used'])} of {_duration(summary['budget_seconds'])}",
        ]
        if summary.get("best_trial") is not None:
            lines.append(f"best trial {summary['best_trial']}: {summary['family']}, "
                         f"{summary['n_params']:,} params, val acc {summary['best_val_acc']:.4f}")
            if summary.get("pick") and summary["pick"].get("line"):
                lines.append(summary["pick"]["line"])
            lines.append(f"config: {json.dumps(summary['config'])}")
        if summary.get("checkpoint"):
            lines.append(f"best model: {summary['checkpoint']}  ({summary['checkpoint_phase']})")
            check = summary.get("final_check")
            if check:  # the model checked against every cap, its latency measured as the guard measures
                threads = check["latency_threads"]
                lines.append(f"  {check['n_params']:,} params, {check['macs']:,} MACs, {check['latency_ms']:.3f} ms at "
                             f"batch 1 on {check['latency_device']} ({threads} thread{'s' * (threads != 1)})"
                             + (f"; over its cap: {', '.join(check['over'])}" if check["over"] else
                                ", within every cap"))
            lines.append(f"evaluate:   budgetnet evaluate {summary['checkpoint']}")
        guard = summary.get("guard") or {}
        if guard.get("trials_latency_measured"):
            lines.append(f"latency guard: {guard['trials_latency_measured']} trials measured, the guard took "
                         f"{guard['seconds']:.1f} s ({guard['share_of_budget']:.1%} of the budget)")
        lines.append(f"dashboard:  {summary['dashboard_command']}")
        for line in lines:
            self._write(line)
