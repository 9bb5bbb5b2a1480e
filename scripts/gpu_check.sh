#!/usr/bin/env bash
# One command for a lent GPU, done within 8 minutes (--deadline SECONDS to change it): the machine, a short
# Fashion-MNIST search, the same with 4 workers, the CUDA tests, then the throughput tables; a step that would
# not fit is cut. Printed last as a Markdown block for docs/benchmarks.md.
#   scripts/gpu_check.sh            on the GPU host (raw outputs in gpu_check_out/; the block and a log archive in $OUT)
#   scripts/gpu_check.sh --smoke    the same steps on the CPU at toy sizes (the test suite runs this)
# On a bare, offline GPU host, first fill .whl/ and .data/ here with ../shared/tools/device-prep.sh and carry
# both: this script installs the wheels into $HOME/site when optuna is missing, and reads Fashion-MNIST
# from .data/fashion-mnist.
set -euo pipefail
export GPU_CHECK_T0=$(date +%s.%N)  # the deadline counts the wheels' install too
cd "$(dirname "$0")/.."
# The interpreter: $PYTHON if set (the test suite passes its own), else .venv's, else python3.
py=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
if ! "$py" -c "import optuna" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$HOME/site" .whl/*.whl
    export PYTHONPATH="$HOME/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: optuna is not installed and there are no wheels in .whl/ (run ../shared/tools/device-prep.sh)" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" scripts/gpu_check.py "$@"
