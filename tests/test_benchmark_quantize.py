"""Smoke test of benchmarks/quantize.py: the table has the unquantized reference and the method, with sane ratios."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, model_cache


@pytest.mark.slow
def test_quantize_benchmark_prints_reference_and_method_rows(demo_assets, tmp_path):
    env = {**os.environ, "QUANTMILL_TEST_MODELS": str(model_cache()), "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "benchmarks/quantize.py", "--methods", "rtn", "--max-tokens", "512",
                           "--calib-samples", "4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = re.compile(r"^(\S+)\s+([\d.]+)\s+([\d.]+) MiB\s+([\d.]+)\s+([\d.]+) MiB\s+([\d.]+)x\s+([\d.]+)\s+([+-][\d.]+)%$")
    rows = {m[1]: [float(x) for x in m.groups()[1:]] for m in map(row.match, proc.stdout.splitlines()) if m}
    assert set(rows) == {"unquantized", "rtn"}, proc.stdout
    ref, rtn = rows["unquantized"], rows["rtn"]
    seconds, peak, peak_ratio, size, compression, ppl, delta = rtn
    assert ref[2] == 1.0 and ref[4] == 1.0 and ref[6] == 0.0  # the reference row is its own reference
    assert abs(peak_ratio - peak / ref[1]) < 0.02 * peak_ratio + 0.01 and abs(compression - ref[3] / size) < 0.03
    # 4-bit weights: the checkpoint is a fraction of the fp32 one; perplexity close to (and measured like) the fp one
    assert compression > 2.5 and 0 < ppl and abs(delta - 100 * (ppl / ref[5] - 1)) < 0.05 and abs(delta) < 10
    assert 0 < seconds < 300 and peak > 0
    assert list(tmp_path.glob("quantmill-bench-*")) == []  # its state folder (store, checkpoints) is gone
