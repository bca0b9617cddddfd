"""Round-to-nearest weight-only quantization, written as a GPTQ (v1) checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from quantmill.methods.registry import QuantizeJob, QuantizeResult
from quantmill.methods.rtn import RTNConfig
from quantmill.modelinfo import target_linears
from quantmill.quantize.common import copy_tokenizer, kept_dtype, kept_module_names, load_fp_model
from quantmill.quantize.gptq_format import (
    dequantize_weight,
    gptq_quantization_config,
    gptq_tensors,
    quantize_weight,
    require_all_quantized,
    save_gptq_checkpoint,
)


@torch.no_grad()
def rtn_quantize_model(
    model: nn.Module, config: RTNConfig, skip: tuple[str, ...] = ()
) -> dict[str, dict[str, torch.Tensor]]:
    """Quantize the targeted linears (but `skip`) in place (weights -> dequantized values); return packed tensors."""
    from quantmill.console import progress

    packed = {}
    linears = target_linears(model)
    for done, (name, lin) in enumerate(linears.items(), 1):
        progress("quantize", done, len(linears), "linears")
        if name in skip:
            continue
        codes, scales, zeros = quantize_weight(lin.weight, config.bits, config.group_size, config.sym)
        tensors = gptq_tensors(codes, scales, zeros, config.bits, lin.bias)
        packed[name] = {k: v.cpu() for k, v in tensors.items()}
        lin.weight.copy_(dequantize_weight(codes, scales, zeros).to(lin.weight.dtype))
    return packed


def quantize_rtn(config: RTNConfig, job: QuantizeJob) -> QuantizeResult:
    """Round-to-nearest weight-only baseline, saved as a GPTQ v1 checkpoint."""
    plan = config.mixed_plan(job)
    skip = tuple(plan.kept) if plan else ()
    model = load_fp_model(job.model_dir, job.device)  # fp16 on CUDA, fp32 on CPU; math is fp32 per layer
    targets = {n: m for n, m in target_linears(model).items() if n not in skip}
    kept = kept_module_names(model, targets)
    job.progress(f"rtn: quantizing {len(targets)} linears to {config.bits} bits on {job.device}")
    packed = rtn_quantize_model(model, config, skip)
    qcfg = gptq_quantization_config(config, kept) | (plan.quantization_config(list(targets)) if plan else {})
    save_gptq_checkpoint(model, packed, qcfg, job.out_dir, dtype=kept_dtype(job.model_dir))
    copy_tokenizer(job.model_dir, job.out_dir)
    quantized = require_all_quantized(list(targets), job.out_dir)
    extra = {"mixed_precision": plan.record(job.out_dir)} if plan else {}
    return QuantizeResult(quantized_modules=quantized, kept_modules=kept, extra=extra)
