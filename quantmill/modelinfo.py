"""What validation and the planners read about a model without its weights: its linears on the meta device."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantmill.methods.base import DEFAULT_KEEP
from quantmill.methods.registry import ModelInfo


def target_linears(model: nn.Module, keep: tuple[str, ...] = DEFAULT_KEEP) -> dict[str, nn.Linear]:
    """The nn.Linear modules a weight quantizer targets (everything but `keep`)."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not any(name == k or name.endswith("." + k) for k in keep)
    }


def meta_model(model_dir: Path) -> nn.Module:
    """The causal LM built from config.json alone on the meta device (module tree and shapes, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_info(model_dir: Path) -> ModelInfo:
    """Architecture and linear in_features, from config.json alone (meta device, no weights)."""
    model = meta_model(model_dir)
    config = model.config
    targets = target_linears(model)
    saved = model.state_dict().keys()  # persistent buffers; tied weights are saved once (named_parameters dedups)
    tensors = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if n in saved}
    return ModelInfo(
        architecture=(config.architectures or [type(model).__name__])[0],
        linear_in_features={n: m.in_features for n, m in targets.items()},
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        linear_out_features={n: m.out_features for n, m in targets.items()},
        other_tensors={n: t.numel() for n, t in tensors.items() if n.removesuffix(".weight") not in targets},
    )
