"""AWQ (activation-aware scaling + clipping search) via GPTQModel or AutoAWQ, saved in AutoAWQ GEMM format."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from quantmill.tasks.quantize.gptq import (
    check_kernel,
    finish_checkpoint,
    gptqmodel_device,
    resolve_cpu_dtype,
    load_calibration,
    parse_layer_errors,
    run_gptqmodel,
    target_and_kept,
)
from quantmill.tasks.quantize.registry import ModelInfo, QuantizeJob, QuantizeResult, register_method
from quantmill.tasks.quantize.rtn import GroupedConfig, check_cpu_int4_group

AWQ_KERNELS = {"auto": "auto", "torch": "awq_torch", "gemm": "awq_gemm", "marlin": "awq_marlin",
               "exllama_v2": "awq_exllama_v2"}
CPU_KERNELS = ("auto", "torch")
AUTOAWQ_HINT = "backend='autoawq' needs AutoAWQ, which is not installed: pip install autoawq==0.2.9"
_PATCH_LOCK = threading.Lock()


class AWQConfig(GroupedConfig):
    """AWQ: 4-bit, group_size, zero_point, clip_search, duo_scaling, backend (gptqmodel|autoawq), kernel."""

    bits: Literal[4] = Field(4, description="Bits per weight (AWQ is 4-bit)")
    zero_point: bool = Field(True, description="Asymmetric quantization with a zero-point per group")
    # Scale search itself is AWQ (without it AWQ is RTN); neither backend can switch it off. These two tune it:
    clip_search: bool = Field(True, description="Search a per-group clipping threshold after scaling")
    duo_scaling: bool = Field(True, description="Scale from activation and weight statistics, not activations alone")
    backend: Literal["gptqmodel", "autoawq"] = Field(
        "gptqmodel", description="Implementation: GPTQModel, or AutoAWQ (pip install autoawq)")
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
    """Raise a one-line ValueError when AutoAWQ cannot be imported (never fall back silently)."""
    try:
        import awq  # noqa: F401  (autoawq's import name)
    except Exception:
        raise ValueError(AUTOAWQ_HINT) from None


@contextlib.contextmanager
def awq_processor_options(**attrs) -> Iterator[None]:
    """Set AWQProcessor attributes GPTQModel hard-codes (apply_clip, duo_scaling) for one quantize() call."""
    from gptqmodel.looper import awq_processor as mod

    original = mod.AWQProcessor

    class Configured(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for key, value in attrs.items():
                if not hasattr(self, key):
                    raise RuntimeError(f"gptqmodel's AWQProcessor has no attribute {key!r}; cannot honour it")
                setattr(self, key, value)

    with _PATCH_LOCK:  # GPTQModel imports AWQProcessor from this module at quantize() time
        mod.AWQProcessor = Configured
        try:
            yield
        finally:
            mod.AWQProcessor = original


def _quantize_gptqmodel(config: AWQConfig, job: QuantizeJob):
    """AWQ through GPTQModel's AWQ processor; return its quant log."""
    from gptqmodel import QuantizeConfig

    qcfg = QuantizeConfig(quant_method="awq", format="gemm", bits=config.bits, group_size=config.group_size,
                          sym=not config.zero_point, device=gptqmodel_device(job.device))
    kernel = "awq_torch" if config.kernel == "auto" and job.device != "cuda" else AWQ_KERNELS[config.kernel]
    # Never fp32: GPTQModel's scale search keeps its "master copy" as weight.to(torch.float32), which aliases an
    # fp32 weight, so every candidate scale corrupts it (demo ppl 81.9 vs 66.9); bf16/fp16 copy it.
    with awq_processor_options(apply_clip=config.clip_search, duo_scaling=config.duo_scaling):
        return run_gptqmodel(job, qcfg, kernel, config.batch_size, cpu_dtype=resolve_cpu_dtype(config.compute_dtype))


def _quantize_autoawq(config: AWQConfig, job: QuantizeJob) -> None:
    """AWQ through AutoAWQ 0.2.9 (GEMM export)."""
    require_autoawq()
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    rows = [r["input_ids"].tolist() for r in load_calibration(job.calibration)]
    model = AutoAWQForCausalLM.from_pretrained(str(job.model_dir), safetensors=True, use_cache=False)
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    quant_config = {"zero_point": config.zero_point, "q_group_size": config.group_size, "w_bit": config.bits,
                    "version": "GEMM"}
    job.progress(f"awq(autoawq): quantizing with {len(rows)} calibration samples")
    model.quantize(tokenizer, quant_config=quant_config, calib_data=rows, max_calib_samples=len(rows),
                   max_calib_seq_len=max(len(r) for r in rows), apply_clip=config.clip_search, duo_scaling=config.duo_scaling)
    model.save_quantized(str(job.out_dir))


@register_method("awq", AWQConfig, calibrated=True)
def quantize_awq(config: AWQConfig, job: QuantizeJob) -> QuantizeResult:
    """AWQ 4-bit (activation-aware scales, clipping), saved as an AutoAWQ GEMM checkpoint."""
    targets, kept = target_and_kept(job.model_dir)
    if config.backend == "autoawq":
        _quantize_autoawq(config, job)
        errors: dict[str, float] = {}
    else:
        quant_log = _quantize_gptqmodel(config, job)
        errors = parse_layer_errors(quant_log, targets)
    quantized = finish_checkpoint(job, targets, kept, {})
    job.progress(f"awq: {len(quantized)} linears quantized with backend {config.backend}")
    return QuantizeResult(quantized_modules=quantized, kept_modules=kept, layer_errors=errors,
                          extra={"backend": config.backend})
