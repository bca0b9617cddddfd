"""Plain numbers shared by evaluation, the plan and the registry: one home for each formula (core, no imports)."""

from __future__ import annotations

LOGITS_BUDGET = 2**27  # fp32 logits elements per forward batch (512 MiB)


def ppl_delta_pct(ppl: float, base: float) -> float:
    """Perplexity change against the baseline, in percent (positive: worse)."""
    return 100.0 * (ppl / base - 1.0)


def derived(m: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Metrics relative to the baseline: perplexity change, compression, accuracy drop."""
    out = {"ppl_delta_pct": ppl_delta_pct(m["perplexity"], b["perplexity"])}
    if m.get("size_bytes") and b.get("size_bytes"):
        out["compression"] = b["size_bytes"] / m["size_bytes"]
    if "accuracy" in m and "accuracy" in b:
        out["accuracy_delta"] = m["accuracy"] - b["accuracy"]
        out["accuracy_drop"] = b["accuracy"] - m["accuracy"]
    return out
