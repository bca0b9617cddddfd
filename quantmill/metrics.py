"""Plain numbers shared by evaluation, the plan and the registry: one home for each formula (core, no imports)."""

from __future__ import annotations

LOGITS_BUDGET = 2**27  # fp32 logits elements per forward batch (512 MiB)


def ppl_delta_pct(ppl: float, base: float) -> float:
    """Perplexity change against the baseline, in percent (positive: worse)."""
    return 100.0 * (ppl / base - 1.0)
