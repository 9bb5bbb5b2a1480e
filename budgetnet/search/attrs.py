"""Every attribute budgetnet stores in a study or a trial, and the one vocabulary of trial states.

An ``Attr`` is its stored key (a ``str``, byte-identical to what studies hold) with its type and meaning;
read it with ``ATTR.of(study_or_trial)``, write it with ``ATTR.set(study_or_trial, value)``. This module
imports neither torch nor optuna: the command line's help reads the budget rules without loading either.
"""

from __future__ import annotations

from typing import Any


class Attr(str):
    """One stored attribute: the key itself, with its ``type`` and ``doc``."""

    type: type
    doc: str

    def __new__(cls, key: str, type_: type, doc: str) -> Attr:
        attr = super().__new__(cls, key)
        attr.type, attr.doc = type_, doc
        return attr

    def of(self, holder, default: Any = None) -> Any:
        """Its value in ``holder`` (a study, a trial, or a dict of user attrs); ``default`` when unset."""
        attrs = holder if isinstance(holder, dict) else holder.user_attrs
        return attrs.get(str(self), default)

    def set(self, holder, value: Any) -> None:
        holder.set_user_attr(str(self), value)

    def set_in(self, storage, trial_id: int, value: Any) -> None:
        """Write it through a storage (a trial this process does not hold as a ``Trial``)."""
        storage.set_trial_user_attr(trial_id, str(self), value)


class SystemAttr(str):
    """A trial's system attribute (leases): the key, prefixed ``budgetnet:``, with its meaning."""

    doc: str

    def __new__(cls, key: str, doc: str) -> SystemAttr:
        attr = super().__new__(cls, key)
        attr.doc = doc
        return attr

    def of(self, trial, default: Any = None) -> Any:
        return trial.system_attrs.get(str(self), default)

    def set_in(self, storage, trial_id: int, value: Any) -> None:
        storage.set_trial_system_attr(trial_id, str(self), value)


# -- the study -------------------------------------------------------------------------------------------
DATASET = Attr("dataset", str, "the dataset searched; a resume must name the same")
MAX_PARAMS = Attr("max_params", float, "the parameter cap; a resume must give the same")
MAX_FLOPS = Attr("max_flops", float, "--max-flops: the cap on multiply-accumulates per image (None: none); "
                 "a resume must give the same")
MAX_LATENCY_MS = Attr("max_latency_ms", float, "--max-latency-ms: the batch-1 latency cap (None: none); a resume "
                      "must give the same")
LATENCY_DEVICE = Attr("latency_device", str, "where latency is measured (--latency-device)")
LATENCY_THREADS = Attr("latency_threads", int, "the CPU threads latency is measured with (--latency-threads)")
FINAL_CHECK = Attr("final_check", dict, "the model at --out checked against every cap: its numbers, its "
                   "measured latency, the checkpoint's SHA-256")
IMAGE_SIZE = Attr("image_size", int, "a folder dataset's image side (None: its default)")
BUDGET_SECONDS = Attr("budget_seconds", float, "the whole command's wall-clock budget")
SECONDS_USED = Attr("seconds_used", float, "budget seconds spent so far, saved as the command runs")
PHASE = Attr("phase", str, "search or final: where a resume goes on")
PRECISION = Attr("precision", str, "the precision trials train in, decided once")
SLICE_SECONDS = Attr("slice_seconds", float, "one trial's time slice, fixed per study")
PROBE_IMAGES_PER_S = Attr("probe_images_per_s", float, "the speed probe's rate (0: none)")
TIME_FEASIBLE_FLOPS = Attr("time_feasible_flops", float, "the FLOP cap trials are sampled under (0: none)")
SEARCH_ENDED = Attr("search_ended", float, "budget seconds at which a stagnant search ended")
FINAL_RUNS = Attr("final_runs", int, "final runs started (more than one: resumed)")
FINAL_RETRIES = Attr("final_retries", int, "final runs repeated at a lower lr after a divergence")
FINAL_DONE = Attr("final_done", bool, "the final model is written")
FINAL_FAILED = Attr("final_failed", str, "why the final model failed its check")
FINAL_SKIPPED = Attr("final_skipped", str, "why the final phase did not run")
FINAL_COMPILE = Attr("final_compile", dict, "how the final run used torch.compile")
BEST_ARTIFACT_ID = Attr("best_artifact_id", str, "the final model's Optuna artifact")
TEACHER = Attr("teacher", str, "what --teacher auto decided, in a line")
TEACHER_CHECKPOINT = Attr("teacher_checkpoint", str, "the trained teacher a resumed final phase reuses")
SESSION = Attr("session", str, "the id of the command that owns the study now")
SESSION_STARTED_AT = Attr("session_started_at", float, "wall time at which the session had used ...")
SESSION_USED_BEFORE = Attr("session_used_before", float, "... this many budget seconds")
WORKERS = Attr("workers", int, "worker processes of the session")
READY = Attr("ready", str, "the session whose probe is done: its workers may start")
SESSION_LEASE = Attr("session_lease_until", float, "wall time (epoch seconds) the session's lease runs to: its "
                     "leader renews it while the command runs; a later command joins a live session")
SESSION_PID = Attr("session_pid", int, "the leader's process ...")
SESSION_HOST = Attr("session_host", str, "... and its machine")
SESSION_OUT = Attr("session_out", str, "where the leader writes best.pt (an absolute path on its machine)")
SESSION_BACKEND = Attr("session_backend", str, "the session's backend: commands join an optuna one only")
PLAN = Attr("plan", dict, "the session's budget cut (budget_seconds, final_fraction, final_auto): joiners take it")
MACHINE = Attr("machine", str, "the machine that measured the precision and the probe: a resume there reuses "
               "them, a resume elsewhere measures again")
ARTIFACT_DIR = Attr("artifact_dir", str, "the leader's artifact folder (absolute): joiners that reach it store "
                    "their models there")
RAY_EXPERIMENT = Attr("ray_experiment", str, "the Ray Tune experiment's folder (a Ray study)")
RAY_SCHEDULER = Attr("ray_scheduler", str, "the scheduler the Ray experiment was created with")
PICK = Attr("pick", dict, "how the final phase's config was picked: --pick, the trial, by what (observed, "
            "estimate, race), the ranking's leaders and the finalists")
RACE = Attr("race", dict, "the final race: its finalists, each leg's seconds and validation accuracy, the winner; "
            "state racing until it is decided (a resumed final phase does not race again)")
TTA = Attr("tta", dict, "the final model's test-time augmentation: --tta, what it deploys (none, flip) and why, "
           "from the picked trial's flip score")
INIT = Attr("init", str, "search --init: the checkpoint the search fine-tunes (its path)")
INIT_SHA256 = Attr("init_sha256", str, "... and the SHA-256 of its bytes; a resume must give the same")

# The study attrs ``budgetnet report`` shows, in its order.
REPORTED_STUDY_ATTRS = (DATASET, INIT, MAX_PARAMS, MAX_FLOPS, MAX_LATENCY_MS, LATENCY_DEVICE, LATENCY_THREADS,
                        BUDGET_SECONDS, SECONDS_USED, PHASE, PRECISION, SLICE_SECONDS,
                        FINAL_RUNS, FINAL_DONE, FINAL_FAILED, PROBE_IMAGES_PER_S, TIME_FEASIBLE_FLOPS,
                        BEST_ARTIFACT_ID, FINAL_CHECK)

# -- a trial ---------------------------------------------------------------------------------------------
STATE = Attr("state", str, "budgetnet's state of the trial (``State``)")
REASON = Attr("reason", str, "why a trial did not complete, in a line")
FAMILY = Attr("family", str, "the model family")
CONFIG = Attr("config", str, "the whole RunConfig, as JSON")
N_PARAMS = Attr("n_params", int, "parameters of the model")
FLOPS = Attr("flops", int, "forward FLOPs per image (2 per multiply-accumulate)")
LATENCY_MS = Attr("latency_ms", float, "batch-1 latency measured by the guard (ms; only under --max-latency-ms)")
GUARD_SECONDS = Attr("guard_seconds", float, "the guard's wall time: counts, and the latency build and forwards")
SECONDS = Attr("seconds", float, "training seconds of the trial's slice")
IMAGES_PER_S = Attr("images_per_s", float, "the trial's training rate")
EPOCHS = Attr("epochs", float, "epochs the trial trained")
STEPS = Attr("steps", int, "optimizer steps the trial took")
CURVE = Attr("curve", list, "the trial's validation curve: [epoch, val_acc, images scored] at each mark")
ESTIMATE = Attr("estimate", dict, "the trial's validation accuracy estimated at the epochs the final phase can "
                "give it (search/pick.py), with the fit behind it; the observed value stays the trial's value")
FLIP = Attr("flip", dict, "the trial's model scored as a flip average on the whole validation split (--tta "
            "auto, flip-trained configs): its accuracy, and the images it fixed and broke against one view")
SPEED_RECHECK = Attr("speed_recheck", dict, "a too-slow verdict re-checked over a later window: the rate at the "
                     "verdict and over the window (img/s); the trial went on if the window's covered its slice")
WORKER = Attr("worker", int, "the worker process that ran it")
JOINED = Attr("joined", str, "the joining command (host:pid) that ran it; unset: the leader's command")
MODEL_ARTIFACT = Attr("model_artifact", dict, "the trial's model as an Optuna artifact, kept when it beat the "
                      "study's best: its id, folder and machine")
RAY_TRIAL = Attr("ray_trial", str, "Tune's trial id (never set for a rejected config)")
RAY_NODE = Attr("ray_node", str, "the Ray node that ran it")

LEASE_KEY = SystemAttr("budgetnet:lease_until", "wall time (epoch seconds) the trial's lease runs to")
PID_KEY = SystemAttr("budgetnet:pid", "the process that runs the trial ...")
HOST_KEY = SystemAttr("budgetnet:host", "... and the machine it runs on")


class State:
    """budgetnet's trial states, as stored in ``STATE`` (Optuna's three say too little; the mapping to
    them is ``record.optuna_state``)."""

    COMPLETE = "complete"
    REJECTED = "rejected"  # over a cap (parameters, MACs, latency): never trained
    STOPPED = "stopped"  # no slice left, Ctrl-C, the deadline
    PRUNED = "pruned"  # below the median, or Ray's scheduler
    TOO_SLOW = "too slow"
    DIVERGED = "diverged"
    OUT_OF_MEMORY = "out of memory"
    FAILED = "failed"  # a bug, a broken config, a dead process
    RUNNING = "running"  # shown by reports only, never stored
    WAITING = "waiting"
    INTERRUPTED = "interrupted"


# budgetnet's state of a trial that has none recorded, by Optuna's state's name (still running, or older)
OF_OPTUNA_STATE = {"COMPLETE": State.COMPLETE, "PRUNED": State.PRUNED, "FAIL": State.FAILED,
                   "RUNNING": State.RUNNING, "WAITING": State.WAITING}


def of_run(status: str) -> str | None:
    """The state of a trial whose run ended with train's ``status`` without a rankable result; None else."""
    from budgetnet.train import DIVERGED, OOM, TOO_SLOW  # train loads torch: only once a run has ended

    return {DIVERGED: State.DIVERGED, OOM: State.OUT_OF_MEMORY, TOO_SLOW: State.TOO_SLOW}.get(status)

