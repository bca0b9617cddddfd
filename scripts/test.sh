#!/usr/bin/env bash
# Command 2: set up and run the whole test suite (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1  # thread settings for torch and GPTQModel: tests/conftest.py
# Python caches the bytecode of this checkout's own modules (bootstrap compiled the installed packages'): with
# PYTHONDONTWRITEBYTECODE set, as on some machines here, each of the suite's ~170 Python processes compiled them
# again (≈ 0.2 s of CPU each, measured 2026-12-02).
unset PYTHONDONTWRITEBYTECODE
# Three pytest-xdist workers (QUANTMILL_TEST_WORKERS; 0 runs in one process): on 2 cores a third fills the gaps
# where the others wait on a subprocess or server (fresh clone 2026-12-02: 11 % less time); conftest.py orders the tests dearest
# first and keeps tests that share a dear fixture on one worker.
workers=${QUANTMILL_TEST_WORKERS:-3}
xdist=()
if [ "$workers" != 0 ]; then
  xdist=(-n "$workers" --dist loadgroup --no-loadscope-reorder)
fi
set +e
.venv/bin/python -m pytest "${xdist[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
