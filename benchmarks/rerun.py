"""Cold run vs fully cached rerun of the demo profile (goal: rerun < 5% of the cold run).

    python benchmarks/rerun.py [--home DIR]

Both runs use the same fresh state folder; the demo model is built (or reused) beforehand so only the
pipeline is timed. Prints both wall times and their ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed_demo(home: Path, demo_root: Path) -> float:
    """Wall seconds of one `quantmill demo` in a fresh process."""
    env = {**os.environ, "QUANTMILL_HOME": str(home), "QUANTMILL_DEMO_ROOT": str(demo_root)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "demo"], cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return elapsed


def main() -> None:
    """Build the demo model, then time a cold and a cached run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None, help="state folder (default: a new temp dir)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from quantmill.demo import build_demo_assets

    demo_root = REPO / ".quantmill" / "demo"
    build_demo_assets(demo_root, arch="llama", with_adapter=True)
    home = args.home or Path(tempfile.mkdtemp(prefix="quantmill-bench-"))
    cold = timed_demo(home, demo_root)
    warm = timed_demo(home, demo_root)
    print(f"cold run:   {cold:8.1f} s")
    print(f"cached run: {warm:8.1f} s")
    print(f"ratio:      {warm / cold:8.3f}  (goal < 0.05)")


if __name__ == "__main__":
    main()
