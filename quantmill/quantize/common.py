"""Helpers shared by the quantization handlers: loading, module discovery, audits, saving beside the tokenizer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quantmill.modelinfo import meta_model, target_linears
from quantmill.models import SIDE_FILES

_FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # vLLM fuses these: same scheme required


def load_fp_model(model_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a full-precision causal LM for quantization (eval mode, no grad)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype or (torch.float16 if device == "cuda" else torch.float32)
    )
    return model.to(device).eval()


def base_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the base model's config.json declares (`dtype` or the older `torch_dtype`), float32 if none."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def kept_dtype(model_dir: Path) -> torch.dtype:
    """Dtype of the tensors a GPTQ-format checkpoint keeps unquantized: the base's own half dtype (bf16/fp16);
    an fp32 base is stored fp16, what GPTQ/AWQ kernels and vLLM take."""
    dtype = base_dtype(model_dir)
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float16


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy tokenizer and generation files so a checkpoint is self-contained."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def write_json(path: Path, data: dict) -> None:
    """Write pretty JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def checkpoint_size(path: Path) -> int:
    """Bytes of every file in a checkpoint folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- shared by methods with a fixed storage width (bnb-*, dynamic-int8, fp8) ---


def skipped_linears(model_dir: Path, keep: tuple[str, ...]) -> list[str]:
    """Full names of the nn.Linear modules a method leaves alone (built on the meta device, no weights)."""
    model = meta_model(model_dir)
    targets = target_linears(model, keep)
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in targets)


def kept_module_names(model: nn.Module, targets: dict[str, nn.Module]) -> list[str]:
    """Weight-bearing modules left in full precision: untargeted linears (lm_head) and embeddings."""
    return sorted(
        n for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding)) and n not in targets
    )


def check_fused_groups(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    """vLLM fuses q/k/v and gate/up into one layer: all members must be quantized or all kept."""
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name in sorted(names):
        prefix, _, leaf = name.rpartition(".")
        for group in _FUSED_GROUPS:
            members = [f"{prefix}.{g}".lstrip(".") for g in group if f"{prefix}.{g}".lstrip(".") in names]
            if leaf == group[0] and len({m in targets for m in members}) > 1:
                raise ValueError(f"skip_modules: {', '.join(members)} are fused by vLLM; skip all of them or none")


def audit_quantized(
    model: nn.Module, keep: tuple[str, ...], is_quantized: Callable[[nn.Module], bool], method: str
) -> tuple[list[str], list[str]]:
    """(quantized, kept) module names; raise naming the first targeted linear that is not quantized."""
    targets = target_linears(model, keep)
    for name, module in sorted(targets.items()):
        if not is_quantized(module):
            raise RuntimeError(f"{method}: module {name} was not quantized (still {type(module).__name__})")
    return sorted(targets), kept_module_names(model, targets)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||w - w_hat|| / ||w|| in float32 (the per-layer error logged as a metric)."""
    w, w_hat = w.detach().float().cpu(), w_hat.detach().float().cpu()
    return float((w - w_hat).norm() / w.norm().clamp_min(1e-12))


def layer_errors(
    model_dir: Path, model: nn.Module, names: list[str], dequantize: Callable[[nn.Module], torch.Tensor]
) -> dict[str, float]:
    """Relative error of each quantized layer against the original weight, streamed from the safetensors shards."""
    from safetensors import safe_open

    wanted = {f"{n}.weight": n for n in names}
    errors: dict[str, float] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in sorted(wanted.keys() & set(f.keys())):
                name = wanted[key]
                errors[name] = relative_error(f.get_tensor(key), dequantize(model.get_submodule(name)))
    return errors


def write_checkpoint(model: nn.Module, state: dict[str, torch.Tensor], qcfg: dict, out_dir: Path,
                     dtype: torch.dtype) -> None:
    """Save `state` as model.safetensors (a tied lm_head dropped) and config.json with `qcfg` as its
    quantization_config and `dtype` as the dtype of the tensors kept unquantized; generation_config beside."""
    from safetensors.torch import save_file

    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qcfg
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
