"""Facts about a model folder read from its files alone (config, safetensors headers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantmill.errors import QuantmillError
from quantmill.safetensors_io import num_params

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
# Tokenizer files (the MLflow model's tokenizer component); a checkpoint carries them and generation_config.json
# beside its config and weights (SIDE_FILES: what quantize copies); META_PATTERNS: what download and merge take.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "tiktoken.model",
)
SIDE_FILES = ("generation_config.json", *TOKENIZER_FILES)
META_PATTERNS = ("config.json", *SIDE_FILES)


def check_model_dir(path: Path, field: str, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Refuse folders we cannot or must not load, naming the field and the fix."""
    if not path.is_dir():
        raise QuantmillError(f"{field}: {path} does not exist or is not a folder; fix the path")
    if not (path / "config.json").is_file():
        raise QuantmillError(f"{field}: {path} has no config.json; point at a transformers model folder")
    config = json.loads((path / "config.json").read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise QuantmillError(
            f"{field}: {path} needs custom code (auto_map in config.json); "
            f"set {field.rsplit('.', 1)[0]}.trust_remote_code: true if you trust it"
        )
    has_st = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_st and has_pickle and not allow_pickle:
        raise QuantmillError(
            f"{field}: {path} has only pickle (.bin) weights, which can run code when loaded; "
            f"convert to safetensors or set {field.rsplit('.', 1)[0]}.allow_pickle: true"
        )
    if not has_st and not has_pickle:
        raise QuantmillError(f"{field}: {path} has no weight files (*.safetensors)")


def model_summary(path: Path) -> dict[str, Any]:
    """Architecture, sizes and parameter count of a model folder."""
    config = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    return {
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "num_attention_heads": config.get("num_attention_heads"),
        "num_key_value_heads": config.get("num_key_value_heads"),
        "vocab_size": config.get("vocab_size"),
        "max_position_embeddings": config.get("max_position_embeddings"),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "num_parameters": sum(num_params(f) for f in files),
        "weight_bytes": sum(f.stat().st_size for f in files),
        "weight_files": len(files),
    }
