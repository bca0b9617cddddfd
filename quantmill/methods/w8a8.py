"""Method config: w8a8-int8 (SmoothQuant + int8, compressed-tensors format)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import Field

from quantmill.methods.base import FixedBitsConfig
from quantmill.methods.registry import MethodFacts, ModelInfo, register_config


@dataclass(frozen=True)
class SmoothMap:
    """Inside one decoder layer: the module whose output feeds `balance` (absorbs 1/s) and those linears (take s)."""

    prev: str
    balance: tuple[str, ...]


LLAMA_LIKE = (
    SmoothMap("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothMap("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothMap("mlp.up_proj", ("mlp.down_proj",)),  # down_proj's input is silu(gate) * up: linear in up's rows
)


# architecture -> (decoder layers' container, smoothing maps inside each layer)
SMOOTH_MAPS: dict[str, tuple[str, tuple[SmoothMap, ...]]] = {
    "LlamaForCausalLM": ("model.layers", LLAMA_LIKE),
    "Qwen2ForCausalLM": ("model.layers", LLAMA_LIKE),
}


class W8A8Int8Config(FixedBitsConfig):
    """int8 weights per channel + int8 activations (static per tensor or dynamic per token), SmoothQuant smoothing."""

    BITS_HINT: ClassVar[str] = "for 4-bit weights use rtn, gptq, awq or autoround"
    smoothing_alpha: float | None = Field(
        0.5, ge=0, le=1, description="SmoothQuant migration strength (0.5-0.8 typical); null = no smoothing")
    weights: Literal["rtn", "gptq"] = Field(
        "rtn", description="int8 per-channel weights by round-to-nearest or GPTQ (GPTQModel, calibrated)")
    activations: Literal["static", "dynamic"] = Field(
        "static", description="int8 activations: static per-tensor scale from calibration, or dynamic per token")

    def variant_name(self) -> str:
        """w8a8-int8[-gptq][-dynamic][-nosmooth]."""
        return "w8a8-int8" + "".join(s for s, on in (("-gptq", self.weights == "gptq"),
                                                     ("-dynamic", self.activations == "dynamic"),
                                                     ("-nosmooth", self.smoothing_alpha is None)) if on)

    def default_max_ppl_increase_pct(self) -> float:
        """W8A8 int8 should be nearly lossless: 2%."""
        return 2.0

    def check_model(self, info: ModelInfo) -> None:
        """Smoothing needs the architecture's norm/linear map; GPTQ packing needs in_features % 32."""
        super().check_model(info)
        if self.smoothing_alpha is not None and info.architecture not in SMOOTH_MAPS:
            raise ValueError(f"smoothing_alpha: no smoothing map for {info.architecture} (known: "
                             f"{', '.join(SMOOTH_MAPS)}); set smoothing_alpha: null to quantize without smoothing")
        if self.weights == "gptq":
            for name, in_features in info.linear_in_features.items():
                if in_features % 32:
                    raise ValueError(f"weights=gptq: in_features={in_features} of {name} is not a multiple of 32")

register_config(
    "w8a8-int8",
    W8A8Int8Config,
    handler="quantmill.quantize.w8a8:quantize_w8a8",
    calibrated=True,
    summary="W8A8 int8 (SmoothQuant + per-channel int8 weights + static/dynamic int8 activations), compressed-tensors.",
    facts=MethodFacts(memory=(1.0, 0, 0),  # norms/embeddings stay in the load dtype
                      loader=("compressed-tensors", "pip install compressed-tensors"),
                      requirements=("compressed-tensors",)),
)
