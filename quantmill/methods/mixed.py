"""Mixed precision for the GPTQ-format methods (rtn, gptq): the most sensitive linears stay fp16 within a size budget.

A recipe opts in with `mixed_precision: {max_size_bytes: N}` or `{max_size_ratio: r}` (weights at most r times their
fp16 size). The quantize step measures every linear's sensitivity once per model + calibration + bits/group/sym
(quantmill/quantize/sensitivity.py, cached in the store); `plan_mixed` then keeps linears in fp16, most sensitivity per
extra byte first, while the estimated weight bytes stay within the budget. Kept linears are written as plain fp16
weights and named twice in `quantization_config`: `modules_in_block_to_quantize` (the quantized ones; what
transformers + optimum read) and `dynamic` "-:" patterns (what GPTQModel and vLLM read).

Only fp16 is offered for kept layers: transformers loads a GPTQ checkpoint with one bit width for every quantized
module (optimum 2.3 ignores GPTQModel's per-module `dynamic` bits), so an 8-bit tier would not load there.
Not offered for awq (its scale search scales the linears sharing an input together, and 4 bit is its only width),
nor for bnb-*/dynamic-int8/fp8 (fixed-width methods; `skip_modules` keeps named layers in full precision).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quantmill.methods.registry import ModelInfo

HEADER_BYTES = 112  # safetensors header entry per tensor beyond its name (dtype, shape, offsets), rounded up
FP16 = 2


class MixedPrecision(BaseModel):
    """Size budget (bytes, or a ratio of the fp16 weight size), precision of kept layers, calibration windows used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_size_bytes: int | None = Field(None, gt=0, description="Size budget in bytes (or max_size_ratio)")
    max_size_ratio: float | None = Field(None, gt=0, le=1, description="Size budget as a ratio of the fp16 weight size")
    keep_bits: int = Field(16, description="Precision of the kept linears (16: fp16, the only one offered)")
    samples: int = Field(8, ge=1, le=1024, description="Calibration windows the sensitivity is measured on")

    @field_validator("keep_bits")
    @classmethod
    def _fp16_only(cls, v: int) -> int:
        """Kept layers are fp16 (see the module docstring for why 8 is not offered)."""
        if v != 16:
            raise ValueError(f"keep_bits={v} is not supported: kept layers are stored in fp16 (keep_bits: 16), since "
                             "transformers loads GPTQ checkpoints with one bit width for all quantized modules")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> MixedPrecision:
        if (self.max_size_bytes is None) == (self.max_size_ratio is None):
            raise ValueError("give exactly one of max_size_bytes or max_size_ratio (of the fp16 weight size)")
        return self

    @property
    def budget_field(self) -> str:
        """The field that states the budget (for error messages)."""
        return "mixed_precision." + ("max_size_bytes" if self.max_size_bytes is not None else "max_size_ratio")


def gptq_linear_bytes(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Bytes of one linear in GPTQ v1 format: qweight, qzeros, fp16 scales, int32 g_idx (+ 4 header entries)."""
    groups = 1 if group_size == -1 else in_features // group_size
    return (in_features * out_features * bits // 8 + groups * out_features * bits // 8 + groups * out_features * FP16
            + in_features * 4 + 4 * HEADER_BYTES)


def tensor_costs(info: ModelInfo, bits: int, group_size: int) -> tuple[int, dict[str, int], dict[str, int]]:
    """(bytes of everything but the targeted weights, {linear: quantized bytes}, {linear: fp16 bytes}), with headers."""
    rest = sum(n * FP16 + len(name) + HEADER_BYTES for name, n in info.other_tensors.items())
    quant, fp = {}, {}
    for name, in_f in info.linear_in_features.items():
        out_f = info.linear_out_features[name]
        quant[name] = gptq_linear_bytes(in_f, out_f, bits, group_size) + 4 * (len(name) + 8)
        fp[name] = in_f * out_f * FP16 + len(name) + 7 + HEADER_BYTES
    return rest, quant, fp


@dataclass
class MixedPlan:
    """Which linears stay in fp16 and why: the budget, size estimates and the sensitivities it ranked."""

    kept: list[str]
    budget_field: str
    budget_bytes: int
    estimated_bytes: int
    all_quantized_bytes: int
    sensitivity: dict[str, float] = field(default_factory=dict)

    def quantization_config(self, quantized: list[str]) -> dict[str, Any]:
        """Fields that make loaders leave the kept linears alone (transformers/optimum, GPTQModel, vLLM)."""
        return {"modules_in_block_to_quantize": [sorted(quantized)], "dynamic": dynamic_skip(self.kept)}

    def record(self, out_dir: Path) -> dict[str, Any]:
        """What the checkpoint's metadata records (QuantizeResult.extra['mixed_precision']), with its weight bytes."""
        actual = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))
        return {"kept": self.kept, "budget_field": self.budget_field, "budget_bytes": self.budget_bytes,
                "estimated_bytes": self.estimated_bytes, "weight_bytes": actual,
                "all_quantized_bytes": self.all_quantized_bytes, "sensitivity": self.sensitivity}


def dynamic_skip(kept: list[str]) -> dict[str, dict]:
    """GPTQModel `dynamic` entries that exclude each kept module by its exact name."""
    return {f"-:^{re.escape(name)}$": {} for name in sorted(kept)}


def budget_bytes(mp: MixedPrecision, info: ModelInfo, bits: int, group_size: int) -> tuple[int, int, int]:
    """(budget, bytes with every linear quantized, bytes with every linear fp16); ValueError naming the field."""
    rest, quant, fp = tensor_costs(info, bits, group_size)
    floor, ceiling = rest + sum(quant.values()), rest + sum(fp.values())
    budget = mp.max_size_bytes if mp.max_size_bytes is not None else int(mp.max_size_ratio * ceiling)
    given = (f"{mp.max_size_bytes:,} bytes" if mp.max_size_bytes is not None
             else f"{mp.max_size_ratio} (= {budget:,} bytes)")
    if budget < floor:
        raise ValueError(f"{mp.budget_field}: {given} is below the {floor:,} bytes of the weights with every linear "
                         f"quantized to {bits} bits; raise it to at least {floor:,} bytes "
                         f"(ratio {floor / ceiling:.3f})")
    if budget >= ceiling:
        raise ValueError(f"{mp.budget_field}: {given} keeps every linear in fp16 ({ceiling:,} bytes), so nothing "
                         f"would be quantized; lower it below {ceiling:,} bytes (ratio 1.0)")
    return budget, floor, ceiling


def choose_kept(sensitivity: dict[str, float], extra_bytes: dict[str, int], room: int) -> list[str]:
    """Greedy knapsack: most sensitivity per extra byte first; a linear that does not fit is skipped, not the rest."""
    kept = []
    for name in sorted(extra_bytes, key=lambda n: (-sensitivity[n] / extra_bytes[n], n)):
        if extra_bytes[name] <= room:
            kept.append(name)
            room -= extra_bytes[name]
    return sorted(kept)


def plan_mixed(mp: MixedPrecision, info: ModelInfo, bits: int, group_size: int,
               sensitivity: dict[str, float]) -> MixedPlan:
    """The fp16-kept linears for this budget, from the measured sensitivities."""
    budget, floor, _ = budget_bytes(mp, info, bits, group_size)
    _, quant, fp = tensor_costs(info, bits, group_size)
    missing = sorted(set(quant) - set(sensitivity))
    if missing:
        raise ValueError(f"sensitivity has no value for {missing[0]} ({len(missing)} linears); it was measured on "
                         "another model")
    kept = choose_kept(sensitivity, {n: fp[n] - quant[n] for n in quant}, budget - floor)
    estimate = floor + sum(fp[n] - quant[n] for n in kept)
    return MixedPlan(kept, mp.budget_field, budget, estimate, floor, {n: sensitivity[n] for n in sorted(quant)})
