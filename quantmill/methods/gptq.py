"""Method config: gptq (GPTQModel)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from quantmill.methods.base import GPTQFamilyConfig, check_kernel
from quantmill.methods.registry import MethodFacts, MiB, register_config

# Kernel GPTQModel uses for the quantized layers it builds; only "auto" and "torch" run on CPU.
GPTQ_KERNELS = {"auto": "auto", "torch": "gptq_torch", "triton": "gptq_triton", "exllama_v2": "gptq_exllama_v2",
                "marlin": "gptq_marlin", "machete": "gptq_machete"}


CPU_KERNELS = ("auto", "torch")


ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]


class GPTQConfig(GPTQFamilyConfig):
    """GPTQ via GPTQModel: bits, group_size, desc_act (act-order), damp_percent, sym, true_sequential, kernel."""

    desc_act: bool = Field(False, description="Act-order: quantize columns by decreasing activation size (g_idx)")
    # GPTQModel's group-aware reordering: act-order inside/among groups, un-permuted on save (trivial g_idx,
    # so the checkpoint stays desc_act=false); ignored with desc_act or per-channel.
    act_group_aware: bool = Field(True, description="Group-aware act-order, undone on save (off with desc_act)")
    damp_percent: float = Field(0.05, gt=0, lt=1, description="Hessian dampening, a fraction of its mean diagonal")
    true_sequential: bool = Field(True, description="Quantize a block's linears one by one, each after the last")
    batch_size: int = Field(1, ge=1, description="Calibration samples per forward pass")
    kernel: Literal["auto", "torch", "triton", "exllama_v2", "marlin", "machete"] = Field(
        "auto", description="GPTQModel kernel of the quantized layers (on CPU: auto or torch)")
    compute_dtype: ComputeDtype = Field(
        "auto", description="Dtype GPTQModel loads and quantizes in on CPU; auto: bfloat16 (measured). "
                            "CUDA: the library's choice")

    def default_max_ppl_increase_pct(self) -> float:
        """GPTQ is expected to stay within 3% of the fp baseline."""
        return 3.0

    def check_device(self, device: str) -> None:
        """CUDA-only kernels and 4-bit group sizes the CPU kernels cannot load are rejected on CPU."""
        check_kernel(self.kernel, CPU_KERNELS, device)
        super().check_device(device)

register_config(
    "gptq",
    GPTQConfig,
    handler="quantmill.quantize.gptq:quantize_gptq",
    calibrated=True,
    summary="GPTQ through GPTQModel (layer-by-layer, Hessian-corrected), saved in GPTQ v1 format.",
    # GPTQModel packs each layer as it goes (the packed layers replace the float ones): one checkpoint beside the
    # model, not rtn's two (codes + packed). Measured at 254 M (benchmarks/scale.py): 2.0 over-estimated by 31 %.
    facts=MethodFacts(memory=(1.0, 136 * MiB, None), library="gptqmodel", loader_library="gptqmodel", eval_dequant=3.0,
                      cpu_load_bytes=2, loader=("gptq", "pip install gptqmodel optimum"),
                      requirements=("gptqmodel", "optimum")),
)
