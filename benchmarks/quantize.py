"""Quantizers on the demo model: wall time, peak RSS, size on disk, perplexity and its delta, per method.

Run: `python benchmarks/quantize.py [--methods rtn,gptq,...] [--max-tokens N] [--calib-samples N]`. Builds (or reuses)
the demo Llama in $QUANTMILL_TEST_MODELS or .quantmill/test-models and works in a throw-away state folder. Every
method runs in a process of its own (so peak RSS is that method's), which imports the same libraries first and
reports its peak above that common baseline; the unquantized model is measured the same way in the same run
(its "quantize" is loading the fp32 model), and every ratio is against it. Perplexity is scored by quantmill's
evaluation on the same held-out windows for every row.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MiB = 2**20
REFERENCE = "unquantized"


def status_bytes(key: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))


def child(method: str, model_dir: Path, calib: Path, windows_path: Path, out: Path) -> None:
    """Quantize (or, for the reference, load) in this process; print time, peak RSS, size and perplexity as JSON."""
    import importlib

    for name in ("torch", "transformers", "gptqmodel", "bitsandbytes", "torchao"):  # same baseline for every row
        importlib.import_module(name)
    from quantmill.methods.registry import QuantizeJob, build_config, get_method
    from quantmill.quantize.common import checkpoint_size, load_fp_model
    from quantmill.scoring import load_model, score_windows
    from quantmill.windows import load_windows

    base, start = status_bytes("VmRSS"), time.perf_counter()
    if method == REFERENCE:
        load_fp_model(model_dir)
        out = model_dir
    else:
        config = build_config(method, {})
        config.check_device("cpu")
        get_method(method).handler(config, QuantizeJob(model_dir, out, calib, "cpu", lambda _m: None))
    seconds, peak = time.perf_counter() - start, status_bytes("VmHWM") - base
    windows, first = load_windows(str(windows_path))
    metrics, _ = score_windows(load_model(str(out), "cpu"), windows, first)
    print("RESULT" + json.dumps({"seconds": seconds, "peak": peak, "base": base, "size": checkpoint_size(out),
                                 "perplexity": metrics["perplexity"], "tokens": metrics["eval_tokens"]}))


def run_child(method: str, model_dir: Path, calib: Path, windows: Path, out: Path) -> dict:
    """One row, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--child", method, str(model_dir), str(calib), str(windows), str(out)]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0 or "RESULT" not in proc.stdout:
        sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def table(rows: dict[str, dict]) -> list[str]:
    """The printed comparison: every ratio against the unquantized row."""
    ref = rows[REFERENCE]
    lines = [f"{'method':14s} {'time s':>8s} {'peak RSS':>10s} {'x ref':>6s} {'size':>10s} {'compr.':>7s} "
             f"{'perplexity':>11s} {'delta':>8s}"]
    for name, r in rows.items():
        lines.append(f"{name:14s} {r['seconds']:8.2f} {r['peak'] / MiB:6.1f} MiB {r['peak'] / ref['peak']:6.2f} "
                     f"{r['size'] / MiB:6.2f} MiB {ref['size'] / r['size']:6.2f}x {r['perplexity']:11.3f} "
                     f"{100 * (r['perplexity'] / ref['perplexity'] - 1):+7.2f}%")
    return lines


def main() -> int:
    """Measure the unquantized model and each method on the demo model; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="", help="comma-separated (default: every registered method)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens scored")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 128 tokens")
    parser.add_argument("--child", nargs=5, metavar=("METHOD", "MODEL", "CALIB", "WINDOWS", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], *map(Path, args.child[1:]))
        return 0
    home = Path(tempfile.mkdtemp(prefix="quantmill-bench-"))  # state, store and checkpoints: removed at exit
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ["QUANTMILL_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from quantmill import state

    state.configure_environment()
    from quantmill.context import StepContext
    from quantmill.demo import build_demo_assets
    from quantmill.errors import QuantmillError
    from quantmill.methods import get_method, known_methods
    from quantmill.profile import Calibration, Evaluation
    from quantmill.refs import ModelRef
    from quantmill.tasks.calibrate import calibrate
    from quantmill.tasks.evaluate import eval_data

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or known_methods()
    try:
        for m in methods:
            get_method(m)
    except QuantmillError as exc:
        parser.error(f"--methods: {exc}")
    cache = Path(os.environ.get("QUANTMILL_TEST_MODELS") or REPO / ".quantmill" / "test-models")
    assets = build_demo_assets(cache, arch="llama", with_adapter=False)
    model = ModelRef(path=str(assets.model_dir), sha256="bench", source="demo",
                     summary={"max_position_embeddings": 512})
    store = str(home / "store")
    data = eval_data.fn(model, Evaluation(source={"path": str(assets.eval_path)}, max_tokens=args.max_tokens,
                                          window=128, speed=None), ctx=StepContext(store_root=store))
    calib = calibrate.fn(model, Calibration(source={"path": str(assets.calib_path)}, num_samples=args.calib_samples,
                                            seq_len=128), ctx=StepContext(store_root=store))
    rows = {}
    for name in [REFERENCE, *methods]:
        rows[name] = run_child(name, assets.model_dir, Path(calib.path), Path(data.path), home / "out" / name)
    print(f"model: {assets.model_dir}  eval tokens: {int(rows[REFERENCE]['tokens'])}  calibration: "
          f"{args.calib_samples} x 128  cpu threads: {os.cpu_count()}  baseline RSS after imports: "
          f"{rows[REFERENCE]['base'] / MiB:.0f} MiB (peak RSS is above it; the reference row loads the fp32 model)")
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
