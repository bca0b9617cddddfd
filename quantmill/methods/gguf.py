"""Method config: gguf (llama.cpp file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from quantmill.methods.registry import MethodConfig, MethodFacts, ModelInfo, register_config

BLOCK = 32  # elements per block of every Q type here


BITS = {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_0": 4, "Q4_1": 4, "BF16": 16}


QuantType = Literal["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16"]


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers architecture maps onto llama.cpp's."""

    gguf_arch: str  # gguf.MODEL_ARCH member name and general.architecture
    permute_qk: bool  # llama.cpp's Llama rope is interleaved: q/k rows reordered per head


ARCHITECTURES = {
    "LlamaForCausalLM": GGUFArch("LLAMA", permute_qk=True),
    "Qwen2ForCausalLM": GGUFArch("QWEN2", permute_qk=False),
}


class GGUFConfig(MethodConfig):
    """GGUF file for llama.cpp: quant_type Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | BF16 for every 2-D weight."""

    SWEEP_AXES: ClassVar[tuple[str, ...]] = ()  # no bits/group_size field: a grid block sets params.quant_type
    quant_type: QuantType = Field("Q8_0", description="llama.cpp type of every 2-D weight (norms stay F32)")

    @property
    def weight_bits(self) -> int:
        """Bits per weight of the type (scales not counted)."""
        return BITS[self.quant_type]

    @property
    def weight_group_size(self) -> int | None:
        """32-element blocks, None for BF16."""
        return None if self.quant_type == "BF16" else BLOCK

    def variant_name(self) -> str:
        """gguf-q4-0, gguf-bf16, ..."""
        return "gguf-" + self.quant_type.lower().replace("_", "-")

    def default_max_ppl_increase_pct(self) -> float:
        """By bits: BF16 1%, Q8_0 2%, 4/5-bit 5%."""
        return {16: 1.0, 8: 2.0}.get(self.weight_bits, 5.0)

    def check_model(self, info: ModelInfo) -> None:
        """A supported architecture, and rows that fill whole 32-element blocks."""
        if info.architecture not in ARCHITECTURES:
            raise ValueError(f"gguf export supports {', '.join(ARCHITECTURES)}; {info.architecture} is not mapped")
        if self.quant_type == "BF16":
            return
        for name, in_features in info.linear_in_features.items():
            if in_features % BLOCK:
                raise ValueError(f"quant_type={self.quant_type}: in_features={in_features} of {name} is not a "
                                 f"multiple of {BLOCK}; use BF16")

def gguf_file_in(path: str | Path) -> str | None:
    """The name of the single .gguf file in a checkpoint folder (None for a transformers folder)."""
    found = sorted(p.name for p in Path(path).glob("*.gguf")) if Path(path).is_dir() else []
    if len(found) > 1:
        raise ValueError(f"{path} holds several .gguf files ({', '.join(found)}); keep one per folder")
    return found[0] if found else None


def loader_kwargs(path: str | Path) -> dict[str, str]:
    """Extra from_pretrained kwargs a checkpoint folder needs: gguf_file for a GGUF export, none otherwise."""
    name = gguf_file_in(path)
    return {"gguf_file": name} if name else {}


register_config(
    "gguf",
    GGUFConfig,
    handler="quantmill.quantize.gguf_export:export_gguf",
    calibrated=False,
    summary="GGUF file (llama.cpp, Ollama, LM Studio): Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/BF16 weights, tokenizer + chat template.",
    facts=MethodFacts(memory=(0.5, 0, 4),  # streams tensors (F32 norms; embeddings quantized too: an over-estimate)
                      loader=(None, "pip install gguf"), requirements=("gguf",)),
)
