"""Method configs: bnb-int8, bnb-nf4, bnb-fp4 (bitsandbytes)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from quantmill.methods.base import FixedBitsConfig
from quantmill.methods.registry import MethodFacts, MiB, register_config

ComputeDtype = Literal["float32", "bfloat16", "float16"]


class BnbInt8Config(FixedBitsConfig):
    """LLM.int8(): int8 weights with row scales; activation columns above `threshold` run in fp16."""

    FIXED_BITS: ClassVar[int] = 8
    BITS_HINT: ClassVar[str] = "for 4-bit use bnb-nf4 or bnb-fp4"
    bits: int = Field(8, description="Bits per weight, fixed by the method")
    threshold: float = Field(6.0, description="Outlier threshold: activation columns above it run in fp16; 0: none")

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float) -> float:
        """Outlier threshold: 0 disables the mixed-precision decomposition; negative makes no sense."""
        if v < 0:
            raise ValueError(f"threshold={v} must be >= 0 (6.0 is the LLM.int8 default, 0 disables outliers)")
        return v

    def default_max_ppl_increase_pct(self) -> float:
        """int8 should be nearly lossless: 2%."""
        return 2.0


class Bnb4bitConfig(FixedBitsConfig):
    """4-bit bitsandbytes (blocks of 64 with absmax scales); the quant type is fixed by the method."""

    FIXED_BITS: ClassVar[int] = 4
    BITS_HINT: ClassVar[str] = "for 8-bit use bnb-int8; for 2/3-bit use rtn or gptq"
    QUANT_TYPE: ClassVar[str] = "nf4"
    bits: int = Field(4, description="Bits per weight, fixed by the method")
    double_quant: bool = Field(True, description="Quantize the absmax scales too (about 0.4 bits per weight less)")
    compute_dtype: ComputeDtype | None = Field(
        None, description="Matmul dtype (default: float32 on CPU, bfloat16 or float16 on CUDA)")

    def default_max_ppl_increase_pct(self) -> float:
        """4-bit round-to-nearest: 5%."""
        return 5.0

    def check_device(self, device: str) -> None:
        """compute_dtype=bfloat16 needs a GPU with bf16 support (CPU runs all three dtypes)."""
        import torch  # only here: validating a profile never loads torch

        if device == "cuda" and self.compute_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ValueError("compute_dtype='bfloat16' is not supported by this GPU; use compute_dtype: float16")


class BnbNF4Config(Bnb4bitConfig):
    """NF4: 4-bit NormalFloat codes (best for normally distributed weights)."""

    QUANT_TYPE: ClassVar[str] = "nf4"


class BnbFP4Config(Bnb4bitConfig):
    """FP4: 4-bit float codes (e2m1)."""

    QUANT_TYPE: ClassVar[str] = "fp4"


register_config(
    "bnb-int8",
    BnbInt8Config,
    handler="quantmill.quantize.bnb:quantize_bnb_int8",
    calibrated=False,
    aliases=("bnb-8bit",),
    summary="bitsandbytes LLM.int8 (8-bit weights, fp16 outliers); reloads with from_pretrained on CPU or CUDA.",
    facts=MethodFacts(memory=(1.0, 16 * MiB, 0), library="bitsandbytes", eval_dequant=2.4,
                      loader=(None, "pip install bitsandbytes"), requirements=("bitsandbytes",)),
)

register_config(
    "bnb-nf4",
    BnbNF4Config,
    handler="quantmill.quantize.bnb:quantize_bnb_nf4",
    calibrated=False,
    aliases=("bnb-4bit",),
    summary="bitsandbytes 4-bit NormalFloat (QLoRA format); reloads with from_pretrained on CPU or CUDA.",
    facts=MethodFacts(memory=(1.0, 16 * MiB, 0), library="bitsandbytes", eval_dequant=1.5,
                      loader=(None, "pip install bitsandbytes"), requirements=("bitsandbytes",)),
)

register_config(
    "bnb-fp4",
    BnbFP4Config,
    handler="quantmill.quantize.bnb:quantize_bnb_fp4",
    calibrated=False,
    summary="bitsandbytes 4-bit float (e2m1); reloads with from_pretrained on CPU or CUDA.",
    facts=MethodFacts(memory=(1.0, 16 * MiB, 0), library="bitsandbytes", eval_dequant=1.5,
                      loader=(None, "pip install bitsandbytes"), requirements=("bitsandbytes",)),
)
