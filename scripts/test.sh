#!/usr/bin/env bash
# Set up (a virtual environment in .venv with budgetnet and its test extras) and run the test suite.
# This is the README's test command; .ci/run calls it. pytest's "no tests ran" (exit 5) is a failure.
#
# With no arguments it runs the whole suite, then the time-behaviour tests (-m "timing and not slow":
# slices, the probe, the precision measurement, the teacher's and the compiler's time, short searches;
# the searches of over ~20 s, the kill -9 resumes and the two-worker run are left to the first pass) once
# more as a CPU without AVX-512, AMX or native bf16 sees it: oneDNN limited to AVX2 and ATen's kernels to
# AVX2. A precision or speed choice tuned to a fast CPU then fails here, on any CI machine, instead of on
# a user's. On a CPU that has no more than AVX2 (no avx512*/amx* flag in /proc/cpuinfo) those settings
# change nothing, so the first pass already was that run and the second is skipped.
# BUDGETNET_EMULATION=on runs it anyway, =off never.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# Debian packages some tests need; without them those tests skip (installed where apt is usable):
# the real-data tests read Debian's Fashion-MNIST; the report page is checked in headless chromium; the
# PostgreSQL tests start a throwaway server (tests/conftest.py: initdb in a temporary folder, on 127.0.0.1,
# as an unprivileged user, stopped at the end), from Debian's binaries in /usr/lib/postgresql/<version>/bin.
# Where CI is set, a PostgreSQL test fails rather than skip without them.
debs=()
[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || debs+=(dataset-fashion-mnist)
command -v chromium >/dev/null || debs+=(chromium)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null || debs+=(postgresql)
if [ "${#debs[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]}") >/dev/null 2>&1 \
    || echo "note: ${debs[*]} not installed; the tests that need them will skip (where CI is set, the PostgreSQL ones fail)"
fi

run_pytest() {
  set +e
  "$@"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
  fi
  [ "$rc" -eq 0 ] || exit "$rc"
}

# The layers in pyproject.toml ([tool.importlinter]): a circle or a wrong-way import fails here.
.venv/bin/lint-imports --no-cache
# The slowest tests are named in every log: the suite is meant to stay near 12 minutes on 2 cores.
run_pytest .venv/bin/python -m pytest -q --durations=15 "$@"
# Whether this CPU has more than AVX2, the only case in which the emulation differs from the first pass
# (ATen's AVX512 capability needs those flags too). Where that cannot be seen (no /proc/cpuinfo): yes.
above_avx2() {
  [ ! -r /proc/cpuinfo ] || grep -q -w -E 'avx512[a-z0-9_]*|amx[a-z0-9_]*' /proc/cpuinfo
}

emulation="${BUDGETNET_EMULATION:-auto}"
if [ "$#" -eq 0 ] && [ "$emulation" != off ]; then
  if [ "$emulation" = on ] || above_avx2; then
    echo "time-behaviour tests again, as an AVX2-only CPU (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2):"
    run_pytest env ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python -m pytest -q -m "timing and not slow"
  else
    echo "this CPU has no more than AVX2 (no AVX-512, no AMX): the suite above already ran as an AVX2-only CPU sees it," \
      "so the emulated pass of the time-behaviour tests is skipped (BUDGETNET_EMULATION=on runs it)"
  fi
fi
