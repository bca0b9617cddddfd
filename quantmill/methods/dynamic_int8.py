"""Method config: dynamic-int8 (torchao)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from quantmill.methods.base import FixedBitsConfig
from quantmill.methods.registry import MethodFacts, MiB, register_config


class DynamicInt8Config(FixedBitsConfig):
    """int8 weights (scale per output row or per tensor); int8 activations with per-token scales at run time."""

    BITS_HINT: ClassVar[str] = "for 4-bit weights use bnb-nf4, rtn or gptq"
    granularity: Literal["per_row", "per_tensor"] = Field(
        "per_row", description="Weight scales: one per output row, or one per tensor")
    activation_mapping: Literal["symmetric", "asymmetric"] = Field(
        "symmetric", description="Activation quantization: symmetric, or asymmetric with a zero-point")

    def default_max_ppl_increase_pct(self) -> float:
        """W8A8 should be nearly lossless: 2%."""
        return 2.0


register_config(
    "dynamic-int8",
    DynamicInt8Config,
    handler="quantmill.quantize.dynamic_int8:quantize_dynamic_int8_handler",
    calibrated=False,
    aliases=("dynamic",),
    summary="torchao int8 weights + dynamic per-token int8 activations; reloads with from_pretrained (torchao installed).",
    facts=MethodFacts(memory=(0.5, 4 * MiB, 0), library="torchao", loader=(None, "pip install torchao"),
                      requirements=("torchao",)),
)
