"""Helpers shared by quantization handlers: loading, module discovery, saving beside the tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, ClassVar

import torch
from pydantic import ConfigDict, Field, field_validator
from torch import nn

from quantmill.tasks.quantize.registry import MethodConfig, ModelInfo

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
# Modules kept in full precision by every method unless a recipe says otherwise.
DEFAULT_KEEP = ("lm_head",)


def pick_device() -> str:
    """'cuda' when a GPU is present, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def target_linears(model: nn.Module, keep: tuple[str, ...] = DEFAULT_KEEP) -> dict[str, nn.Linear]:
    """The nn.Linear modules a weight quantizer targets (everything but `keep`)."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not any(name == k or name.endswith("." + k) for k in keep)
    }


def model_info(model_dir: Path) -> ModelInfo:
    """Architecture and linear in_features, from config.json alone (meta device, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
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


def write_json(path: Path, data: dict) -> None:
    """Write pretty JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def checkpoint_size(path: Path) -> int:
    """Bytes of every file in a checkpoint folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- shared by methods with a fixed storage width (bnb-*, dynamic-int8, fp8) ---


def fixed_bits_schema(schema: dict, bits: int) -> None:
    """JSON schema: `bits` takes the one width the method stores, so the form and the server refuse others."""
    schema["properties"]["bits"]["enum"] = [bits]


class FixedBitsConfig(MethodConfig):
    """Base of methods whose weight width is fixed: `bits` may be stated but must equal FIXED_BITS."""

    FIXED_BITS: ClassVar[int] = 8
    SWEEP_AXES: ClassVar[tuple[str, ...]] = ()
    BITS_HINT: ClassVar[str] = ""
    model_config = ConfigDict(json_schema_extra=lambda schema, cls: fixed_bits_schema(schema, cls.FIXED_BITS))
    bits: int = Field(8, description="Bits per weight, fixed by the method")
    skip_modules: tuple[str, ...] = Field(
        DEFAULT_KEEP, description="Modules left unquantized: exact names or dotted suffixes such as 'o_proj'")

    @field_validator("bits")
    @classmethod
    def _fixed_bits(cls, v: int) -> int:
        """Only the method's own width is accepted; the message names the alternatives."""
        if v != cls.FIXED_BITS:
            name = cls.TYPE or cls.__name__
            raise ValueError(
                f"bits={v} is not supported: {name} always stores {cls.FIXED_BITS}-bit weights; "
                f"drop `bits` (or set bits: {cls.FIXED_BITS}){'; ' + cls.BITS_HINT if cls.BITS_HINT else ''}"
            )
        return v

    @field_validator("skip_modules")
    @classmethod
    def _skip_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        """Module names (exact or a dotted suffix such as 'o_proj'), non-empty and unique."""
        if any(not s.strip() for s in v):
            raise ValueError("skip_modules entries must be non-empty module names such as 'lm_head' or 'o_proj'")
        if len(set(v)) != len(v):
            raise ValueError(f"skip_modules has duplicates: {list(v)}")
        return v

    def check_model(self, info: ModelInfo) -> None:
        """Every skip_modules entry (besides the default lm_head) must name a linear of the model."""
        super().check_model(info)
        for key in self.skip_modules:
            if key in DEFAULT_KEEP:
                continue
            if not any(n == key or n.endswith("." + key) for n in info.linear_in_features):
                example = next(iter(info.linear_in_features), "model.layers.0.mlp.down_proj")
                raise ValueError(f"skip_modules: {key!r} matches no linear module of the model (e.g. {example!r})")


def skipped_linears(model_dir: Path, keep: tuple[str, ...]) -> list[str]:
    """Full names of the nn.Linear modules a method leaves alone (built on the meta device, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    targets = target_linears(model, keep)
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in targets)


def audit_quantized(
    model: nn.Module, keep: tuple[str, ...], is_quantized: Callable[[nn.Module], bool], method: str
) -> tuple[list[str], list[str]]:
    """(quantized, kept) module names; raise naming the first targeted linear that is not quantized."""
    targets = target_linears(model, keep)
    for name, module in sorted(targets.items()):
        if not is_quantized(module):
            raise RuntimeError(f"{method}: module {name} was not quantized (still {type(module).__name__})")
    kept = sorted(
        n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and n not in targets
    )
    return sorted(targets), kept


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
