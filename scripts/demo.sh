#!/usr/bin/env bash
# Command 1: set up, build the demo model (once, cached) and run profiles/demo.yaml offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2}
exec .venv/bin/quantmill demo "$@"
