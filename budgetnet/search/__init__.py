"""``budgetnet search``: an Optuna study under a hard wall-clock budget, then a final training run.

Read ``session.py`` first (open → probe → search → final → summarise); docs/architecture.md has the layers.
"""
