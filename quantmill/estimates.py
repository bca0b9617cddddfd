"""The one size and memory estimator: what each step adds (merge, quantize, evaluate) and its checkpoint sizes (core).

Estimates come from tensor shapes and dtypes (quantmill.weights) and the per-method facts registered with each
method; `quantmill plan` and the preflight both read them through quantmill.plan.
"""

from __future__ import annotations

import math
import re
from typing import Any

from quantmill.errors import QuantmillError
from quantmill.machine import Machine, this_machine
from quantmill.methods import fact_table
from quantmill.metrics import LOGITS_BUDGET
from quantmill.safetensors_io import DTYPE_BYTES
from quantmill.units import human_bytes
from quantmill.weights import Weights

MiB = 1 << 20
RUNTIME_BYTES = 540 * MiB  # the pipeline process at its first step (python, torch, transformers, prefect, mlflow)
STEP_OVERHEAD = 8 * MiB  # a step that loads a transformers model: its Python objects, buffers, allocator slack
QUANT_OVERHEAD = 6 * MiB  # from_pretrained's own objects and buffers, measured with rtn on the demo model
MERGE_SLACK = MiB // 2  # the merge's headers, file buffers and Python objects
HEADROOM = 1.15  # a step "fits" when estimate × HEADROOM ≤ free memory

# Per-method facts (memory factors, libraries, CPU load dtype, evaluation dequantization) are registered with each
# method (quantmill/methods/<method>.py, MethodFacts); these tables are read from the registry.
METHODS: dict[str, tuple[float, int, int | None]] = fact_table("memory")
LIBRARY: dict[str, str] = fact_table("library")
LOADER: dict[str, str] = fact_table("loader_library")
# Steps' own first use (stays resident): the tokenizer stack the calibration step imports.
STEP_LIBRARY_BYTES = {"tokenizers": 160 * MiB}
EVAL_DEQUANT: dict[str, float] = fact_table("eval_dequant")
CPU_LOAD_BYTES: dict[str, int] = fact_table("cpu_load_bytes")


def library_of(method: str, loading: bool = False) -> str:
    """The library a method's quantize step (or, `loading`, its checkpoint's evaluation) imports; unknown: its name."""
    return (LOADER.get(method) if loading else None) or LIBRARY.get(method, method)


def library_bytes(lib: str) -> int:
    """First-use bytes of a library (METHODS' column, the largest among the methods using it)."""
    if lib in STEP_LIBRARY_BYTES:
        return STEP_LIBRARY_BYTES[lib]
    return max((row[1] for m, row in METHODS.items() if library_of(m) == lib), default=0)


def targeted(weights: Weights, adapter_cfg: dict[str, Any]) -> list[str]:
    """Base tensors a LoRA adapter changes: weights of its target modules and modules_to_save."""
    targets = adapter_cfg.get("target_modules") or []
    extra = adapter_cfg.get("modules_to_save") or []
    out = []
    for name in weights.tensors:
        module = name.rsplit(".", 1)[0]
        leaf = module.rsplit(".", 1)[-1]
        if isinstance(targets, str):
            hit = targets == "all-linear" and len(weights.tensors[name][1]) == 2 or bool(re.fullmatch(targets, module))
        else:
            hit = leaf in targets or "all-linear" in targets and len(weights.tensors[name][1]) == 2
        if (hit and name.endswith(".weight")) or leaf in extra:
            out.append(name)
    return out


def _merge_temp(weights: Weights, name: str) -> int:
    """fp32 temporaries of merging one tensor: a ≤ 1 Mi-element block of B@A rows (+ W's block promoted if half)."""
    dtype, shape = weights.tensors[name]
    block = min(math.prod(shape), max(shape[-1], (1 << 20) // shape[-1] * shape[-1]))
    return block * (4 + (4 if DTYPE_BYTES.get(dtype, 4) != 4 else 0))


def merge_memory(weights: Weights, adapter_bytes: int, strategy: str, targets: list[str] | None = None) -> tuple[int, int]:
    """(RAM, VRAM) a merge adds: streaming holds one tensor, cpu/gpu hold the whole model, plus the adapter."""
    names = targets if targets is not None else [n for n in weights.tensors if len(weights.tensors[n][1]) == 2]
    temp = max((_merge_temp(weights, n) + weights.nbytes(n) * (strategy == "streaming") for n in names), default=0)
    base = adapter_bytes + MERGE_SLACK  # untouched tensors are copied in the kernel (copy_file_range): no buffer
    if strategy == "streaming":
        return base + temp, 0
    if strategy == "gpu":
        return base + max(weights.nbytes(n) for n in weights.tensors), weights.total + adapter_bytes + temp
    return base + weights.total + temp, 0


def choose_merge_strategy(weights: Weights, adapter_bytes: int, requested: str = "auto",
                          machine: Machine | None = None) -> tuple[str, str]:
    """(strategy, why): gpu when free VRAM covers the model, cpu when RAM does, else streaming; or as requested."""
    m = machine or this_machine()
    if requested == "gpu" and not m.cuda:
        raise QuantmillError("merge.strategy: gpu needs a CUDA device and none is visible; use auto, cpu or streaming")
    if requested != "auto":
        return requested, f"merge.strategy={requested} in the profile"
    gpu_vram = merge_memory(weights, adapter_bytes, "gpu")[1]
    cpu_ram = merge_memory(weights, adapter_bytes, "cpu")[0]
    if m.cuda and gpu_vram * HEADROOM <= m.vram:
        return "gpu", f"free VRAM {human_bytes(m.vram)} covers {human_bytes(gpu_vram)}"
    if cpu_ram * HEADROOM <= m.ram:
        return "cpu", f"available RAM {human_bytes(m.ram)} covers {human_bytes(cpu_ram)}"
    return "streaming", f"the model ({human_bytes(cpu_ram)}) does not fit in {human_bytes(m.ram)} RAM; one shard at a time"


def checkpoint_bytes(weights: Weights, method: str, bits: int, group_size: int | None, device: str) -> int:
    """Expected size of a quantized checkpoint: packed linears, their scales, kept tensors (base or half dtype)."""
    quant, keep = weights.linear_params()
    kept = METHODS.get(method, (1.0, 0, 0))[2]
    half = weights.itemsize if weights.itemsize == 2 else 2
    kept = half if kept is None or (device == "cuda" and kept == 0) else kept or weights.itemsize
    scales = quant / group_size * (2 + bits / 8) if group_size else 0
    return int(quant * bits / 8 + scales + keep * kept)


def load_bytes(weights: Weights, method: str, device: str) -> int:
    """Bytes of the full-precision model as a quantizer loads it (CPU: CPU_LOAD_BYTES or the base dtype; CUDA fp16)."""
    if method == "fp8" or device != "cuda":
        return weights.params * (CPU_LOAD_BYTES.get(method, weights.itemsize) if device != "cuda" else weights.itemsize)
    return weights.params * 2


def activation_bytes(weights: Weights, num_samples: int, seq_len: int) -> int:
    """Calibration activations cached per layer (inputs and outputs, fp32) plus one layer's Hessians."""
    h = int(weights.config.get("hidden_size") or 0)
    inter = int(weights.config.get("intermediate_size") or 4 * h)
    return 2 * num_samples * seq_len * h * 4 + (6 * h * h + inter * inter) * 4


def quantize_memory(weights: Weights, method: str, bits: int, group_size: int | None, device: str,
                    calib: tuple[int, int] | None) -> tuple[int, int, int]:
    """(RAM, VRAM, checkpoint bytes) of one recipe on `device` (its library's import is in the row's baseline)."""
    factor = METHODS.get(method, (1.0, 0, None))[0]
    ckpt = checkpoint_bytes(weights, method, bits, group_size, device)
    act = activation_bytes(weights, *calib) if calib else 0
    model = load_bytes(weights, method, device)
    if device == "cuda":
        return QUANT_OVERHEAD + weights.largest_shard + int(factor * ckpt), model + ckpt + act, ckpt
    return QUANT_OVERHEAD + model + int(factor * ckpt) + act, 0, ckpt


def evaluate_memory(model_bytes: int, vocab: int, window: int, batch: int, topk: int) -> int:
    """Scoring one model: its weights plus fp32 logits, their log-softmax and the saved top-k (baseline)."""
    batch = max(1, min(batch, LOGITS_BUDGET // max(1, window * vocab)))
    return STEP_OVERHEAD + model_bytes + 3 * batch * window * vocab * 4 + batch * window * topk * 8
