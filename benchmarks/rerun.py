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


def timed_cli(home: Path, *args: str, **env: str) -> float:
    """Wall seconds of one `quantmill ARGS` in a fresh process with state folder `home` (exits on failure)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    clean.update(QUANTMILL_HOME=str(home), **env)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "quantmill.flows.cli", *args], cwd=REPO, env=clean, capture_output=True,
                          text=True)
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
    cold = timed_cli(home, "demo", QUANTMILL_DEMO_ROOT=str(demo_root))
    warm = timed_cli(home, "demo", QUANTMILL_DEMO_ROOT=str(demo_root))
    print(f"cold run:   {cold:8.1f} s")
    print(f"cached run: {warm:8.1f} s")
    print(f"ratio:      {warm / cold:8.3f}  (goal < 0.05)")


if __name__ == "__main__":
    main()
