"""Quality gates: the limits that apply to a variant and the verdict on its metrics (core, pure)."""

from __future__ import annotations

import math

from quantmill.methods import build_config
from quantmill.metrics import derived
from quantmill.profile import Evaluation, Gates
from quantmill.refs import CheckpointRef, EvalRef, Verdict


def limits_for(ckpt: CheckpointRef, spec: Evaluation) -> Gates:
    """Profile gates for this variant: variant name over method over global over method defaults."""
    merged = spec.gates.model_dump(exclude_none=True)
    merged.update(spec.method_gates.get(ckpt.method, Gates()).model_dump(exclude_none=True))
    merged.update(spec.method_gates.get(ckpt.name, Gates()).model_dump(exclude_none=True))
    merged.setdefault(
        "max_ppl_increase_pct",
        build_config(ckpt.method, {k: v for k, v in ckpt.config.items() if k not in {"type", "version"}})
        .default_max_ppl_increase_pct(),
    )
    return Gates(**merged)


# (gate field, metric, "max"/"min", label, format, what to enable when the metric is missing)
BOUNDS = (
    ("max_kl", "kl_mean", "max", "KL", "{:.4f}", "pass the baseline EvalRef to evaluate"),
    ("min_top1_agreement", "top1_agreement", "min", "top-1 agreement", "{:.4f}", "pass the baseline EvalRef"),
    ("max_size_bytes", "size_bytes", "max", "size", "{:.0f} B", ""),
    ("min_compression", "compression", "min", "compression", "{:.2f}x", ""),
    ("max_latency_ms_p50", "latency_ms_p50", "max", "latency p50", "{:.1f} ms", "enable evaluation.speed"),
    ("max_latency_ms_p95", "latency_ms_p95", "max", "latency p95", "{:.1f} ms", "enable evaluation.speed"),
    ("max_accuracy_drop", "accuracy_drop", "max", "accuracy drop", "{:.4f}", "set evaluation.accuracy"),
)


def judge(ckpt: CheckpointRef, result: EvalRef, *, baseline: EvalRef, spec: Evaluation) -> Verdict:
    """Gate verdict with the reason for every bound that failed (a bound on an unmeasured metric fails)."""
    gates = limits_for(ckpt, spec)
    m = {**result.metrics, **derived(result.metrics, baseline.metrics)}
    delta = m["ppl_delta_pct"]
    reasons = []
    if not math.isfinite(m["perplexity"]) or delta > gates.max_ppl_increase_pct:
        reasons.append(f"perplexity {delta:+.2f}% > +{gates.max_ppl_increase_pct}%")
    for field, metric, kind, label, fmt, hint in BOUNDS:
        bound = getattr(gates, field)
        if bound is None:
            continue
        value = m.get(metric)
        if value is None or not math.isfinite(value):
            reasons.append(f"{label} not measured ({hint or 'check the evaluation'}) but {field} is set")
        elif (value > bound) if kind == "max" else (value < bound):
            reasons.append(f"{label} {fmt.format(value)} {'>' if kind == 'max' else '<'} {bound}")
    return Verdict(name=ckpt.name, passed=not reasons, reasons=reasons, limits=gates.model_dump(exclude_none=True))
