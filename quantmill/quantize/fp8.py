"""Weight-only FP8 (e4m3) with one scale per output channel, written in the compressed-tensors format vLLM serves.

On disk (`model.safetensors`): each targeted linear has `<linear>.weight` float8_e4m3fn [out, in] and
`<linear>.weight_scale` float32 [out, 1] (w ~= weight * weight_scale, scale = row absmax / 448); everything else keeps
the source dtype. `config.json` carries the compressed-tensors block that vLLM reads (`quant_method:
compressed-tensors`, `format: float-quantized`, `quantization_status: compressed`, one config group targeting
`Linear` with `weights: {num_bits: 8, type: float, strategy: channel, symmetric: true, dynamic: false}` and
`input_activations: null`, `ignore` = the exact names of the unquantized linears, e.g. ["lm_head"]).
vLLM maps this to `CompressedTensorsW8A16Fp8` (FP8 Marlin weight-only kernels on Ampere/Hopper).
Reload on CPU: `AutoModelForCausalLM.from_pretrained(out_dir)` with the `compressed-tensors` package (>= 0.15;
checked with 0.20.0 + transformers 5.23): transformers' CompressedTensorsHfQuantizer loads the fp8 weights and scales,
and compressed-tensors decompresses them to dense weights (weight.float() * weight_scale) on the first forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantmill.methods.fp8 import FP8Config
from quantmill.methods.registry import QuantizeJob, QuantizeResult
from quantmill.modelinfo import target_linears
from quantmill.quantize.common import (
    audit_quantized,
    check_fused_groups,
    copy_tokenizer,
    layer_errors,
    relative_error,
)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


class FP8Linear(nn.Linear):
    """Linear whose weight is stored as float8_e4m3fn with an fp32 [out, 1] scale; dequantizes on each forward."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight this layer multiplies with (computed in fp32, then cast)."""
        return (self.weight.float() * self.weight_scale.float()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x @ dequant(W).T + b."""
        return F.linear(x, self.dequantized(x.dtype), self.bias)


@torch.no_grad()
def quantize_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn codes [out, in], fp32 scales [out, 1]) with scale = row absmax / 448."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@torch.no_grad()
def quantize_model_fp8(model: nn.Module, keep: tuple[str, ...], device: str = "cpu") -> dict[str, float]:
    """Replace every targeted nn.Linear by an FP8Linear in place (math on `device`); return per-layer errors."""
    targets = target_linears(model, keep)
    check_fused_groups(model, targets)
    out_emb = model.get_output_embeddings()
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    for name, module in targets.items():
        if tied and module is out_emb:
            raise ValueError(f"skip_modules: {name} is tied to the input embeddings; keep it (add {name!r})")
    errors: dict[str, float] = {}
    for name, module in targets.items():
        w = module.weight.detach().to(device, torch.float32)
        q, scale = quantize_fp8_weight(w)
        errors[name] = relative_error(w, q.float() * scale)
        fp8 = FP8Linear(q.to(module.weight.device), scale.to(module.weight.device), module.bias)
        model.set_submodule(name, fp8)
    return errors


def compressed_tensors_config(ignore: list[str]) -> dict:
    """The `quantization_config` block (compressed-tensors, float-quantized, channel-wise FP8 weights only)."""
    weights = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
             "format": "float-quantized"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "sparsity_config": {}, "global_compression_ratio": None}


def is_fp8(module: nn.Module) -> bool:
    """An FP8Linear with float8_e4m3fn codes and [out, 1] scales."""
    return (isinstance(module, FP8Linear) and module.weight.dtype == FP8
            and tuple(module.weight_scale.shape) == (module.out_features, 1))


def save_fp8_checkpoint(model: nn.Module, out_dir: Path, qcfg: dict) -> None:
    """save_pretrained (safetensors) with the compressed-tensors block added to config.json."""
    model.save_pretrained(out_dir)
    cfg_path = Path(out_dir) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = qcfg
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def checkpoint_fp8_modules(out_dir: Path) -> set[str]:
    """Modules whose saved weight is float8_e4m3fn and that have a [out, 1] weight_scale beside it."""
    from safetensors import safe_open

    found: set[str] = set()
    for shard in sorted(Path(out_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            keys = set(f.keys())
            for key in keys:
                if key.endswith(".weight_scale") and key[: -len("_scale")] in keys:
                    w, s = f.get_slice(key[: -len("_scale")]), f.get_slice(key)
                    if w.get_dtype() == "F8_E4M3" and s.get_shape() == [w.get_shape()[0], 1]:
                        found.add(key[: -len(".weight_scale")])
    return found


def quantize_fp8(config: FP8Config, job: QuantizeJob) -> nn.Module:
    """Load the full-precision model (source dtype, CPU) and quantize its targeted linears (math on job.device)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype="auto").eval()
    quantize_model_fp8(model, config.skip_modules, "cuda" if job.device == "cuda" else "cpu")
    return model


def save_fp8(model: nn.Module, config: FP8Config, job: QuantizeJob) -> QuantizeResult:
    """Audit in memory, write the compressed-tensors checkpoint + tokenizer, then audit the files on disk."""
    quantized, kept = audit_quantized(model, config.skip_modules, is_fp8, "fp8")
    errors = layer_errors(job.model_dir, model, quantized, lambda m: m.dequantized())
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not is_fp8(m))
    save_fp8_checkpoint(model, job.out_dir, compressed_tensors_config(ignore))
    copy_tokenizer(job.model_dir, job.out_dir)
    missing = sorted(set(quantized) - checkpoint_fp8_modules(job.out_dir))
    if missing:
        raise RuntimeError(f"fp8: module {missing[0]} has no float8 weight + [out, 1] weight_scale in {job.out_dir}")
    extra = {"quant_method": "compressed-tensors", "format": "float-quantized", "strategy": "channel"}
    return QuantizeResult(quantized_modules=quantized, kept_modules=kept, layer_errors=errors, extra=extra)


def quantize_fp8_handler(config: FP8Config, job: QuantizeJob) -> QuantizeResult:
    """Weight-only FP8 e4m3 per channel, compressed-tensors format (vLLM on Hopper; CPU reload: compressed-tensors)."""
    job.progress(f"fp8: quantizing to float8_e4m3fn per channel on {job.device}")
    return save_fp8(quantize_fp8(config, job), config, job)
