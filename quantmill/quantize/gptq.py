"""GPTQ (Hessian-aware, layer-by-layer) through GPTQModel, saved as a GPTQ v1 checkpoint."""

from __future__ import annotations

from quantmill.methods.gptq import GPTQ_KERNELS, GPTQConfig
from quantmill.methods.registry import QuantizeJob, QuantizeResult
from quantmill.quantize.gptq_format import v1_zero_underflows
from quantmill.quantize.gptqmodel_backend import (
    finish_checkpoint,
    gptqmodel_device,
    parse_layer_errors,
    resolve_cpu_dtype,
    run_gptqmodel,
    target_and_kept,
)


def quantize_gptq(config: GPTQConfig, job: QuantizeJob) -> QuantizeResult:
    """GPTQ through GPTQModel (layer-by-layer, Hessian-corrected), saved in GPTQ v1 format."""
    from gptqmodel import QuantizeConfig

    targets, kept = target_and_kept(job.model_dir)
    plan = config.mixed_plan(job)
    if plan:  # kept linears: excluded from GPTQ by `dynamic`, saved as fp16 weights
        targets, kept = [t for t in targets if t not in plan.kept], sorted(kept + plan.kept)
    mixed = plan.quantization_config(targets) if plan else {}
    qcfg = QuantizeConfig(
        bits=config.bits, group_size=config.group_size, desc_act=config.desc_act, sym=config.sym,
        damp_percent=config.damp_percent, true_sequential=config.true_sequential,
        act_group_aware=config.act_group_aware and not config.desc_act and config.group_size > 0,
        format="gptq", device=gptqmodel_device(job.device), dynamic=mixed.get("dynamic"),
    )
    kernel = "gptq_torch" if config.kernel == "auto" and job.device != "cuda" else GPTQ_KERNELS[config.kernel]
    quant_log = run_gptqmodel(job, qcfg, kernel, config.batch_size, cpu_dtype=resolve_cpu_dtype(config.compute_dtype))
    quantized = finish_checkpoint(job, targets, kept, {"lm_head": False, **mixed})
    bad = [] if config.sym else v1_zero_underflows(job.out_dir, config.bits)
    if bad:  # GPTQModel computes zero=round(-min/scale), which can be 0; v1 stores zero-1 -> borrows into a neighbour
        raise RuntimeError(f"asymmetric GPTQ produced zero-point 0 in {bad[0]} ({len(bad)} modules); the GPTQ v1 "
                           "checkpoint would be misread per field (vLLM); use sym=true")
    errors = parse_layer_errors(quant_log, quantized)
    mean = sum(errors.values()) / max(1, len(errors))
    job.progress(f"gptq: {len(quantized)} linears quantized, mean GPTQ loss {mean:.3g}")
    extra = {"mixed_precision": plan.record(job.out_dir)} if plan else {}
    return QuantizeResult(quantized_modules=quantized, kept_modules=kept, layer_errors=errors, extra=extra)
