"""bitsandbytes LLM.int8 / NF4 / FP4, quantized on load through transformers' BitsAndBytesConfig.

On disk (`model.safetensors`, `config.json` with `quantization_config.quant_method == "bitsandbytes"`):
  * bnb-int8: `<linear>.weight` int8 [out, in], `<linear>.SCB` fp32 [out] (row absmax), `<linear>.weight_format`;
    config `load_in_8bit: true`, `llm_int8_threshold`, `llm_int8_skip_modules`.
  * bnb-nf4 / bnb-fp4: `<linear>.weight` uint8 [out*in/2, 1] (two 4-bit codes per byte), `.weight.absmax`,
    `.weight.quant_map`, `.weight.nested_absmax` / `.nested_quant_map` (double quant),
    `.weight.quant_state.bitsandbytes__nf4|fp4`; config `load_in_4bit: true`, `bnb_4bit_quant_type`,
    `bnb_4bit_use_double_quant`, `bnb_4bit_compute_dtype`.
  Everything else (embeddings, norms, skip_modules such as lm_head) keeps the base model's dtype (bf16 stays bf16).
Reload: `AutoModelForCausalLM.from_pretrained(out_dir)` with bitsandbytes installed; bnb >= 0.49 runs these layers on
CPU (int8 casts activations to fp16 internally), and on CUDA with `device_map="cuda"`.

CPU repacking: on a CPU with AVX512-BF16, bitsandbytes 0.50 rewrites a 4-bit layer into its CPU kernel's layout on the
first forward pass in eval mode (`weight.data` [out, in/2], absmax transposed to bf16, `quant_state.packing_format_for_cpu`).
Its inverse, run when such a layer is saved, is lossy (bf16 absmax, re-quantized double quant) and without double
quant wrong (absmax left transposed), and `dequantize_4bit` misreads the repacked bytes. So the model quantized here
keeps the portable layout until its checkpoint is written (`hold_cpu_repacking` / `release_cpu_repacking`), and
saving or reading a layer that is repacked anyway fails instead of writing a wrong file (`require_portable_layout`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from quantmill.methods.base import FixedBitsConfig
from quantmill.methods.bnb import Bnb4bitConfig, BnbFP4Config, BnbInt8Config, BnbNF4Config
from quantmill.methods.registry import QuantizeJob, QuantizeResult
from quantmill.quantize.common import audit_quantized, base_dtype, copy_tokenizer, layer_errors, skipped_linears

if TYPE_CHECKING:  # imported where used: loading this module stays light
    from collections.abc import Callable

    from transformers import BitsAndBytesConfig


def compute_dtype(config: FixedBitsConfig, device: str) -> torch.dtype:
    """The matmul dtype: the configured one, else fp32 on CPU, bf16 (or fp16) on CUDA; int8 computes in fp16 on CUDA."""
    if isinstance(config, Bnb4bitConfig) and config.compute_dtype:
        return getattr(torch, config.compute_dtype)
    if device != "cuda":
        return torch.float32
    if isinstance(config, Bnb4bitConfig) and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def bnb_config(config: FixedBitsConfig, skip: list[str], device: str) -> BitsAndBytesConfig:
    """transformers BitsAndBytesConfig for this method; `skip` lists the exact linear names left unquantized."""
    from transformers import BitsAndBytesConfig

    if isinstance(config, BnbInt8Config):
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=config.threshold, llm_int8_skip_modules=skip)
    assert isinstance(config, Bnb4bitConfig)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.QUANT_TYPE,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(config, device),
        llm_int8_skip_modules=skip,
    )


def is_bnb_quantized(config: FixedBitsConfig) -> Callable[[nn.Module], bool]:
    """Predicate: the module is the bnb layer this method produces (and, for 4-bit, of the right quant type)."""
    import bitsandbytes as bnb

    if isinstance(config, BnbInt8Config):
        return lambda m: isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8
    quant_type = config.QUANT_TYPE

    def check(m: nn.Module) -> bool:
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        return isinstance(m, bnb.nn.Linear4bit) and state is not None and state.quant_type == quant_type

    return check


def linear_4bit(model: nn.Module) -> dict[str, nn.Module]:
    """The bitsandbytes 4-bit layers of a model, by name."""
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def hold_cpu_repacking(model: nn.Module) -> None:
    """Keep every 4-bit layer in the portable (saved) layout through forward passes: they take the plain CPU kernel."""
    for module in linear_4bit(model).values():
        module.support_avx512bf16_for_cpu = False


def release_cpu_repacking(model: nn.Module) -> None:
    """Let bitsandbytes repack the 4-bit layers for its CPU kernel again (as it does for any loaded checkpoint)."""
    from bitsandbytes.functional import has_avx512bf16

    for module in linear_4bit(model).values():
        module.support_avx512bf16_for_cpu = bool(has_avx512bf16())


def is_cpu_repacked(module: nn.Module) -> bool:
    """True when a forward pass rewrote this layer's 4-bit weight into bitsandbytes' CPU kernel layout."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def require_portable_layout(model: nn.Module) -> None:
    """Raise when a 4-bit layer is in the CPU kernel layout: neither its saved form nor its dequantization is exact."""
    repacked = sorted(name for name, m in linear_4bit(model).items() if is_cpu_repacked(m))
    if repacked:
        raise RuntimeError(
            f"bitsandbytes 4-bit layer {repacked[0] or type(model).__name__!r} ({len(repacked)} in all) was repacked for the CPU kernel "
            "by a forward pass; its weights cannot be saved or read exactly: quantize again and save before any forward "
            "pass (or call hold_cpu_repacking first)"
        )


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """Float weight a bnb layer effectively multiplies with."""
    import bitsandbytes as bnb

    w = module.weight
    if isinstance(module, bnb.nn.Linear8bitLt):
        return w.data.float() * (w.SCB.float()[:, None] / 127.0)
    require_portable_layout(module)
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()


def quantize_bnb(config: FixedBitsConfig, job: QuantizeJob) -> nn.Module:
    """Load the full-precision model through BitsAndBytesConfig: the targeted linears are quantized while loading."""
    from transformers import AutoModelForCausalLM

    skip = skipped_linears(job.model_dir, config.skip_modules)
    # CPU: load in the base dtype, so the tensors bnb does not quantize are saved as the base stores them
    dtype = base_dtype(job.model_dir) if job.device != "cuda" else compute_dtype(config, job.device)
    device_map = {"": 0} if job.device == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        job.model_dir, quantization_config=bnb_config(config, skip, job.device), dtype=dtype, device_map=device_map
    )
    hold_cpu_repacking(model)  # until save_bnb has written the checkpoint
    return model.eval()


def save_bnb(model: nn.Module, config: FixedBitsConfig, job: QuantizeJob) -> QuantizeResult:
    """Audit the quantized layers, save safetensors + config + tokenizer, report modules and per-layer errors."""
    quantized, kept = audit_quantized(model, config.skip_modules, is_bnb_quantized(config), config.TYPE)
    require_portable_layout(model)
    errors = layer_errors(job.model_dir, model, quantized, dequantized_weight)
    model.save_pretrained(job.out_dir)
    release_cpu_repacking(model)
    copy_tokenizer(job.model_dir, job.out_dir)
    qc = model.config.quantization_config
    extra = {"quant_method": "bitsandbytes", "quant_type": "int8" if qc.load_in_8bit else qc.bnb_4bit_quant_type}
    if not qc.load_in_8bit:
        extra["compute_dtype"] = str(qc.bnb_4bit_compute_dtype).removeprefix("torch.")
    return QuantizeResult(quantized_modules=quantized, kept_modules=kept, layer_errors=errors, extra=extra)


def run_bnb(config: FixedBitsConfig, job: QuantizeJob) -> QuantizeResult:
    """Quantize on load and write the checkpoint."""
    job.progress(f"{config.TYPE}: quantizing with bitsandbytes on {job.device}")
    return save_bnb(quantize_bnb(config, job), config, job)


def quantize_bnb_int8(config: BnbInt8Config, job: QuantizeJob) -> QuantizeResult:
    """bitsandbytes LLM.int8 (8-bit weights, fp16 outliers); reloads with from_pretrained on CPU or CUDA."""
    return run_bnb(config, job)


def quantize_bnb_nf4(config: BnbNF4Config, job: QuantizeJob) -> QuantizeResult:
    """bitsandbytes 4-bit NormalFloat (QLoRA format); reloads with from_pretrained on CPU or CUDA."""
    return run_bnb(config, job)


def quantize_bnb_fp4(config: BnbFP4Config, job: QuantizeJob) -> QuantizeResult:
    """bitsandbytes 4-bit float (e2m1); reloads with from_pretrained on CPU or CUDA."""
    return run_bnb(config, job)
