"""``budgetnet`` command line: thin flag parsing over library functions.

A user mistake prints one line (``budgetnet: error: ...``) and exits with code 2, never a traceback.
``parser`` holds the flags, ``checks`` the validation, ``search`` and ``commands`` the command bodies.
"""

from __future__ import annotations

import sys
import time

STARTED = time.perf_counter()  # the wall-clock budget covers the command from here (imports included)

from budgetnet.cli.commands import (  # noqa: E402
    cmd_dashboard,
    cmd_datasets,
    cmd_evaluate,
    cmd_export,
    cmd_prune,
    cmd_report,
)
from budgetnet.cli.finetune import cmd_train_or_finetune  # noqa: E402
from budgetnet.cli.parser import UserError, build_parser  # noqa: E402
from budgetnet.cli.search import cmd_search  # noqa: E402

COMMANDS = {"search": cmd_search, "train": cmd_train_or_finetune, "evaluate": cmd_evaluate, "report": cmd_report,
            "datasets": cmd_datasets, "prune": cmd_prune, "export": cmd_export, "dashboard": cmd_dashboard}


def _user_mistakes() -> tuple[type[Exception], ...]:
    """The errors that are the user's to fix, reported in one line. Imported when one is raised, not
    before: their modules import torch, which a parse error or --help need not wait for."""
    from budgetnet.budget import BudgetExceeded
    from budgetnet.checkpoint import CheckpointError
    from budgetnet.config import ConfigError
    from budgetnet.datasets.info import DatasetNotFound
    from budgetnet.files import UnsafePath

    return ConfigError, DatasetNotFound, CheckpointError, BudgetExceeded, UnsafePath


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from budgetnet.device import tune_cpu_allocator

        tune_cpu_allocator()
        return COMMANDS[args.command](args)
    except Exception as e:
        if isinstance(e, UserError) or isinstance(e, _user_mistakes()):  # a UserError imports nothing
            print(f"budgetnet: error: {e}", file=sys.stderr)
            return 2
        if not isinstance(e, OSError):
            raise
        # the machine's to fix, not a bug: a read-only --out, a busy port, a full disk
        where = f": {e.filename}" if e.filename else ""
        print(f"budgetnet: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("budgetnet: interrupted", file=sys.stderr)
        return 130
