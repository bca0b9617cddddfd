#!/usr/bin/env bash
# Create .venv and install quantmill with its pinned dependencies (skipped when already current).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.quantmill-installed
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  # torch first, pinned: the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[dev,autoround]" "torch==2.13.0"
  # AutoAWQ, the optional `awq` backend users ask for by name: archived upstream and it requires triton
  # (CUDA-only), which nothing here needs; its real imports all come with gptqmodel, so install it alone.
  .venv/bin/python -m pip install --quiet --no-deps "autoawq==0.2.9"
  echo "$want" > "$stamp"
fi
