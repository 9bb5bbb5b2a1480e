"""Checks of what the user asked for, made before anything is created: each refusal is a UserError.

Only this module resolves ``--device auto``.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from budgetnet.cli.parser import UserError


def _device(name: str, flag: str = "--device"):
    import torch

    from budgetnet.device import resolve_device

    try:
        device = resolve_device(name)
    except RuntimeError as e:
        raise UserError(f"bad {flag} {name!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):  # torch parses meta, mps, xpu...: budgetnet trains on neither
        raise UserError(f"{flag} {name} is not one budgetnet runs on: auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} cuda asked for, but no CUDA device is available (use {flag} cpu)")
    return device


def _check_writable(path: str, flag: str = "--out") -> None:
    p = Path(path)
    if p.is_dir():
        example = p / {"--out": "best.pt", "--csv": "trials.csv"}.get(flag, "budgetnet.db")
        raise UserError(f"{flag} {path} is a directory; give a file path such as {example}")
    # Tried in the nearest folder that exists: the folders still missing are made when the file is written,
    # and a command refused later (a bad flag after this one) leaves none of them behind.
    folder = p.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".budgetnet-write-test"):
            pass
    except OSError as e:
        raise UserError(f"cannot write {flag} {path}: {e.strerror or e}") from None


def _check_not_someone_elses(out: str, study_name: str, storage: str) -> None:
    """Never overwrite a model that another study (or something else) left at --out, nor one that an
    earlier study of the same name left there: a study deleted from the storage (to start over) and
    begun again would otherwise rank its trials against that model, and keep it while its best.json
    named the new study's trials."""
    from budgetnet.checkpoint import CheckpointError, load_checkpoint
    from budgetnet.search.storage import shown_url, stored_study_attrs

    if not Path(out).exists():
        return
    try:
        owner = load_checkpoint(out)["extra"].get("study")
    except CheckpointError:
        raise UserError(f"--out {out} exists and is not a budgetnet checkpoint; move it or choose another "
                        f"--out") from None
    if owner != study_name:
        resume = (f"--study-name {owner} goes on with that study (a new --hours or other flags name a new "
                  "one by default), or " if stored_study_attrs(storage, owner) is not None else "")
        raise UserError(f"--out {out} holds the model of study {owner!r}, not {study_name!r}; {resume}move it "
                        f"or choose another --out")
    if stored_study_attrs(storage, study_name) is None:
        raise UserError(f"--out {out} holds the model of an earlier study {study_name!r} that --storage "
                        f"{shown_url(storage)} no longer holds; move it or choose another --out")


def _check_storage(url: str) -> None:
    """Reject a malformed storage before anything is created."""
    from budgetnet.search.storage import check_journal, parse_url

    check_journal(url)  # an existing file given as a path: a journal, or an SQLite file that needs sqlite:///
    if url.endswith((".log", ".jsonl")) and "://" not in url:
        _check_writable(url, "--storage")
        return
    parsed = parse_url(url)
    if parsed.drivername == "sqlite" and parsed.database:
        _check_writable(parsed.database, "--storage")


def _check_ray_flags(args, device: str) -> None:
    """The Ray flags go with --backend ray; a cluster address must answer before anything is created.
    ``device``: --device resolved (auto is cuda or cpu by now)."""
    if args.backend != "ray":
        for flag, value in (("--ray-address", args.ray_address), ("--gpus-per-trial", args.gpus_per_trial),
                            ("--ray-scheduler", args.ray_scheduler)):
            if value is not None:
                raise UserError(f"{flag} applies to --backend ray only")
        return
    if args.sampler == "grid":
        raise UserError("--sampler grid runs on --backend optuna only")
    if args.gpus_per_trial and not device.startswith("cuda"):  # --device auto on a machine without CUDA too
        raise UserError(f"--gpus-per-trial {args.gpus_per_trial:g} needs a CUDA device, and --device {args.device} "
                        f"is {device}")
    if args.ray_address is not None:
        import socket

        host, _, port = args.ray_address.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UserError(f"--ray-address {args.ray_address!r} must be HOST:PORT, the head node's GCS address "
                            f"(what 'ray start --head' prints)")
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
        except OSError as e:
            raise UserError(f"cannot reach the Ray cluster at {args.ray_address} ({e.strerror or e}); start one "
                            f"with 'ray start --head --port {port}', or drop --ray-address for a local one") from None
