"""Starting or joining Ray for ``--backend ray``, quietly, and each trial's share of the cluster."""

from __future__ import annotations

import logging
import os
import signal
import warnings
from pathlib import Path

import ray

from budgetnet.config import ConfigError

QUIET_ENV = {
    "TUNE_DISABLE_SIGINT_HANDLER": "1",  # Ctrl-C is phase.Interrupt's, as on the optuna backend
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no CSV/JSON/TensorBoard files per trial: the study has it all
    "RAY_AIR_NEW_OUTPUT": "0",
}


def start_ray(address: str | None) -> None:
    """Join the cluster at ``address``, or start a local one on 127.0.0.1, quietly. ``ray.init`` installs
    its own SIGTERM handler (exit at once); the command's handlers (graceful stop) are put back."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Define-by-run function passed")
    if ray.is_initialized():
        return
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address:
        # A cluster that `ray start` began with this user's token (~/.ray/auth_token, made by Ray's first local
        # start) checks it; ray.init sends it only in token mode, which it turns on for a local start alone.
        if (Path.home() / ".ray" / "auth_token").exists():
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ray.exceptions.RayError) as e:
            raise ConfigError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[-1]}") from None
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
    for s, h in handlers.items():
        if h is not None:
            signal.signal(s, h)


def trial_resources(device: str, workers: int, gpus_per_trial: float | None) -> dict:
    """CPUs and GPU share per trial: the cluster's CPUs split among ``workers`` concurrent trials (at most
    one node's worth, or the trial could never be placed), and ``gpus_per_trial`` of a GPU (default 1/N on
    CUDA, none on a CPU)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = sum(n.get("CPU", 0) for n in nodes)
    largest = max((n.get("CPU", 0) for n in nodes), default=1)
    cpus = max(1.0, min(largest, float(total // workers)))
    gpus = gpus_per_trial if gpus_per_trial is not None else (1.0 / workers if device.startswith("cuda") else 0.0)
    if device.startswith("cuda") and not gpus > 0:
        raise ConfigError("--backend ray on CUDA needs --gpus-per-trial above 0 (a trial without one sees no GPU)")
    return {"cpu": cpus, "gpu": gpus}
