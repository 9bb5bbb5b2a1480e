"""budgetnet: the best small CNN a parameter cap and a wall-clock budget can buy."""

__version__ = "0.1.0"
