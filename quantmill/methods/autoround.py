"""Method config: autoround (auto-round, GPTQ checkpoint format)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from quantmill.methods.base import GroupedConfig, check_cpu_int4_group, check_packable, require_import
from quantmill.methods.registry import MethodFacts, MiB, ModelInfo, register_config

AUTOROUND_HINT = ('method autoround needs the optional auto-round package (Python >= 3.11): '
                  'pip install "auto-round==0.16.1" "torch==2.13.0" (or pip install -e ".[autoround]")')


class AutoRoundConfig(GroupedConfig):
    """AutoRound: bits 2/3/4/8, group_size, sym, iters, lr (None = 1/iters), batch_size; GPTQ-format output."""

    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight")
    sym: bool = Field(True, description="Symmetric quantization (no zero-point search)")
    iters: int = Field(200, ge=0, description="Sign-gradient tuning steps per block; 0 = AutoRound's RTN mode")
    lr: float | None = Field(None, gt=0, description="Learning rate of the rounding/clipping tuning; null = 1/iters")
    batch_size: int = Field(8, ge=1, description="Calibration samples per tuning step")

    def default_max_ppl_increase_pct(self) -> float:
        """Same gate as GPTQ/AWQ: 3%."""
        return 3.0

    def check_device(self, device: str) -> None:
        """auto-round must be importable; 4-bit group sizes the CPU kernels cannot load are rejected on CPU."""
        require_auto_round()
        check_cpu_int4_group(self.bits, self.group_size, device)

    def check_model(self, info: ModelInfo) -> None:
        """Group size divides in_features; in_features a multiple of 32 (GPTQ packing)."""
        super().check_model(info)
        check_packable(info)


def require_auto_round() -> None:
    """Raise a one-line ValueError when auto_round cannot be imported."""
    require_import("auto_round", AUTOROUND_HINT)


register_config(
    "autoround",
    AutoRoundConfig,
    handler="quantmill.quantize.autoround:quantize_autoround",
    calibrated=True,
    summary="AutoRound (sign-gradient rounding/clipping tuning) through auto-round, saved as a GPTQ v1 checkpoint.",
    facts=MethodFacts(memory=(2.0, 64 * MiB, None),  # a GPTQ-format writer like gptq
                      loader_library="gptqmodel", eval_dequant=3.0, loader=("gptq", "pip install gptqmodel optimum"),
                      requirements=("gptqmodel", "optimum")),
)
