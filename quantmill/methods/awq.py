"""Method config: awq (GPTQModel or AutoAWQ)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from quantmill.methods.base import GroupedConfig, check_cpu_int4_group, check_kernel, require_import
from quantmill.methods.registry import MethodFacts, MiB, ModelInfo, register_config

AWQ_KERNELS = {"auto": "auto", "torch": "awq_torch", "gemm": "awq_gemm", "marlin": "awq_marlin",
               "exllama_v2": "awq_exllama_v2"}


CPU_KERNELS = ("auto", "torch")


AUTOAWQ_HINT = ("backend='autoawq' needs AutoAWQ, which is not installed: pip install --no-deps autoawq==0.2.9 "
                "(its triton requirement is CUDA-only and not needed; see requirements/autoawq.txt)")


class AWQConfig(GroupedConfig):
    """AWQ: 4-bit, group_size, zero_point, clip_search, duo_scaling, backend (gptqmodel|autoawq), kernel."""

    bits: Literal[4] = Field(4, description="Bits per weight (AWQ is 4-bit)")
    zero_point: bool = Field(True, description="Asymmetric quantization with a zero-point per group")
    # Scale search itself is AWQ (without it AWQ is RTN); neither backend can switch it off. These two tune it:
    clip_search: bool = Field(True, description="Search a per-group clipping threshold after scaling")
    duo_scaling: bool = Field(True, description="Scale from activation and weight statistics, not activations alone")
    backend: Literal["gptqmodel", "autoawq"] = Field(
        "gptqmodel", description="Implementation: GPTQModel, or AutoAWQ (extra `awq`, installed --no-deps)")
    kernel: Literal["auto", "torch", "gemm", "marlin", "exllama_v2"] = Field(
        "auto", description="GPTQModel kernel of the quantized layers (on CPU: auto or torch)")
    batch_size: int = Field(1, ge=1, description="Calibration samples per forward pass")
    # Never fp32: see _quantize_gptqmodel.
    compute_dtype: Literal["auto", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of GPTQModel's scale search on CPU; auto: bfloat16 (measured). "
                            "CUDA: the library's choice")

    def default_max_ppl_increase_pct(self) -> float:
        """AWQ is expected to stay within 3% of the fp baseline."""
        return 3.0

    def check_model(self, info: ModelInfo) -> None:
        """Group size divides in_features; in_features fill whole groups of 8 packed rows."""
        super().check_model(info)
        for name, in_features in info.linear_in_features.items():
            if in_features % 8:
                raise ValueError(f"bits=4: in_features={in_features} of {name} is not a multiple of 8")

    def check_device(self, device: str) -> None:
        """CUDA-only kernels and CPU-unloadable group sizes are rejected on CPU; backend='autoawq' needs autoawq."""
        if self.backend == "autoawq":
            require_autoawq()
            if self.kernel != "auto":
                raise ValueError("kernel applies to backend='gptqmodel' only; AutoAWQ picks its own GEMM kernel")
            if self.compute_dtype != "auto":
                raise ValueError("compute_dtype applies to backend='gptqmodel' only; AutoAWQ computes in fp16")
        check_kernel(self.kernel, CPU_KERNELS, device)
        check_cpu_int4_group(self.bits, self.group_size, device)


def require_autoawq() -> None:
    """Raise a one-line ValueError when awq cannot be imported."""
    require_import("awq", AUTOAWQ_HINT)


register_config(
    "awq",
    AWQConfig,
    handler="quantmill.quantize.awq:quantize_awq",
    calibrated=True,
    summary="AWQ 4-bit (activation-aware scales, clipping), saved as an AutoAWQ GEMM checkpoint.",
    facts=MethodFacts(memory=(2.0, 136 * MiB, None), library="gptqmodel", loader_library="gptqmodel", eval_dequant=3.0,
                      cpu_load_bytes=2, loader=("awq", "pip install gptqmodel"), requirements=("gptqmodel", "optimum")),
)
