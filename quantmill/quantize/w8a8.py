"""W8A8 int8 with SmoothQuant smoothing, written in the compressed-tensors format vLLM serves.

Smoothing (SmoothQuant, Xiao et al. 2023): per input channel j of the linears fed by one norm (or linear),
s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha) from calibration activations; the linears' columns are multiplied by
s and the preceding norm's weight (or linear's output rows) divided by it, so the fp model is unchanged while the
activation outliers move into the weights. Only where a preceding module can absorb 1/s (SMOOTH_MAPS, per
architecture). Then int8 weights per output channel (RTN, or GPTQ through GPTQModel on the smoothed model) and int8
activations: static per tensor (scale = calibrated absmax / 127) or dynamic per token.

On disk (`model.safetensors`): each targeted linear has `<linear>.weight` int8 [out, in], `<linear>.weight_scale`
[out, 1] and, for static activations, `<linear>.input_scale` [1] (scales in the model dtype; symmetric, so no zero
points); norms carry the smoothed weights. `config.json` carries `quant_method: compressed-tensors`,
`format: int-quantized`, `quantization_status: compressed`, one group targeting `Linear` with `weights: {num_bits: 8,
type: int, strategy: channel, symmetric: true, dynamic: false}` and `input_activations: {num_bits: 8, type: int,
strategy: tensor, symmetric: true, dynamic: false}` (dynamic: `strategy: token, dynamic: true`), `ignore` = the
unquantized linears: what vLLM maps to CompressedTensorsW8A8Int8. CPU reload: `from_pretrained(out_dir)` with
compressed-tensors (0.20): weights are decompressed (int8 * scale) and every targeted linear's forward
quantize-dequantizes its input with input_scale (static) or per-token scales (dynamic).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from quantmill.methods.registry import QuantizeJob, QuantizeResult
from quantmill.methods.w8a8 import SMOOTH_MAPS, W8A8Int8Config
from quantmill.modelinfo import target_linears
from quantmill.quantize.common import (
    base_dtype,
    check_fused_groups,
    copy_tokenizer,
    kept_module_names,
    load_fp_model,
    relative_error,
    write_checkpoint,
)
from quantmill.quantize.gptq_format import unpack_int32
from quantmill.quantize.gptqmodel_backend import gptqmodel_device, load_calibration, run_gptqmodel

INT8_MAX = 127.0


@torch.no_grad()
def activation_absmax(
    model: nn.Module, names: list[str], rows: torch.Tensor | list[torch.Tensor], batch: int = 4
) -> dict[str, torch.Tensor]:
    """Per input channel max |x| of each named linear over the calibration rows (fp32); equal-length rows batched."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str):  # noqa: ANN202
        def record(_mod, args):  # noqa: ANN001, ANN202
            x = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(0)
            stats[name] = torch.maximum(stats[name], x) if name in stats else x
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        device = next(model.parameters()).device
        by_length: dict[int, list[torch.Tensor]] = {}
        for row in rows:
            by_length.setdefault(row.shape[-1], []).append(row)
        for same in by_length.values():
            for chunk in torch.stack(same).split(batch):
                model(input_ids=chunk.to(device))
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def smooth(model: nn.Module, arch: str, stats: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Apply SmoothQuant in place; return the smoothed per-channel input absmax of every balanced linear."""
    container, maps = SMOOTH_MAPS[arch]
    smoothed: dict[str, torch.Tensor] = {}
    for i, _layer in enumerate(model.get_submodule(container)):
        for m in maps:
            prev = model.get_submodule(f"{container}.{i}.{m.prev}")
            names = [f"{container}.{i}.{b}" for b in m.balance]
            linears = [model.get_submodule(n) for n in names]
            act = stats[names[0]]
            w_max = torch.stack([lin.weight.abs().float().amax(0) for lin in linears]).amax(0)
            s = (act.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)
            absorb(prev, s)
            for name, lin in zip(names, linears):
                lin.weight.mul_(s.to(lin.weight.dtype))
                smoothed[name] = act / s
    return smoothed


def absorb(prev: nn.Module, s: torch.Tensor) -> None:
    """Divide the preceding module's output channels by s: a norm's weight, or a linear's rows (and bias)."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None].to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    elif getattr(prev, "weight", None) is not None and prev.weight.shape == s.shape:
        prev.weight.div_(s.to(prev.weight.dtype))
    else:
        raise ValueError(f"cannot absorb smoothing factors into {type(prev).__name__} (no per-channel weight)")


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 [out, in], fp32 scale [out, 1]) with scale = row absmax / 127."""
    w = w.detach().float()
    scale = (w.abs().amax(1, keepdim=True) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def gptq_int8(model: nn.Module, job: QuantizeJob, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ (GPTQModel, 8-bit sym per channel) on the smoothed fp model: {linear: (int8 weight, fp32 [out, 1])}."""
    from dataclasses import replace

    from gptqmodel import QuantizeConfig
    from safetensors import safe_open

    with tempfile.TemporaryDirectory(prefix="w8a8-gptq-") as tmp:
        smoothed_dir, gptq_dir = Path(tmp) / "smoothed", Path(tmp) / "gptq"
        model.save_pretrained(smoothed_dir)
        copy_tokenizer(job.model_dir, smoothed_dir)
        qcfg = QuantizeConfig(bits=8, group_size=-1, sym=True, desc_act=False, act_group_aware=False, format="gptq",
                              device=gptqmodel_device(job.device))
        run_gptqmodel(replace(job, model_dir=smoothed_dir, out_dir=gptq_dir), qcfg, "gptq_torch", 1)
        out = {}
        for shard in sorted(gptq_dir.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                for name in (n for n in names if f"{n}.qweight" in f.keys()):
                    codes = unpack_int32(f.get_tensor(f"{name}.qweight"), 8, 0).t()  # [out, in]
                    zeros = unpack_int32(f.get_tensor(f"{name}.qzeros"), 8, 1)[0] + 1  # v1 stores zero-1
                    scale = f.get_tensor(f"{name}.scales").float()[0][:, None]
                    out[name] = ((codes - zeros[:, None]).clamp(-128, 127).to(torch.int8), scale)
    missing = sorted(set(names) - set(out))
    if missing:
        raise RuntimeError(f"w8a8-int8: GPTQModel did not quantize {missing[0]}")
    return out


def compressed_tensors_config(activations: str, ignore: list[str]) -> dict:
    """The `quantization_config` vLLM maps to CompressedTensorsW8A8Int8 (static per-tensor or dynamic per-token)."""
    def args(strategy: str, dynamic: bool) -> dict:
        return {"num_bits": 8, "type": "int", "strategy": strategy, "symmetric": True, "dynamic": dynamic,
                "group_size": None, "block_structure": None, "actorder": None,
                "observer": None if dynamic else "minmax"}

    inputs = args("token", True) if activations == "dynamic" else args("tensor", False)
    group = {"targets": ["Linear"], "weights": args("channel", False), "input_activations": inputs,
             "output_activations": None, "format": "int-quantized"}
    return {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "sparsity_config": {}, "global_compression_ratio": None}


def save_checkpoint(model: nn.Module, quantized: dict[str, dict[str, torch.Tensor]], qcfg: dict, out_dir: Path,
                    dtype: torch.dtype | None = None) -> None:
    """model.safetensors (int8 linears + scales, the rest in `dtype`, default the model's) and config.json."""

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.dtype
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items() if k.removesuffix(".weight") not in quantized}
    for name, tensors in quantized.items():
        state.update({f"{name}.{k}": v.contiguous() for k, v in tensors.items()})
    write_checkpoint(model, state, qcfg, out_dir, dtype)


def calibration_rows(job: QuantizeJob) -> list[torch.Tensor]:
    """The calibration input_ids the step tokenized, one 1-D row per sample (samples may differ in length)."""
    return [r["input_ids"] for r in load_calibration(job.calibration)]


def quantize_w8a8(config: W8A8Int8Config, job: QuantizeJob) -> QuantizeResult:
    """W8A8 int8 (SmoothQuant + per-channel int8 weights + static/dynamic int8 activations), compressed-tensors."""
    model = load_fp_model(job.model_dir, job.device)  # fp16 on CUDA, fp32 on CPU; statistics in fp32
    arch = (model.config.architectures or [type(model).__name__])[0]
    targets = target_linears(model, config.skip_modules)
    check_fused_groups(model, targets)
    out_emb = model.get_output_embeddings()
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False) and out_emb in targets.values():
        raise ValueError("skip_modules: lm_head is tied to the input embeddings; keep it (add 'lm_head')")
    rows = calibration_rows(job)
    job.progress(f"w8a8-int8: activation statistics on {len(rows)} calibration samples "
                 f"({sum(r.numel() for r in rows)} tokens)")
    stats = activation_absmax(model, sorted(targets), rows)
    if config.smoothing_alpha is not None:
        stats |= smooth(model, arch, stats, config.smoothing_alpha)
    names = sorted(targets)
    originals = {n: targets[n].weight.detach().float().clone() for n in names}
    if config.weights == "gptq":
        q = gptq_int8(model, job, names)
    else:
        q = {n: quantize_int8_rows(targets[n].weight) for n in names}
    dtype = base_dtype(job.model_dir) if job.device != "cuda" else model.dtype  # CPU: stats in fp32, saved as the base
    packed, errors = {}, {}
    for n in names:
        w8, scale = q[n]
        packed[n] = {"weight": w8.cpu(), "weight_scale": scale.to(dtype).cpu()}
        if config.activations == "static":
            packed[n]["input_scale"] = (stats[n].max() / INT8_MAX).clamp_min(1e-8).reshape(1).to(dtype).cpu()
        errors[n] = relative_error(originals[n], w8.float() * scale)
    kept = kept_module_names(model, targets)
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in targets)
    save_checkpoint(model, packed, compressed_tensors_config(config.activations, ignore), job.out_dir, dtype=dtype)
    copy_tokenizer(job.model_dir, job.out_dir)
    job.progress(f"w8a8-int8: {len(names)} linears int8 ({config.weights}), activations {config.activations}, "
                 f"smoothing alpha={config.smoothing_alpha}")
    extra = {"quant_method": "compressed-tensors", "format": "int-quantized", "activations": config.activations,
             "smoothing_alpha": config.smoothing_alpha, "weights": config.weights}
    return QuantizeResult(quantized_modules=names, kept_modules=kept, layer_errors=errors, extra=extra)
