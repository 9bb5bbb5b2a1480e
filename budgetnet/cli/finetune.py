"""``budgetnet train --init CKPT``: fine-tune a checkpoint on new data with a freezing strategy."""

from __future__ import annotations

import dataclasses
import sys

from budgetnet.cli.checks import _check_writable, _device
from budgetnet.cli.commands import cmd_train, print_progress
from budgetnet.cli.parser import UserError

FINETUNE_LR_SCALE = 0.1  # the default lr: a tenth of the checkpoint's (its full peak would undo its training)


def cmd_train_or_finetune(args) -> int:
    """``budgetnet train``: a config from scratch, or a checkpoint fine-tuned (--init)."""
    return cmd_train(args) if args.init is None else cmd_train_init(args)


def cmd_train_init(args) -> int:
    """Everything that can be refused is refused (one line) before the data loads or anything trains."""
    from budgetnet.budget import check_memory, count_flops
    from budgetnet.checkpoint import save_checkpoint
    from budgetnet.compile import compile_note
    from budgetnet.config import is_folder
    from budgetnet.datasets.read import dataset_info
    from budgetnet.finetune import (
        adapt_state,
        check_target,
        load_source,
        load_target,
        provenance,
        target_data,
        target_shape,
    )
    from budgetnet.train import COMPLETE, EVAL_SUBSET, train_run

    if (args.seconds is None) == (args.epochs is None):
        raise UserError("give exactly one of --seconds S or --epochs E")
    if args.config is not None:
        raise UserError("--config and --init: give one (--init trains the checkpoint's own net and recipe)")
    source = load_source(args.init)
    dataset = args.dataset or source.cfg.data.dataset
    if args.image_size is not None:
        raise UserError(f"--image-size: with --init the images are resized to the checkpoint's side, "
                        f"{source.info.image_size} px")
    _check_writable(args.out)
    target = dataset_info(dataset, source.info.image_size if is_folder(dataset) else None)
    check_target(source, target, args.max_params, args.max_flops)
    train = dataclasses.replace(source.cfg.train, freeze=args.freeze, backbone_lr_scale=args.backbone_lr_scale,
                                lr=args.lr or source.cfg.train.lr * FINETUNE_LR_SCALE, distill=0.0)
    cfg = source.cfg.replace(train=train, data=target_data(source, dataset),
                             seed=source.cfg.seed if args.seed is None else args.seed)
    device = _device(args.device)
    shape = target_shape(source, target.num_classes)
    n_params = check_memory(cfg.model, cfg.train, shape, device)  # before the data and the model load
    data, adapted = load_target(source, dataset, args.data_dir, device, merge_val=args.full,
                                download=args.download, normalise_with=args.normalise_with)
    init_state, new_head = adapt_state(source, shape, data.classes, cfg.seed)
    if new_head:
        print(f"new classifier head: {len(data.classes)} classes of {dataset} (the checkpoint's "
              f"{len(source.classes)} are {_names(source.classes)})", flush=True)
    for what, how in adapted.items():
        print(f"adapted the {what.replace('_', ' ')}: {how}", flush=True)
    result = train_run(cfg, data, device=device, seconds=args.seconds, epochs=args.epochs, hook=print_progress,
                       precision=args.precision, compile=args.compile, init_state=init_state,
                       fit_images=EVAL_SUBSET if args.full else 0)
    if result.status != COMPLETE:
        print(f"budgetnet: training ended: {result.status} ({result.reason})", file=sys.stderr)
        return 1
    record = provenance(source, train, new_head, adapted, args.normalise_with)
    save_checkpoint(args.out, cfg, result.state_dict, metrics=result.metrics, n_params=n_params,
                    flops=count_flops(cfg.model, shape), classes=data.classes, train_seconds=result.seconds,
                    precision=result.precision, extra={"phase": "train", "finetune": record}, info=data.info)
    note = compile_note(result.compile)
    print(f"wrote {args.out} ({n_params:,} params, {result.seconds:.1f} s in {result.precision}"
          f"{', ' + note if note else ''}), fine-tuned from {source.path} ({args.freeze}); evaluate with: "
          f"budgetnet evaluate {args.out}")
    return 0


def _names(classes, shown: int = 4) -> str:
    more = f", ... ({len(classes) - shown} more)" if len(classes) > shown else ""
    return ", ".join(classes[:shown]) + more
