"""AWQ (activation-aware scaling + clipping search) via GPTQModel or AutoAWQ, saved in AutoAWQ GEMM format."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from quantmill.methods.awq import AWQ_KERNELS, AWQConfig, require_autoawq
from quantmill.methods.registry import QuantizeJob, QuantizeResult
from quantmill.quantize.gptqmodel_backend import (
    finish_checkpoint,
    gptqmodel_device,
    load_calibration,
    parse_layer_errors,
    resolve_cpu_dtype,
    run_gptqmodel,
    target_and_kept,
)

_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def awq_processor_options(**attrs: object) -> Iterator[None]:
    """Set AWQProcessor attributes GPTQModel hard-codes (apply_clip, duo_scaling) for one quantize() call."""
    from gptqmodel.looper import awq_processor as mod

    original = mod.AWQProcessor

    class Configured(original):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
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


def _quantize_gptqmodel(config: AWQConfig, job: QuantizeJob) -> Any:
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
