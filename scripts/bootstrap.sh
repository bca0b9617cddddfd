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
    # The installer: uv (parallel downloads and unpacking: this whole step in 41 s, where pip took 80 s with its cache
    # warm; measured 2026-12-02), given pip's configured local wheel folders (torch's CPU wheel) and the system's
    # certificates; pip where uv cannot be installed.
    install=(.venv/bin/python -m pip install --quiet)
    if .venv/bin/python -m pip install --quiet "uv==0.13.8" >/dev/null 2>&1; then
      install=(.venv/bin/uv pip install --quiet --python .venv/bin/python)
      links=$(.venv/bin/python -m pip config get global.find-links 2>/dev/null | tr -s ' \n' ',' | sed 's/,$//' || true)
      if [ -n "$links" ] && [ -z "${UV_FIND_LINKS:-}" ]; then
        export UV_FIND_LINKS="$links"
      fi
      export UV_NATIVE_TLS=${UV_NATIVE_TLS:-1}
    fi
    # The tested set, every package pinned with its hashes; torch is the CPU wheel (a CUDA build has other hashes).
    "${install[@]}" --require-hashes -r requirements/lock.txt
    # AutoAWQ alone (see the file), then quantmill itself; both build with the locked setuptools.
    "${install[@]}" --no-deps --no-build-isolation --require-hashes -r requirements/autoawq.txt
    "${install[@]}" --no-deps --no-build-isolation -e .
    # Bytecode, as pip compiles it, except the packages' own test suites and transformers' model folders other than
    # the demo's architectures (quantmill/demo_training.py ARCHS): 6,500 of 23,800 files, ≈ 22 s of CPU saved (all of
    # them: 79 s of the install's 96 s, fresh clone 2026-12-03); a suite run imported 105 of those, which Python
    # compiles and caches on first import. A file that does not compile (torch's Python 3.12 test intrinsics) is
    # skipped quietly, as uv does.
    .venv/bin/python -m compileall -qq -j 0 -x '/(tests?|testing)/|/transformers/models/(?!(auto|llama|qwen2)/)' \
      "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
  else
    # The lock is the set tested on CPython 3.11, Linux x86_64; elsewhere the ranges in pyproject.toml (torch first,
    # pinned: an open range pulls a CUDA build). README: Versions.
    echo "bootstrap: not CPython 3.11 on x86_64: installing pyproject's ranges, not requirements/lock.txt" >&2
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[dev,dask,autoround]" "torch==2.13.0"
  fi
  echo "$want" > "$stamp"
fi
