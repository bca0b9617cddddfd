"""Method config: fp8 (weight-only FP8, compressed-tensors format)."""

from __future__ import annotations

from typing import ClassVar

from quantmill.methods.base import FixedBitsConfig
from quantmill.methods.registry import MethodFacts, register_config


class FP8Config(FixedBitsConfig):
    """Weight-only FP8 e4m3, per-output-channel scales, no calibration; activations stay in the model dtype."""

    BITS_HINT: ClassVar[str] = "for int8 use bnb-int8 or dynamic-int8, for 4-bit bnb-nf4, rtn or gptq"

    def default_max_ppl_increase_pct(self) -> float:
        """FP8 per-channel should be almost lossless: 1%."""
        return 1.0


register_config(
    "fp8",
    FP8Config,
    handler="quantmill.quantize.fp8:quantize_fp8_handler",
    calibrated=False,
    summary="Weight-only FP8 e4m3 per channel, compressed-tensors format (vLLM on Hopper; CPU reload: compressed-tensors).",
    facts=MethodFacts(memory=(0.5, 0, 0), library="", loader=("compressed-tensors", "pip install compressed-tensors"),
                      requirements=("compressed-tensors",)),
)
