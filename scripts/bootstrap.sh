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
  if ! .venv/bin/python -c 'import platform, sys; sys.exit(sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64")'; then
    echo "bootstrap: requirements/lock.txt is the set tested on CPython 3.11, Linux x86_64; elsewhere install" \
         "the ranges instead: .venv/bin/pip install -e '.[dev,dask]' torch==2.13.0 (README: Versions)" >&2
    exit 1
  fi
  .venv/bin/python -m pip install --quiet "pip==26.3" >/dev/null 2>&1 || true
  # The tested set, every package pinned with its hashes; torch is the CPU wheel (a CUDA build has other hashes).
  .venv/bin/python -m pip install --quiet --require-hashes -r requirements/lock.txt
  # AutoAWQ alone (see the file), then quantmill itself; both build with the locked setuptools.
  .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation --require-hashes -r requirements/autoawq.txt
  .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
