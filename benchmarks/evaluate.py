"""Evaluation throughput: quantmill's `evaluate` against a plain transformers loop on the same windows.

Run: `python benchmarks/evaluate.py [--max-tokens N] [--window W] [--threads T] [--repeats R]`. Builds (or reuses)
the demo Llama in $QUANTMILL_TEST_MODELS or .quantmill/test-models, and works in a throw-away state folder.
Both sides load the model from disk and score every window; quantmill additionally computes log-softmax once,
samples peak RSS and saves the baseline's top-k reference (baseline run) or reads it for KL/agreement (variant run).
Generation-speed measurement is disabled here: it is a separate, fixed cost.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def plain_loop(model_dir: Path, windows, batch_size: int) -> tuple[float, int]:
    """Perplexity with transformers' own loss, batch by batch; returns (perplexity, tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            batch = windows[i : i + batch_size]
            n = batch.shape[0] * (batch.shape[1] - 1)
            nll += float(model(input_ids=batch, labels=batch).loss) * n
            count += n
    return math.exp(nll / count), count


def interleaved(repeats: int, **fns) -> dict:
    """Run every fn once per round, alternating, and keep each one's fastest time and last result."""
    best = {name: (float("inf"), None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            best[name] = (min(best[name][0], time.perf_counter() - start), result)
    return best


def main() -> int:
    """Print tokens/s of quantmill's evaluate and of a plain loop, and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="quantmill-bench-"))
    os.environ["QUANTMILL_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from quantmill import state

    state.configure_environment()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from quantmill.context import StepContext
    from quantmill.demo import build_demo_assets
    from quantmill.profile import Evaluation
    from quantmill.refs import CheckpointRef, ModelRef
    from quantmill.tasks.evaluate import eval_data, evaluate
    from quantmill.windows import load_windows

    cache = Path(os.environ.get("QUANTMILL_TEST_MODELS") or REPO / ".quantmill" / "test-models")
    assets = build_demo_assets(cache, arch="llama", with_adapter=False)
    model = ModelRef(path=str(assets.model_dir), sha256="bench", source="demo",
                     summary={"max_position_embeddings": 512})
    spec = Evaluation(source={"path": str(assets.eval_path)}, max_tokens=args.max_tokens, window=args.window,
                      speed=None)
    data = eval_data.fn(model, spec, ctx=StepContext(store_root=str(home / "store")))
    windows, _ = load_windows(data.path)
    stores: list[str] = []

    def quantmill_baseline():
        stores.append(str(home / f"store-{len(stores)}"))  # a fresh store: scores instead of hitting the cache
        return evaluate.fn(model, data, ctx=StepContext(store_root=stores[-1]), spec=spec)

    base = quantmill_baseline()
    store = stores[-1]
    as_variant = CheckpointRef(name="same", method="rtn", config={}, path=model.path, sha256="same", size_bytes=1,
                               base_sha256="bench", calib_digest=None, store_key="same")

    def quantmill_variant():
        key = evaluate.fn(as_variant, data, ctx=StepContext(store_root=store), baseline=base, spec=spec).store_key
        shutil.rmtree(Path(store) / "objects" / key)  # next round scores again instead of hitting the store
        return key

    times = interleaved(args.repeats, baseline=quantmill_baseline, variant=quantmill_variant,
                        plain=lambda: plain_loop(assets.model_dir, windows, spec.batch_size))
    (seconds_q, _), (seconds_v, _), (seconds_p, (ppl, tokens)) = times["baseline"], times["variant"], times["plain"]
    scored = base.metrics["eval_tokens"]
    shape = f"{windows.shape[0]} x {windows.shape[1]}"
    print(f"model: {assets.model_dir}  windows: {shape}  threads: {torch.get_num_threads()}")
    print(f"perplexity: quantmill {base.metrics['perplexity']:.4f}  plain {ppl:.4f}  "
          f"(rel. diff {abs(base.metrics['perplexity'] / ppl - 1):.2e})")
    print(f"quantmill evaluate (baseline, saves top-k):  {scored / seconds_q:10.1f} tokens/s  ({seconds_q:.2f} s)")
    print(f"quantmill evaluate (variant, KL+agreement):  {scored / seconds_v:10.1f} tokens/s  ({seconds_v:.2f} s)")
    print(f"plain transformers loop:                     {tokens / seconds_p:10.1f} tokens/s  ({seconds_p:.2f} s)")
    print(f"ratio quantmill/plain: baseline {seconds_p / seconds_q * scored / tokens:.2f}  "
          f"variant {seconds_p / seconds_v * scored / tokens:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
