"""What validation and the planners read about a model without its weights: its linears on the meta device.

`model_info` answers from the state folder when the same config.json was read before with the same libraries
(quantmill.memo): a preflight of an unchanged model imports neither torch's nor transformers' modeling code."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from quantmill import memo
from quantmill.hashing import sha256_file
from quantmill.methods.base import DEFAULT_KEEP
from quantmill.methods.registry import ModelInfo

if TYPE_CHECKING:
    from torch import nn

MODEL_INFO_VERSION = 1  # bump when what model_info reads or returns changes (its kept answers then no longer match)


def target_linears(model: nn.Module, keep: tuple[str, ...] = DEFAULT_KEEP) -> dict[str, nn.Linear]:
    """The nn.Linear modules a weight quantizer targets (everything but `keep`)."""
    from torch import nn

    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not any(name == k or name.endswith("." + k) for k in keep)
    }


def meta_model(model_dir: Path) -> nn.Module:
    """The causal LM built from config.json alone on the meta device (module tree and shapes, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _read_model_info(model_dir: Path) -> ModelInfo:
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


def model_info(model_dir: Path) -> ModelInfo:
    """Architecture and linear in_features, from config.json alone (meta device, no weights); kept per config content
    and library versions (quantmill.memo)."""
    key = memo.memo_key("model-info", version=MODEL_INFO_VERSION, config=sha256_file(Path(model_dir) / "config.json"),
                        keep=DEFAULT_KEEP, libraries=memo.installed_versions("transformers", "torch"))
    kept = memo.recall("model-info", key)
    if kept is not None:
        return ModelInfo(**kept)
    info = _read_model_info(Path(model_dir))
    memo.remember("model-info", key, asdict(info))
    return info
