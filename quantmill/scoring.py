"""Scoring math shared by evaluation and sensitivity: the top-k KL divergence (core, torch; the logits budget is in
quantmill.metrics)."""

from __future__ import annotations

import torch


def topk_kl(ref_lp: torch.Tensor, ref_ids: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(ref || model) over ref's top-k tokens plus one bucket for the rest of the vocabulary."""
    q = lp.gather(1, ref_ids)
    p = ref_lp.exp()
    kl = (p * (ref_lp - q)).sum(-1)
    if ref_ids.shape[1] < lp.shape[1]:
        p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
        q_rest = (1.0 - q.exp().sum(-1)).clamp_min(1e-12)
        kl = kl + torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), 0.0)
    return kl.clamp_min(0.0)
