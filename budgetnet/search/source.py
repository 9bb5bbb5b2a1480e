"""``search --init CKPT``: the checkpoint a search fine-tunes, read once per process; the data conformed to
it; each trial's starting weights and what its model records of them (``budgetnet.finetune``)."""

from __future__ import annotations

import functools

from budgetnet.config import RunConfig, is_folder
from budgetnet.data import DeviceData
from budgetnet.datasets.read import dataset_info
from budgetnet.finetune import Source, adapt_state, adaptation, load_source, load_target, provenance


@functools.lru_cache(maxsize=4)
def _source(path: str) -> Source:
    return load_source(path)


def init_source(opts) -> Source | None:
    """The search's ``--init`` checkpoint (None for a search from scratch). Raises CheckpointError."""
    return None if opts.init is None else _source(opts.init)


@functools.lru_cache(maxsize=4)
def _adapted(path: str, dataset: str) -> dict:
    source = _source(path)
    return adaptation(source, dataset_info(dataset, source.info.image_size if is_folder(dataset) else None))


def study_data(opts, merge_val: bool = False) -> DeviceData:
    """The search's data conformed to its ``--init`` checkpoint's input and normalisation."""
    return load_target(init_source(opts), opts.dataset, opts.data_dir, opts.device, merge_val=merge_val,
                       download=opts.download, normalise_with=opts.normalise_with)[0]


def trial_start(opts, cfg: RunConfig, data: DeviceData) -> tuple[dict, dict]:
    """A run's starting weights (a new head, seeded by ``cfg.seed``, where the classes differ) and the
    ``extra`` its checkpoint records: ``{"finetune": provenance}``."""
    source = init_source(opts)
    state, new_head = adapt_state(source, data.info.shape, data.classes, cfg.seed)
    return state, {"finetune": provenance(source, cfg.train, new_head, _adapted(opts.init, opts.dataset),
                                          opts.normalise_with)}
