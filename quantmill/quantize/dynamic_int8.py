"""Dynamic int8 (W8A8-dynamic): int8 weights, activations quantized per token at run time, via torchao.

torchao's `Int8DynamicActivationInt8WeightConfig` (v2, the maintained heir of `torch.ao.quantization.quantize_dynamic`)
is applied through transformers' `TorchAoConfig` while loading, so every targeted nn.Linear's weight becomes a torchao
`Int8Tensor` (int8 data, fp32 scale per row or per tensor, activation-quantization kwargs attached).

On disk: `model.safetensors` via torchao's safetensors support (`torchao.prototype.safetensors`, used by transformers'
`TorchAoHfQuantizer.get_state_dict_and_metadata`): each tensor subclass is flattened into plain tensors
`<linear>._weight_qdata` (int8 [out, in]), `<linear>._weight_scale` (fp32 [out, 1]) and `<linear>._weight_zero_point`,
and the safetensors header metadata holds, per original parameter name, a JSON description (`_type: Int8Tensor`,
block size, activation granularity/mapping). `config.json` carries `quantization_config.quant_method == "torchao"`
with the serialized torchao config. Non-targeted modules (embeddings, norms, lm_head) stay fp32 (bf16 on CUDA).
Reload: `AutoModelForCausalLM.from_pretrained(out_dir)` with torchao >= 0.15 installed (checked with torchao 0.18 +
transformers 5.23 on CPU): transformers reads the metadata and rebuilds the Int8Tensor weights (`TorchAoDeserialize`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from quantmill.methods.dynamic_int8 import DynamicInt8Config
from quantmill.methods.registry import QuantizeJob, QuantizeResult
from quantmill.quantize.common import audit_quantized, base_dtype, copy_tokenizer, layer_errors, skipped_linears

if TYPE_CHECKING:  # imported where used: loading this module stays light
    from transformers import TorchAoConfig


def torchao_config(config: DynamicInt8Config, skip: list[str]) -> TorchAoConfig:
    """transformers TorchAoConfig wrapping torchao's Int8DynamicActivationInt8WeightConfig; `skip` = exact names."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        MappingType,
        PerRow,
        PerTensor,
    )
    from transformers import TorchAoConfig

    ao = Int8DynamicActivationInt8WeightConfig(
        granularity=PerRow() if config.granularity == "per_row" else PerTensor(),
        act_mapping_type=MappingType[config.activation_mapping.upper()],
        set_inductor_config=False,  # do not mutate global torch._inductor settings from a pipeline step
    )
    return TorchAoConfig(quant_type=ao, modules_to_not_convert=skip)


def is_int8_dynamic(module: nn.Module) -> bool:
    """The module's weight is a torchao Int8Tensor with int8 data and run-time activation quantization."""
    from torchao.quantization import Int8Tensor

    w = getattr(module, "weight", None)
    return isinstance(w, Int8Tensor) and w.qdata.dtype == torch.int8 and w.act_quant_kwargs is not None


def quantize_dynamic_int8(config: DynamicInt8Config, job: QuantizeJob) -> nn.Module:
    """Load the full-precision model with TorchAoConfig: the targeted linears are quantized while loading."""
    from transformers import AutoModelForCausalLM

    skip = skipped_linears(job.model_dir, config.skip_modules)
    on_cuda = job.device == "cuda"
    cuda_dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16
    dtype = cuda_dtype if on_cuda else base_dtype(job.model_dir)  # CPU: unquantized tensors keep the base dtype
    model = AutoModelForCausalLM.from_pretrained(
        job.model_dir, quantization_config=torchao_config(config, skip), dtype=dtype,
        device_map={"": 0} if on_cuda else {"": "cpu"},
    )
    return model.eval()


def save_dynamic_int8(model: nn.Module, config: DynamicInt8Config, job: QuantizeJob) -> QuantizeResult:
    """Audit, save safetensors (torchao flattening) + config + tokenizer, report modules and per-layer weight errors."""
    quantized, kept = audit_quantized(model, config.skip_modules, is_int8_dynamic, "dynamic-int8")
    errors = layer_errors(job.model_dir, model, quantized, lambda m: m.weight.dequantize())
    model.save_pretrained(job.out_dir)
    copy_tokenizer(job.model_dir, job.out_dir)
    extra = {"quant_method": "torchao", "quant_type": "Int8DynamicActivationInt8WeightConfig",
             "granularity": config.granularity, "activation_mapping": config.activation_mapping}
    return QuantizeResult(quantized_modules=quantized, kept_modules=kept, layer_errors=errors, extra=extra)


def quantize_dynamic_int8_handler(config: DynamicInt8Config, job: QuantizeJob) -> QuantizeResult:
    """torchao int8 weights + dynamic per-token int8 activations; reloads with from_pretrained (torchao installed)."""
    job.progress(f"dynamic-int8: quantizing with torchao on {job.device}")
    return save_dynamic_int8(quantize_dynamic_int8(config, job), config, job)
