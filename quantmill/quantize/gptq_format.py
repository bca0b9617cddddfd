"""The GPTQ (v1) checkpoint format: round-to-nearest group quantization, int32 bit packing, the checkpoint's
tensors and quantization_config, and the audits of a written checkpoint (shared by rtn, gptq, awq, autoround)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantmill.methods.base import GPTQFamilyConfig
from quantmill.quantize.common import write_checkpoint

_MIN_SCALE = 1e-6  # representable in fp16 (subnormal); guards all-zero groups


def _round_up_fp16(s: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 scales up to the next fp16 value (so the stored scale still covers the range)."""
    h = s.clamp_min(_MIN_SCALE).to(torch.float16)
    h = torch.where(h.float() < s, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN-quantize w [out, in] -> (codes int32 [out, in], scales fp32 (fp16-exact) [out, G], zeros int32 [out, G])."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_f}")
    maxq = 2**bits - 1
    wg = w.detach().float().reshape(out_f, in_f // gs, gs)
    xmin = wg.amin(-1).clamp(max=0)
    xmax = wg.amax(-1).clamp(min=0)
    if sym:
        amax = torch.maximum(-xmin, xmax)
        scales = _round_up_fp16(2 * amax / maxq)
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    else:
        scales = _round_up_fp16((xmax - xmin) / maxq)
        zeros = torch.round(-xmin / scales)
        # GPTQ v1 checkpoints store zero-1, so a zero of 0 cannot be represented: refit those groups
        # with zero=1 (the range [0, xmax] then uses maxq-1 steps above the zero).
        low = zeros < 1
        scales = torch.where(low, _round_up_fp16(xmax / (maxq - 1)), scales)
        zeros = torch.where(low, torch.ones_like(zeros), zeros)
    codes = torch.clamp(torch.round(wg / scales[..., None]) + zeros[..., None], 0, maxq)
    return codes.reshape(out_f, in_f).to(torch.int32), scales, zeros.to(torch.int32)


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_weight: scales * (codes - zeros), fp32 [out, in]."""
    out_f, in_f = codes.shape
    g = scales.shape[1]
    wg = codes.reshape(out_f, g, in_f // g).float() - zeros[..., None].float()
    return (wg * scales[..., None]).reshape(out_f, in_f)


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned codes along `dim` into int32 words as one LSB-first bitstream (GPTQ order, incl. 3-bit)."""
    x = codes.movedim(dim, -1).to(torch.int64)
    n = x.shape[-1]
    if n % 32:
        raise ValueError(f"cannot pack {n} {bits}-bit values: length must be a multiple of 32")
    x = x.reshape(*x.shape[:-1], n // 32, 32)
    words = torch.zeros(*x.shape[:-1], bits, dtype=torch.int64, device=x.device)
    for j in range(32):
        w0, off = divmod(j * bits, 32)
        words[..., w0] |= (x[..., j] << off) & 0xFFFFFFFF
        if off + bits > 32:  # value straddles two words (3-bit)
            words[..., w0 + 1] |= x[..., j] >> (32 - off)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(*x.shape[:-2], (n // 32) * bits).movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of pack_int32: int32 words along `dim` -> int32 codes."""
    x = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    x = x.reshape(*x.shape[:-1], x.shape[-1] // bits, bits)
    vals = []
    for j in range(32):
        w0, off = divmod(j * bits, 32)
        v = x[..., w0] >> off
        if off + bits > 32:
            v = v | (x[..., w0 + 1] << (32 - off))
        vals.append(v & (2**bits - 1))
    out = torch.stack(vals, -1).reshape(*x.shape[:-2], -1)
    return out.to(torch.int32).movedim(-1, dim).contiguous()


# Packing is hand-written (not gptqmodel's PackableQuantLinear.pack_block) because pack_block re-derives the
# codes from float weights and packs v2 zero-points that then need gptqmodel's in-place v2->v1 borrow
# arithmetic; the pure bitstream above is exact, dtype-agnostic and the tests check it bit-for-bit
# against pack_block for 2/3/4/8 bits.
def gptq_tensors(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, bias: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """GPTQ v1 checkpoint tensors of one linear (qweight, qzeros = zero-1, scales fp16, g_idx, bias)."""
    out_f, in_f = codes.shape
    if out_f % 32:
        raise ValueError(f"out_features={out_f} is not a multiple of 32, which qzeros packing needs")
    g = scales.shape[1]
    tensors = {
        "qweight": pack_int32(codes.t(), bits, dim=0),
        "qzeros": pack_int32((zeros - 1).t(), bits, dim=1),
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": (torch.arange(in_f, device=codes.device) // (in_f // g)).to(torch.int32),
    }
    if bias is not None:
        tensors["bias"] = bias.detach().to(torch.float16)
    return tensors


def checkpoint_quantized(out_dir: Path) -> set[str]:
    """Module names that carry a packed `qweight` in a saved checkpoint."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            names.update(k[: -len(".qweight")] for k in f.keys() if k.endswith(".qweight"))
    return names


def require_all_quantized(targets: list[str], out_dir: Path) -> list[str]:
    """Raise naming the first targeted linear without a qweight in the checkpoint; return the sorted targets."""
    present = checkpoint_quantized(out_dir)
    for name in sorted(targets):
        if name not in present:
            raise RuntimeError(f"module {name} was not quantized (no {name}.qweight in {out_dir})")
    return sorted(targets)


def v1_zero_underflows(out_dir: Path, bits: int) -> list[str]:
    """Modules whose v1 qzeros hold an all-ones field: a zero-point of 0 that zero-1 storage cannot represent."""
    from safetensors import safe_open

    bad = []
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key.endswith(".qzeros") and (unpack_int32(f.get_tensor(key), bits, 1) == 2**bits - 1).any():
                    bad.append(key[: -len(".qzeros")])
    return sorted(bad)


def gptq_quantization_config(config: GPTQFamilyConfig, kept: list[str]) -> dict:
    """The `quantization_config` transformers/optimum/gptqmodel and vLLM read for a GPTQ v1 checkpoint."""
    return {"quant_method": "gptq", "bits": config.bits, "group_size": config.group_size, "desc_act": False,
            "sym": config.sym, "checkpoint_format": "gptq", "pack_dtype": "int32", "lm_head": False,
            "modules_to_not_convert": kept}


def save_gptq_checkpoint(model: nn.Module, packed: dict[str, dict[str, torch.Tensor]], qcfg: dict, out_dir: Path,
                         dtype: torch.dtype = torch.float16) -> None:
    """Write model.safetensors (packed linears + the rest in `dtype`) and config.json with quantization_config."""

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module not in packed:
            state[key] = value.detach().to("cpu", dtype if value.is_floating_point() else value.dtype).contiguous()
    for name, tensors in packed.items():
        state.update({f"{name}.{k}": v.contiguous() for k, v in tensors.items()})
    write_checkpoint(model, state, qcfg, out_dir, dtype)
