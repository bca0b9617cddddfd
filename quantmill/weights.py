"""What is known of a model's weights without reading them: tensor shapes and dtypes per shard (core).

Local folders give their safetensors headers, hub repos their headers via HTTP range requests
(`huggingface_hub.get_safetensors_metadata`); without either, config.json alone gives an estimate.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantmill.errors import QuantmillError
from quantmill.safetensors_io import DTYPE_BYTES, read_header

KEEP = re.compile(r"(embed|lm_head|wte|wpe|norm|ln_|bias)")


@dataclass(frozen=True)
class Weights:
    """What the plan knows of a model's weights: tensor shapes and dtypes per shard, no values."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    shard_bytes: dict[str, int]
    config: dict[str, Any] = field(default_factory=dict)

    def nbytes(self, name: str) -> int:
        """Bytes of one tensor."""
        dtype, shape = self.tensors[name]
        return DTYPE_BYTES.get(dtype, 4) * math.prod(shape)

    @property
    def total(self) -> int:
        """Bytes of all tensors."""
        return sum(self.nbytes(n) for n in self.tensors)

    @property
    def params(self) -> int:
        """Number of parameters."""
        return sum(math.prod(s) for _, s in self.tensors.values())

    @property
    def largest_shard(self) -> int:
        """Bytes of the largest shard file."""
        return max(self.shard_bytes.values(), default=0)

    @property
    def itemsize(self) -> int:
        """Bytes per element of the dominant floating dtype."""
        by: dict[int, int] = {}
        for d, s in self.tensors.values():
            by[DTYPE_BYTES.get(d, 4)] = by.get(DTYPE_BYTES.get(d, 4), 0) + math.prod(s)
        return max(by, key=by.get) if by else 2

    def linear_params(self) -> tuple[int, int]:
        """(params of 2-D weights a quantizer targets, params it keeps: embeddings, lm_head, norms, biases)."""
        quant = sum(math.prod(s) for n, (_, s) in self.tensors.items() if len(s) == 2 and not KEEP.search(n))
        return quant, self.params - quant


def folder_weights(path: Path) -> Weights:
    """Weights of a local model folder from its config.json and safetensors headers."""
    tensors, shards = {}, {}
    for f in sorted(Path(path).glob("*.safetensors")):
        shards[f.name] = f.stat().st_size
        for name, info in read_header(f)[1].items():
            if name != "__metadata__":
                tensors[name] = (info["dtype"], tuple(info["shape"]))
    config = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").is_file() else {}
    if not tensors:
        return config_weights(config)
    return Weights(tensors, shards, config)


def hub_weights(repo_id: str, revision: str | None) -> Weights:
    """Weights of a hub repo from its config.json and safetensors headers (HTTP range requests, no weights)."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    try:
        config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
        meta = get_safetensors_metadata(repo_id, revision=revision)
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: one line for the user
        raise QuantmillError(f"model.repo_id {repo_id!r}: cannot read config/headers ({type(exc).__name__}); "
                             "go online, set HF_TOKEN, or plan a local copy (model.path)") from None
    tensors, shards = {}, {}
    for fname, fm in meta.files_metadata.items():
        shards[fname] = 0
        for name, info in fm.tensors.items():
            tensors[name] = (info.dtype, tuple(info.shape))
            shards[fname] += DTYPE_BYTES.get(info.dtype, 4) * math.prod(info.shape)
    return Weights(tensors, shards, config)


def config_weights(config: dict[str, Any]) -> Weights:
    """Approximate weights of a decoder-only transformer from config.json alone (no headers available)."""
    h, layers = int(config.get("hidden_size") or 0), int(config.get("num_hidden_layers") or 0)
    inter, vocab = int(config.get("intermediate_size") or 4 * h), int(config.get("vocab_size") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    hd = int(config.get("head_dim") or h // heads)
    kv = int(config.get("num_key_value_heads") or heads) * hd
    dtype = {"float32": "F32", "float16": "F16"}.get(str(config.get("dtype") or config.get("torch_dtype")), "BF16")
    tensors = {"model.embed_tokens.weight": (dtype, (vocab, h))}
    if not config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = (dtype, (vocab, h))
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                  "self_attn.o_proj": (h, heads * hd), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                  "mlp.down_proj": (h, inter)}
        tensors.update({f"{p}{k}.weight": (dtype, s) for k, s in shapes.items()})
    w = Weights(tensors, {})
    return Weights(tensors, {"model.safetensors (estimated)": w.total}, config)
