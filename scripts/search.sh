#!/usr/bin/env bash
# Set up and run the main job: budgetnet search --max-params 1e6 --hours 1 (CIFAR-100, SQLite under studies/).
# Extra flags pass through, e.g.  scripts/search.sh --data-dir ~/data   or   --dataset fashion_mnist
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/budgetnet search --max-params 1e6 --hours 1 "$@"
