"""A four-recipe sweep of the demo model with one Dask worker and with two: wall times and their ratio.

    python benchmarks/sweep.py [--runner dask|threads]

Each sweep runs in a fresh process and a fresh state folder (nothing cached between them); the demo model
is built (or reused) beforehand. The fan-out itself (quantize + evaluate of every recipe) is what the
second worker can speed up; download, merge, calibration and the baseline run once either way.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GRID = [{"methods": ["rtn"], "bits": [4, 8], "group_sizes": [64]}, {"methods": ["bnb-int8", "bnb-nf4"]}]


def sweep_profile(assets, runner: str, workers: int) -> dict:
    """The demo model with a four-recipe grid on `workers` workers."""
    return {
        "name": "bench-sweep",
        "model": {"path": str(assets.model_dir)},
        "adapter": {"path": str(assets.adapter_dir)},
        "calibration": {"source": {"path": str(assets.calib_path)}, "num_samples": 16, "seq_len": 128},
        "sweep": {"grid": GRID, "runner": {"kind": runner, "max_workers": workers}},
        "evaluation": {"source": {"path": str(assets.eval_path)}, "max_tokens": 4096, "window": 256,
                       "speed": {"enabled": False}},
        "registry": {"model_name": "bench-sweep"},
    }


def timed_sweep(assets, runner: str, workers: int) -> float:
    """Wall seconds of one `quantmill sweep` in a fresh process and state folder."""
    from benchmarks.rerun import timed_cli

    home = Path(tempfile.mkdtemp(prefix=f"quantmill-sweep{workers}-"))
    path = home / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_profile(assets, runner, workers)))
    return timed_cli(home, "sweep", str(path))


def main() -> None:
    """Build the demo model, then time the sweep with one worker and with two."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runner", choices=("dask", "threads"), default="dask")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from quantmill.demo import build_demo_assets

    assets = build_demo_assets(REPO / ".quantmill" / "demo", arch="llama", with_adapter=True)
    one = timed_sweep(assets, args.runner, 1)
    two = timed_sweep(assets, args.runner, 2)
    print(f"4-recipe sweep ({args.runner}), 1 worker:  {one:8.1f} s")
    print(f"4-recipe sweep ({args.runner}), 2 workers: {two:8.1f} s")
    print(f"ratio 2 workers / 1 worker:   {two / one:8.3f}  (cores here: {os.cpu_count()})")


if __name__ == "__main__":
    main()
