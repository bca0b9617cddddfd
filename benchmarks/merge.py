"""LoRA merge memory and time: quantmill's streaming and in-memory merge against peft's `merge_and_unload`.

Run: `python benchmarks/merge.py [--hidden 1024] [--layers 8] [--shard-mb 32] [--dtype bfloat16]`. Writes a random
multi-shard Llama-shaped model and a random LoRA adapter (non-zero B) into a temp folder, then runs each merge in
a fresh subprocess and prints its peak RSS (ru_maxrss and the step's own high-water delta) and wall time, beside
a baseline process that only imports the libraries, the largest shard, and quantmill.plan's estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(hidden: int, layers: int, vocab: int, dtype: str) -> dict:
    """A transformers LlamaConfig dict (head_dim 64, MLP 3× hidden, untied embeddings)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": 3 * hidden, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64, "head_dim": 64, "vocab_size": vocab, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": dtype, "torch_dtype": dtype}


def synthetic_model(out: Path, hidden: int = 512, layers: int = 4, vocab: int = 4096, dtype: str = "float32",
                    shard_mb: float = 8, seed: int = 0) -> Path:
    """Random Llama-shaped weights in several safetensors shards (+ index json, config.json)."""
    import torch
    from safetensors.torch import save_file

    from quantmill.weights import config_weights

    cfg = llama_config(hidden, layers, vocab, dtype)
    shapes = {n: s for n, (_, s) in config_weights(cfg).tensors.items()}
    for i in range(layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    gen, tdtype = torch.Generator().manual_seed(seed), getattr(torch, dtype)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = [{}]
    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=gen) * (0.02 if len(shape) == 2 else 1.0)).to(tdtype)
        if shards[-1] and (sum(x.numel() * x.element_size() for x in shards[-1].values()) + t.numel() * t.element_size()) > shard_mb * 2**20:
            shards.append({})
        shards[-1][name] = t
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def synthetic_adapter(out: Path, base: Path, r: int = 16, alpha: int = 32, targets: tuple[str, ...] = LINEARS,
                      rslora: bool = False, seed: int = 1) -> Path:
    """A random LoRA adapter (non-zero A and B) for every `targets` linear of a synthetic model."""
    import torch
    from safetensors.torch import save_file

    from quantmill.plan import folder_weights

    gen, tensors = torch.Generator().manual_seed(seed), {}
    for name, (_, shape) in folder_weights(base).tensors.items():
        if re.search(rf"\.({'|'.join(targets)})\.weight$", name):
            module = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = torch.randn(r, shape[1], generator=gen) / shape[1] ** 0.5
            tensors[f"{module}.lora_B.weight"] = torch.randn(shape[0], r, generator=gen) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
           "use_rslora": rslora, "use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_dropout": 0.0,
           "base_model_name_or_path": str(base), "modules_to_save": None}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    return out


def _hwm() -> int:
    """Peak RSS of this process since the last reset (VmHWM), in bytes."""
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def child(mode: str, base: str, adapter: str, out: str) -> dict:
    """Run one merge in this (fresh) process; the step's peak is VmHWM after a reset minus the RSS before it."""
    import ctypes
    import gc
    import resource

    import psutil
    import safetensors.torch  # noqa: F401 - loaded before the baseline, like torch
    import torch

    if mode == "peft":
        import peft  # noqa: F401 - the reference's libraries load before the baseline
        import transformers  # noqa: F401 - the reference's libraries load before the baseline
    else:
        import quantmill.tasks.merge  # noqa: F401 - the step's modules load before the baseline
        from quantmill.machine import this_machine

        this_machine()  # first-use costs (yaml, psutil, torch's thread pool) are not the merge's memory
        torch.ones(64, 64) @ torch.ones(64, 64)
    imports_only = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # what a baseline process peaks at
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    rss0, start = psutil.Process().memory_info().rss, time.perf_counter()
    if mode == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    elif mode != "baseline":
        from quantmill.merging import merge_lora
        from quantmill.profile import Merge

        merge_lora(Path(base), Path(adapter), Path(out), Merge(strategy=mode))
    seconds = time.perf_counter() - start
    return {"mode": mode, "rss0": rss0, "delta": _hwm() - rss0, "seconds": seconds, "imports_only": imports_only,
            "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_child(mode: str, base: Path, adapter: Path, out: Path) -> dict:
    """`child` in a fresh interpreter (fixed malloc mmap threshold, so freed tensors leave RSS)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(base), str(adapter), str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} merge failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Build the synthetic model and adapter, run every merge, print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--shard-mb", type=float, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--modes", default="baseline,streaming,cpu,peft")
    args = ap.parse_args()
    from quantmill.estimates import merge_memory, targeted
    from quantmill.units import human_bytes
    from quantmill.weights import folder_weights

    with tempfile.TemporaryDirectory(prefix="qm-merge-bench-") as tmp:
        base = synthetic_model(Path(tmp) / "base", args.hidden, args.layers, args.vocab, args.dtype, args.shard_mb)
        adapter = synthetic_adapter(Path(tmp) / "adapter", base)
        w = folder_weights(base)
        adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
        names = targeted(w, json.loads((adapter / "adapter_config.json").read_text()))
        print(f"model: {human_bytes(w.total)} in {len(w.shard_bytes)} shards "
              f"(largest {human_bytes(w.largest_shard)}), {args.dtype}; adapter {human_bytes(adapter_bytes)} "
              f"({len(names)} targets)")
        rows = []
        for mode in args.modes.split(","):
            r = run_child(mode, base, adapter, Path(tmp) / f"out-{mode}")
            plan = merge_memory(w, adapter_bytes, mode, names)[0] if mode in {"streaming", "cpu"} else None
            rows.append(r)
            print(f"{mode:>10}: peak RSS {human_bytes(r['maxrss']):>10}  step delta {human_bytes(r['delta']):>10}  "
                  f"plan {human_bytes(plan) if plan else '-':>10}  time {r['seconds']:6.2f} s")
        base_rss = next((r["maxrss"] for r in rows if r["mode"] == "baseline"), None)
        if base_rss:
            for r in rows:
                if r["mode"] != "baseline":
                    print(f"{r['mode']:>10}: peak over the import-only baseline {human_bytes(r['maxrss'] - base_rss)}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(*sys.argv[2:6])))
    else:
        main()
