#!/usr/bin/env bash
# Create .venv and install the tested set from requirements/lock.txt, then quantmill (skipped when already current).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.quantmill-installed
want=$(cat pyproject.toml requirements/lock.txt requirements/autoawq.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet "pip==26.3" >/dev/null 2>&1 || true
  if .venv/bin/python -c 'import platform, sys; sys.exit(sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64")'; then
    # The tested set, every package pinned with its hashes; torch is the CPU wheel (a CUDA build has other hashes).
    .venv/bin/python -m pip install --quiet --require-hashes -r requirements/lock.txt
    # AutoAWQ alone (see the file), then quantmill itself; both build with the locked setuptools.
    .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation --require-hashes -r requirements/autoawq.txt
    .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
  else
    # The lock is the set tested on CPython 3.11, Linux x86_64; elsewhere the ranges in pyproject.toml (torch first,
    # pinned: an open range pulls a CUDA build). README: Versions.
    echo "bootstrap: not CPython 3.11 on x86_64: installing pyproject's ranges, not requirements/lock.txt" >&2
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[dev,dask,autoround]" "torch==2.13.0"
  fi
  echo "$want" > "$stamp"
fi
