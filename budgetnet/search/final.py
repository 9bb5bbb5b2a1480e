"""``best.pt`` and the final phase: the one home of writing the search's model.

- ``keep_if_best`` writes a trial's model when it beats the model already at ``--out`` (best-so-far is
  never lost). The check and the write happen under one lock on the folder that holds ``--out``, so two
  workers finishing at once cannot leave the worse model behind, and a final model is never replaced by
  a search one.
- ``check_caps`` checks the model at ``--out`` against every cap, its latency measured as a trial's was.
- ``final_training`` trains the best configuration on train+validation for what is left of the budget and
  writes ``best.pt`` once, if its model passes a check (``fit_fell_short``); otherwise the best trial's
  model stays. A run that diverges is run again at half the learning rate in the time left, while that
  time still shows the data as many epochs as the trial saw (``final_too_short``). Only the leader
  process calls it, after every worker has ended.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path

import optuna

from budgetnet.budget import count_macs, count_params
from budgetnet.checkpoint import CheckpointError, load_checkpoint, recorded_info, save_checkpoint
from budgetnet.compile import compile_note
from budgetnet.config import EVAL_SUBSET, TTA_VIEWS, RunConfig
from budgetnet.data import DeviceData, load_data, merged
from budgetnet.datasets.info import DatasetInfo
from budgetnet.errors import first_line
from budgetnet.evaluate import checkpoint_latency
from budgetnet.search import attrs as A
from budgetnet.search.clock import WRITE_RESERVE_S, Clock
from budgetnet.search.pick import Choice
from budgetnet.search.pick import tta as tta_choice
from budgetnet.search.progress import Reporter
from budgetnet.search.race import plan as plan_race
from budgetnet.search.race import resumed as resumed_race
from budgetnet.search.race import run as run_race
from budgetnet.search.source import study_data, trial_start
from budgetnet.search.teacher import DISTILL_WEIGHT, auto_teacher, load_teacher, reuse_teacher
from budgetnet.search.trial import Caps
from budgetnet.train import COMPLETE, DIVERGED, RunResult, train_run

FIT_MARGIN = 0.05  # how far below the best trial's val accuracy the final model's training fit may fall
CHANCE_FACTOR = 1.5  # a best trial under this multiple of chance accuracy has learned nothing to speak of
FINAL_RETRIES = 2  # a diverged final run is run again at half the lr, then a quarter, while time allows


@contextmanager
def out_lock(out: str | os.PathLike):
    """An exclusive lock (flock) on the folder that holds ``out``, shared by every process on this machine
    (and released by the kernel if its holder dies). The folder, not a lock file: nothing is left behind."""
    folder = Path(out).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def holds_as_good(out: str, study_name: str, value: float) -> bool:
    """Whether ``out`` holds a model of the study at least as good as one of validation ``value``: its final
    model, or a trial's that scored as well. An unreadable file holds nothing (the command checked at start
    that it was ours)."""
    if not Path(out).exists():
        return False
    try:
        held = load_checkpoint(out)
    except CheckpointError:
        return False
    return held["extra"].get("study") == study_name and (
        held["extra"].get("phase") == "final" or held["metrics"].get("val_acc", -1.0) >= value)


def keep_if_best(out: str, study_name: str, trial_number: int, cfg: RunConfig, result: RunResult,
                 value: float, n_params: int, flops: int, classes: list[str], info: DatasetInfo | None = None,
                 extra: dict | None = None) -> bool:
    """Write the trial's model to ``out`` if it beats the one there (of this study); True if written.
    ``info``: the trial's ``DatasetInfo``, so that a folder dataset is not scanned again for the write.
    ``extra``: more for the checkpoint to record (a fine-tuned model's source)."""
    with out_lock(out):
        if holds_as_good(out, study_name, value):
            return False
        save_checkpoint(out, cfg, result.state_dict, metrics={"val_acc": value, **numbers(result.metrics)},
                        n_params=n_params, flops=flops, classes=classes, train_seconds=result.seconds,
                        precision=result.precision, info=info,
                        extra={**(extra or {}), "phase": "search", "study": study_name, "trial": trial_number})
    return True


def keep_artifact_if_best(study: optuna.Study, trial, artifact_dir: str, cfg: RunConfig, result: RunResult,
                          value: float, n_params: int, flops: int, classes: list[str],
                          info: DatasetInfo | None = None, extra: dict | None = None) -> bool:
    """Store a complete trial's model as an Optuna artifact of the trial (``model_artifact``) when it beats
    every complete trial of the study: the leader can then write ``best.pt`` from it wherever it runs
    (``restore_best``), whichever command or machine trained it. True if stored."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if any(t.value is not None and t.value >= value for t in done):
        return False
    folder = Path(artifact_dir).absolute()
    folder.mkdir(parents=True, exist_ok=True)  # FileSystemArtifactStore does not create it
    tmp = folder / f".trial-{trial.number}-{uuid.uuid4().hex[:8]}.pt"
    try:
        save_checkpoint(tmp, cfg, result.state_dict, metrics={"val_acc": value, **numbers(result.metrics)},
                        n_params=n_params, flops=flops, classes=classes, train_seconds=result.seconds,
                        precision=result.precision, info=info,
                        extra={**(extra or {}), "phase": "search", "study": study.study_name, "trial": trial.number})
        artifact_id = upload_artifact(artifact_store=FileSystemArtifactStore(str(folder)), file_path=str(tmp),
                                      study_or_trial=trial, mimetype="application/octet-stream")
    finally:
        tmp.unlink(missing_ok=True)
    A.MODEL_ARTIFACT.set(trial, {"id": artifact_id, "dir": str(folder), "host": socket.gethostname()})
    return True


def restore_best(out: str, study: optuna.Study, best: optuna.trial.FrozenTrial, reporter: Reporter) -> bool:
    """Write ``best``'s model to ``out`` from its artifact when ``out`` holds no model of this study as good
    (it ran in another command, or on another machine): the search's best is at ``out`` whatever the final
    phase does next. True if written."""
    artifact = A.MODEL_ARTIFACT.of(best)
    if not artifact:
        return False
    with out_lock(out):
        if holds_as_good(out, study.study_name, best.value):
            return False
        source = Path(artifact["dir"]) / artifact["id"]
        try:
            tmp = Path(out).with_name(f".{Path(out).name}.{uuid.uuid4().hex[:8]}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, out)
        except OSError as e:
            reporter.warning(f"trial {best.number}'s model is an artifact in {artifact['dir']} on {artifact['host']}, "
                             f"which this machine cannot read ({first_line(e)}); {out} keeps what it holds. Give "
                             "every command one --artifact-dir on a shared filesystem")
            return False
    reporter.message(f"{out}: trial {best.number}'s model, from its artifact (it ran in another command)")
    return True


def final_too_short(best: optuna.trial.FrozenTrial, seconds: float, images: int, out: str) -> str | None:
    """Why a final phase of ``seconds`` is not worth running, or None. It must show the best config's data
    at least as many epochs as its trial did: a shorter run from scratch would end below that trial."""
    rate, trial_epochs = A.IMAGES_PER_S.of(best, 0.0), A.EPOCHS.of(best, 0.0)
    epochs = rate * max(seconds, 0.0) / max(images, 1)
    if seconds >= 1.0 and epochs >= trial_epochs:
        return None
    return (f"final training skipped: {max(seconds, 0):.0f} s left would train trial {best.number}'s config for "
            f"about {epochs:.2f} epochs, fewer than its {trial_epochs:.2f} in the search; {out} keeps that "
            f"trial's model")


def near_chance(best: optuna.trial.FrozenTrial, num_classes: int) -> str | None:
    """A warning when the best trial scored under 1.5x chance: nothing the search trained has learned (slices
    too short for the sampled configs on this device, say), so ``best.pt`` will not be a useful model."""
    chance = 1.0 / max(num_classes, 1)
    if best.value is None or best.value >= CHANCE_FACTOR * chance:
        return None
    return (f"warning: the best trial ({best.number}) scored {best.value:.1%} validation accuracy, near chance "
            f"({chance:.1%} for {num_classes} classes): nothing this search trained has learned, and the model "
            "it writes will not be useful; give it more --hours, longer --trial-seconds or a smaller --max-params")


def fit_fell_short(result: RunResult, best: optuna.trial.FrozenTrial) -> str | None:
    """Why the final model must not replace the trial's, or None. It trained on the validation images that
    scored the trial, and for longer, so it should fit its training images at least about as well as the
    trial's model predicted unseen ones. Scoring ``FIT_MARGIN`` below that means the run went wrong (a net
    without normalisation stuck at chance after a high learning rate, say) even though no loss was NaN."""
    fit = result.metrics.get("fit_acc")
    if fit is None or best.value is None or fit >= best.value - FIT_MARGIN:
        return None
    return (f"it fits {fit:.1%} of {result.metrics.get('fit_images', 0)} of its training images, against "
            f"trial {best.number}'s {best.value:.1%} on unseen validation images")


def final_training(opts, study: optuna.Study, choice: Choice, clock: Clock, stop, reporter: Reporter,
                   precision: str, split: DeviceData | None = None, slice_s: float = 0.0) -> tuple[str, dict]:
    """Train the picked config (``choice``; after a race, its winner) on train+validation until
    ``WRITE_RESERVE_S`` before the budget ends, write ``opts.out`` and attach it to the study. ``split``: the
    search's data, given when finalists may race (their legs train on its training split). Returns the
    phase that ``opts.out`` holds and the metrics."""
    runs = int(A.FINAL_RUNS.of(study, 0)) + 1
    A.FINAL_RUNS.set(study, runs)
    if runs > 1 and (earlier := resumed_race(study, choice.trial.number)):  # a race is never run twice
        number, by_race, note = earlier
        reporter.message(note)
        choice.trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        choice.by = "race" if by_race else choice.by
    again = " (again: an earlier run of it was interrupted)" if runs > 1 else ""
    reporter.message(f"final training{again}: trial {choice.trial.number}'s config on train+validation for "
                     f"{clock.left() - WRITE_RESERVE_S:.0f} s")
    deadline = opts.budget_seconds - WRITE_RESERVE_S + 1.0
    timed_stop = lambda: stop() or clock.used() > deadline or clock.tick()  # noqa: E731
    carry = None
    if runs == 1 and choice.asked.endswith("race"):
        if len(choice.finalists) < 2:
            _skip_race(study, reporter, f"no other trial's config lies within the validation noise of trial "
                                        f"{choice.trial.number}'s")
        elif split is None or opts.teacher:
            _skip_race(study, reporter, "--teacher trains a teacher out of the final phase's time" if opts.teacher
                       else "a fine-tuning search's final phase trains its pick alone")
        else:
            carry = _race(opts, study, choice, split, clock, timed_stop, reporter, precision, slice_s)
    A.PICK.set(study, choice.as_attr())
    cfg = RunConfig.from_json(A.CONFIG.of(choice.trial)).replace(seed=opts.seed)
    if split is not None:
        data = merged(split)
    elif opts.init is None:
        data = load_data(cfg.data, opts.data_dir, opts.device, merge_val=True, download=opts.download)
    else:  # conformed to the checkpoint it fine-tunes, and starting from its weights
        data = study_data(opts, merge_val=True)
    del split
    init_state, extra = trial_start(opts, cfg, data) if opts.init is not None else (None, {})
    cfg, teacher = _final_teacher(opts, study, choice.trial, cfg, data, clock, timed_stop, reporter, precision, runs)
    seconds = clock.left() - WRITE_RESERVE_S  # what is left once the data (and the teacher) are loaded
    keeping = f"keeping the search's best model (trial {choice.observed_best}) in {opts.out}"
    if seconds < 1.0:
        reporter.message(f"final training skipped: loading the data left {seconds:.1f} s; {keeping}")
        return "search", {}
    result, cfg = _final_run(opts, study, choice.trial, cfg, data, seconds, clock, stop, timed_stop, reporter,
                             precision, teacher, init_state, carry)
    if result.status != COMPLETE:
        reporter.message(f"final training ended early ({result.status}: {result.reason}); {keeping}")
        return "search", {}
    short = fit_fell_short(result, choice.trial)
    if short:
        reporter.message(f"final training failed its check ({short}); {keeping}")
        A.FINAL_FAILED.set(study, short)
        return "search", {}
    metrics = {"best_trial_val_acc": choice.trial.value, **numbers(result.metrics)}
    tta = final_tta(opts, study, choice.trial, reporter)
    n_params, flops = A.N_PARAMS.of(choice.trial), A.FLOPS.of(choice.trial) * TTA_VIEWS[tta]
    with out_lock(opts.out):
        path = save_checkpoint(opts.out, cfg, result.state_dict, metrics=metrics, n_params=n_params, flops=flops,
                               classes=data.classes, train_seconds=result.seconds, precision=result.precision,
                               info=data.info, tta=tta, extra={**extra, "phase": "final", "study": study.study_name,
                                                      "trial": choice.trial.number, "picked_by": choice.by})
    upload_artifact(study, path, opts.artifact_dir, reporter)
    A.FINAL_DONE.set(study, True)
    return "final", metrics


def final_tta(opts, study: optuna.Study, trial: optuna.trial.FrozenTrial, reporter: Reporter) -> str:
    """How the final model predicts (``--tta``; ``pick.tta``), kept in the study (``tta``) and said in a line.
    Two views must fit the caps: twice the trial's MACs, and twice its guard-measured latency."""
    views = TTA_VIEWS["flip"]
    over = None
    if opts.max_flops is not None and views * A.FLOPS.of(trial, 0) / 2 > opts.max_flops:
        over = f"--max-flops ({views} x {A.FLOPS.of(trial, 0) / 2e6:,.4g} M MACs)"
    elif opts.max_latency_ms is not None and views * A.LATENCY_MS.of(trial, math.inf) > opts.max_latency_ms:
        over = f"--max-latency-ms ({views} x {A.LATENCY_MS.of(trial, math.inf):.3g} ms)"
    tta, why = tta_choice(opts.tta, A.FLIP.of(trial), over)
    A.TTA.set(study, {"asked": opts.tta, "tta": tta, "why": why})
    reporter.message(f"test-time flip averaging: {'on' if tta == 'flip' else 'off'} ({why})")
    return tta


def _skip_race(study: optuna.Study, reporter: Reporter, why: str) -> None:
    A.RACE.set(study, {"state": "skipped", "why": why})
    reporter.message(f"final race skipped: {why}")


def _race(opts, study: optuna.Study, choice: Choice, split: DeviceData, clock: Clock, stop, reporter: Reporter,
          precision: str, slice_s: float):
    """Race the finalists when a race pays (``race.plan``); the winner becomes ``choice.trial``. Returns the
    winner's carry (its leg, to go on from), or None."""
    planned = plan_race(choice.finalists, clock.left() - WRITE_RESERVE_S, slice_s)
    if isinstance(planned, str):
        _skip_race(study, reporter, planned)
        return None
    racers, leg_s = planned
    raced = run_race(racers, leg_s, split, clock.left() - WRITE_RESERVE_S, study=study, seed=opts.seed,
                     device=opts.device, precision=precision, compile=opts.compile, stop=stop,
                     message=reporter.message)
    if raced is None:
        return None
    choice.trial, choice.by = raced.winner, "race"
    return raced.carry


def _final_teacher(opts, study: optuna.Study, best, cfg: RunConfig, data, clock: Clock, stop, reporter: Reporter,
                   precision: str, runs: int):
    """The teacher of the final run (``--teacher``), and the config that distils from it; none without."""
    teacher = None
    if opts.teacher == "auto":  # trained here, out of this phase's own time, when teacher and student fit
        if runs > 1:  # resumed: the teacher an interrupted run trained is reused, not paid for twice
            teacher, note = reuse_teacher(A.TEACHER_CHECKPOINT.of(study), opts.dataset, data, opts.device)
            if teacher is not None:
                reporter.message(f"--teacher auto: {note}")
        if teacher is None:
            save_to = Path(opts.artifact_dir) / f"teacher-{uuid.uuid4().hex[:8]}.pt"
            teacher, note = auto_teacher(best, cfg, data, left=lambda: clock.left() - WRITE_RESERVE_S,
                                         device=opts.device, precision=precision, message=reporter.message,
                                         stop=stop, save_to=save_to)
            if teacher is not None and save_to.is_file():
                A.TEACHER_CHECKPOINT.set(study, str(save_to.absolute()))
        A.TEACHER.set(study, note)
    elif opts.teacher:
        teacher = load_teacher(opts.teacher, opts.dataset, data.info.shape, opts.device)
    if teacher is not None:  # its forward pass on every batch runs inside the final run's own seconds
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, distill=DISTILL_WEIGHT))
        reporter.message(f"final training distils from the teacher (weight {DISTILL_WEIGHT}, "
                         f"temperature {cfg.train.distill_temperature:g})")
    return cfg, teacher


def _final_run(opts, study: optuna.Study, best, cfg: RunConfig, data, seconds: float, clock: Clock, stop,
               timed_stop, reporter: Reporter, precision: str, teacher, init_state, carry) -> tuple[RunResult, RunConfig]:
    """The final run: the race winner's leg going on (``carry``) or a run from the start; a diverged run
    again at half the lr, from the start, while the time left still shows the data the trial's epochs."""
    for retry in range(FINAL_RETRIES + 1):
        if carry is not None:  # its schedule spans its leg and the time left
            result = train_run(cfg, data, device=opts.device, seconds=carry.seconds + seconds, precision=precision,
                               fit_images=EVAL_SUBSET, resume=carry, stop=timed_stop)
            carry = None
        else:
            result = train_run(cfg, data, device=opts.device, seconds=seconds, precision=precision, teacher=teacher,
                               compile=opts.compile, fit_images=EVAL_SUBSET, init_state=init_state, stop=timed_stop)
        note_compile(result.compile, study, reporter)
        if result.status != DIVERGED or retry == FINAL_RETRIES:
            break
        # A longer run than the trial's can still diverge at its learning rate; the time left is worth a
        # run at half of it, if that run would still show the data as many epochs as the trial did.
        seconds = clock.left() - WRITE_RESERVE_S
        if final_too_short(best, seconds, len(data.train), opts.out) or stop():
            break
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, lr=cfg.train.lr / 2))
        reporter.message(f"final training diverged ({result.reason}); again at half the learning rate "
                         f"({cfg.train.lr:.3g}) for {seconds:.0f} s")
        A.FINAL_RETRIES.set(study, retry + 1)
    return result, cfg


def check_caps(path: str | os.PathLike, caps: Caps, study: optuna.Study) -> dict:
    """The model at ``path`` checked against every cap: its exact parameters and MACs, and its latency
    measured as the guard measures a trial's (``evaluate.checkpoint_latency``, always, cap or not). Kept in
    the study (``final_check``) with the checkpoint's SHA-256, and reused while the file holds those bytes:
    a finished study's rerun measures nothing. ``over`` names the caps it breaks (the latency's is a new
    measurement of an architecture its trial measured under the cap: noise may tip it over)."""
    ckpt = load_checkpoint(path)
    held = A.FINAL_CHECK.of(study)
    if held and held.get("checkpoint_sha256") == ckpt["sha256"] and held.get("latency_device") == caps.latency_device \
            and held.get("latency_threads") == caps.latency_threads:
        return held
    cfg, shape = ckpt["run_config"].model, recorded_info(ckpt).shape
    lat = checkpoint_latency(ckpt, caps.latency_device, caps.latency_threads)
    check = {"checkpoint_sha256": ckpt["sha256"], "n_params": count_params(cfg, shape),
             "macs": count_macs(cfg, shape) * TTA_VIEWS[ckpt["tta"]], "tta": ckpt["tta"],
             "latency_ms": lat["latency_ms"], "latency_device": lat["device"], "latency_threads": lat["threads"],
             "latency_repeats": lat["repeats"], "latency_seconds": lat["seconds"]}
    limits = {"n_params": caps.max_params, "macs": caps.max_macs, "latency_ms": caps.max_latency_ms}
    check["over"] = [k for k, cap in limits.items() if cap is not None and check[k] > cap]
    A.FINAL_CHECK.set(study, check)
    return check


def note_compile(info: dict, study: optuna.Study, reporter: Reporter) -> None:
    """Record how the final run used ``torch.compile`` (study attr ``final_compile``), and say it."""
    A.FINAL_COMPILE.set(study, info)
    note = compile_note(info)
    if note:
        reporter.message(f"final training {note}")


def upload_artifact(study: optuna.Study, path: Path, artifact_dir: str, reporter: Reporter) -> None:
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    try:
        Path(artifact_dir).mkdir(parents=True, exist_ok=True)  # FileSystemArtifactStore does not create it
        store = FileSystemArtifactStore(artifact_dir)
        artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study,
                                      mimetype="application/octet-stream")
        A.BEST_ARTIFACT_ID.set(study, artifact_id)
    except OSError as e:  # the model is already safe on disk; a full artifact folder must not lose it
        reporter.warning(f"could not attach {path} to the study as an artifact ({e})")

