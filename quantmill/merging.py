"""Merge math: fold a LoRA adapter into the full-precision base weights, shard by shard, within memory (core).

Strategies (profile `merge.strategy`, `auto` picks via `quantmill.estimates.choose_merge_strategy`):
`gpu` loads every tensor onto the GPU, `cpu` loads every tensor into RAM, `streaming` reads one
tensor at a time from each safetensors shard and writes the merged shard (peak ≈ adapter + the largest
tensor + a few MiB, below the largest shard + adapter). All three compute W + scale · B @ A in float32,
block of rows by block, and cast back to the base's dtype, so their outputs agree; the shard layout
and index are kept.
LoRA and rsLoRA scales, rank/alpha patterns, lora_bias, embeddings, modules_to_save and DoRA on linear layers
(m · (W + ΔW) / ‖W + ΔW‖ per output row, as peft merges it) are supported; other peft types are refused.

QLoRA (`merge.qlora_merge`): an adapter trained on a bitsandbytes 4-bit base learned a correction
of the *quantized* weights Q(W), not of W.
- `full_precision` (default) merges into W: W + ΔW. Choose it when the merged model is served in
  16-bit or re-quantized with another method (GPTQ, AWQ, int8, fp8): the base keeps its full
  quality and the small mismatch (ΔW was fitted on Q(W)) rarely matters for short fine-tunes.
- `dequantized` merges into the base as training saw it: dequant(quant_nf4(W)) + ΔW for each
  targeted linear (same quant type, block size 64 and double-quant as training). Choose it when the
  adapter is tightly fitted to the quantization noise (long training, high rank, quality drops
  after a full_precision merge) or the merged model is re-quantized to NF4 anyway; compare both
  with the evaluate step when unsure. Untargeted weights stay full precision.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantmill.adapters import check_adapter, detect_training, pattern_value
from quantmill.errors import QuantmillError
from quantmill.estimates import choose_merge_strategy
from quantmill.integrity import check_safetensors
from quantmill.models import META_PATTERNS
from quantmill.profile import Merge
from quantmill.safetensors_io import copy_range, read_header, read_tensor, tensor_entries, write_header, write_tensor
from quantmill.weights import folder_weights

PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.default)?(?:\.(weight|bias))?$")
ROW_ELEMS = 1 << 20  # fp32 elements of one block of merged rows


@dataclass
class Adapter:
    """LoRA factors per base weight name, their scales, and full tensors that replace base tensors."""

    a: dict[str, Any] = field(default_factory=dict)
    b: dict[str, Any] = field(default_factory=dict)
    bias: dict[str, Any] = field(default_factory=dict)
    embedding: set[str] = field(default_factory=set)
    magnitude: dict[str, Any] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    full: dict[str, Any] = field(default_factory=dict)
    transpose: bool = False
    nbytes: int = 0


def load_adapter(adapter_dir: Path, cfg: dict) -> Adapter:
    """Read adapter_model.safetensors into factors keyed by the base weight they modify."""
    from safetensors.torch import load_file

    ad = Adapter(transpose=bool(cfg.get("fan_in_fan_out")))
    for key, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        ad.nbytes += t.numel() * t.element_size()
        k = key.removeprefix(PREFIX)
        m = LORA_KEY.match(k)
        if m is None:
            if "lora_" in k:
                raise QuantmillError(f"adapter: tensor {key} is not a plain LoRA factor; this adapter type cannot be merged")
            ad.full[k.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = t
            continue
        module, kind, part = m.groups()
        target = f"{module}.weight"
        if kind.startswith("lora_embedding"):
            ad.embedding.add(target)
        if kind == "lora_magnitude_vector":
            ad.magnitude[target] = t
        elif part == "bias":
            ad.bias[f"{module}.bias"] = t
        else:
            (ad.a if kind.endswith("A") else ad.b)[target] = t
    for target, a in ad.a.items():
        if target not in ad.b:
            raise QuantmillError(f"adapter: {target} has lora_A but no lora_B; the adapter file is incomplete")
        if bool(cfg.get("use_dora")) != (target in ad.magnitude) or (target in ad.magnitude and target in ad.embedding):
            raise QuantmillError(f"adapter: the DoRA magnitude of {target} is missing or on an embedding; only DoRA on linear layers merges")
        module = target.removesuffix(".weight")
        alpha = pattern_value(cfg, "alpha_pattern", module, cfg.get("lora_alpha", 8))
        r, declared = a.shape[0], pattern_value(cfg, "rank_pattern", module, cfg.get("r", 8))
        if r != declared or ad.b[target].shape[-1] != r:
            raise QuantmillError(f"adapter: r: adapter_config.json declares rank {declared} for {module} but its "
                                 f"lora_A/lora_B tensors have rank {r}; the config does not match the weights")
        ad.scale[target] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return ad


@dataclass
class MergeJob:
    """What every strategy needs: the adapter, the QLoRA quantization to replay (or None) and where to compute."""

    adapter: Adapter
    quant: dict[str, Any] | None
    device: str = "cpu"


def merged_tensor(name: str, t, job: MergeJob):  # noqa: ANN001, ANN201 - torch.Tensor
    """The output tensor for base tensor `name`: t, t + scale·B@A (fp32 math, t's dtype), or a replacement."""
    import torch

    ad = job.adapter
    if name in ad.full:
        if ad.full[name].shape != t.shape:
            raise QuantmillError(f"adapter: it replaces {name} with shape {list(ad.full[name].shape)} but the base has "
                                 f"{list(t.shape)} (resized vocabulary?); merge it with peft yourself")
        t = ad.full[name].to(t.device, t.dtype, copy=True)
    if name in ad.bias:
        return (t.float() + ad.bias[name].to(t.device).float() * ad.scale[name.removesuffix(".bias") + ".weight"]).to(t.dtype)
    if name not in ad.a:
        return t
    if not t.is_floating_point() or t.element_size() < 2:
        raise QuantmillError(f"model: {name} is {t.dtype}; a LoRA merges into a 16/32-bit float base only")
    w, q = t.to(job.device), job.quant  # a buffer this merge owns: merged in place, block of rows by block
    if q and name not in ad.embedding and not any(s and s in name for s in ["lm_head", *q["skip_modules"]]):
        if q["bits"] != 4:
            raise QuantmillError(f"merge.qlora_merge: dequantized supports 4-bit QLoRA bases, this adapter used {q['bits']}-bit")
        import bitsandbytes.functional as bnbf  # W as the 4-bit base saw it in training: dequantize(quantize_4bit(W))

        w = bnbf.dequantize_4bit(*bnbf.quantize_4bit(w, blocksize=q["blocksize"], compress_statistics=q["double_quant"],
                                                     quant_type=q["quant_type"]))
    b, a = ad.b[name].to(job.device, torch.float32), ad.a[name].to(job.device, torch.float32)
    flip, step = ad.transpose or name in ad.embedding, max(1, ROW_ELEMS // w.shape[1])
    for r in range(0, w.shape[0], step):  # fp32 temporaries stay below ROW_ELEMS elements whatever the tensor size
        part = (b @ a[:, r : r + step]).T if flip else b[r : r + step] @ a
        part.mul_(ad.scale[name]).add_(w[r : r + step])
        if name in ad.magnitude:  # DoRA: rescale each output row of W + ΔW to its learned magnitude
            part.mul_((ad.magnitude[name][r : r + step].to(job.device, torch.float32) / part.norm(dim=1)).view(-1, 1))
        w[r : r + step] = part
    return w


def stream_shard(src: Path, dst: Path, job: MergeJob) -> None:
    """Write `dst` from `src` one tensor at a time: touched tensors merged, the rest copied as bytes."""
    raw, header, start = read_header(src)
    with open(src, "rb") as fh, open(dst, "wb") as out:
        write_header(out, raw)
        for name, info in tensor_entries(header):
            lo, hi = info["data_offsets"]
            if name in job.adapter.a or name in job.adapter.full or name in job.adapter.bias:
                write_tensor(out, merged_tensor(name, read_tensor(fh, start, info), job))
            else:
                copy_range(fh, out, start + lo, hi - lo)


def memory_merge(shards: list[Path], out_dir: Path, job: MergeJob) -> None:
    """Load every tensor (onto job.device), merge them all, then write the shards."""
    loaded = {}
    for src in shards:
        raw, header, start = read_header(src)
        with open(src, "rb") as fh:
            loaded[src] = (raw, {n: read_tensor(fh, start, i).to(job.device) for n, i in tensor_entries(header)})
    for tensors in (t for _, t in loaded.values()):
        for name in tensors:
            tensors[name] = merged_tensor(name, tensors[name], job)
    for src, (raw, tensors) in loaded.items():
        with open(out_dir / src.name, "wb") as out:
            write_header(out, raw)
            for t in tensors.values():
                write_tensor(out, t)


def check_targets(shards: list[Path], ad: Adapter, cfg: dict, architecture: str) -> None:
    """Every adapted or replaced tensor exists in the base shards; target_modules name real modules."""
    names = {n: i["shape"] for s in shards for n, i in read_header(s)[1].items() if n != "__metadata__"}
    modules = {n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n in names if "." in n}
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        missing = [] if targets == "all-linear" or any(re.fullmatch(targets, n.rsplit(".", 1)[0]) for n in names) else [targets]
    else:
        missing = sorted(t for t in targets if t not in modules and t != "all-linear")
    if missing:
        raise QuantmillError(f"adapter: target modules {', '.join(missing)} do not exist in the base model "
                             f"({architecture}); the adapter was trained for another model")
    absent = sorted((set(ad.a) | set(ad.full) | set(ad.bias)) - set(names))
    if absent:
        tied = " (tied to the embeddings)" if absent[0].startswith("lm_head") else ""
        raise QuantmillError(f"adapter: it modifies {absent[0]}{tied}, which the base model's shards do not hold; "
                             f"the adapter's base ({cfg.get('base_model_name_or_path')}) differs from this model or ties it")
    for name, a in ad.a.items():
        shape = [ad.b[name].shape[0], a.shape[1]]
        if ad.transpose or name in ad.embedding:
            shape.reverse()
        if shape != list(names[name]):
            raise QuantmillError(f"adapter: its weights do not fit the base model ({name}: delta {shape} vs weight "
                                 f"{names[name]}); the adapter's base ({cfg.get('base_model_name_or_path')}) differs from this model")


def merge_lora(base_dir: Path, adapter_dir: Path, out_dir: Path, spec: Merge | None = None, *,
               slot: Callable[[str], AbstractContextManager[Any]] = lambda _device: contextlib.nullcontext()) -> dict[str, Any]:
    """Merge the adapter into the safetensors shards of `base_dir`, writing `out_dir`; returns the merge record.
    `slot(device)` is held while the merge computes (the step passes its GPU concurrency slot)."""
    spec = spec or Merge()
    cfg = check_adapter(adapter_dir)
    base_cfg = json.loads((base_dir / "config.json").read_text())
    if base_cfg.get("quantization_config"):
        raise QuantmillError(f"model: {base_dir} holds quantized weights ({base_cfg['quantization_config'].get('quant_method')}); "
                             "a LoRA merges into the full-precision base only: point model at the original checkpoint")
    shards = sorted(base_dir.glob("*.safetensors"))
    if not shards:
        raise QuantmillError(f"model: {base_dir} has no *.safetensors; the merge reads safetensors shards only")
    training = detect_training(adapter_dir, cfg, base_dir, spec.adapter_training)
    ad = load_adapter(adapter_dir, cfg)
    check_targets(shards, ad, cfg, (base_cfg.get("architectures") or ["?"])[0])
    weights = folder_weights(base_dir)
    strategy, reason = choose_merge_strategy(weights, ad.nbytes, spec.strategy)
    dequantized = spec.qlora_merge == "dequantized" and training["method"] == "qlora"
    job = MergeJob(ad, training["quantization"] if dequantized else None, "cuda" if strategy == "gpu" else "cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    with slot(job.device):
        if strategy == "streaming":
            for src in shards:
                stream_shard(src, out_dir / src.name, job)
        else:
            memory_merge(shards, out_dir, job)
    for shard in sorted(out_dir.glob("*.safetensors")):  # what was written covers its header exactly
        check_safetensors(shard, "merge output")
    for pattern in (*META_PATTERNS, "*.safetensors.index.json"):
        for f in base_dir.glob(pattern):
            shutil.copy2(f, out_dir / f.name)
    return {"adapter_training": training, "strategy": strategy, "strategy_reason": reason,
            "qlora_merge": "dequantized" if dequantized else "full_precision", "lora_modules": len(ad.a), "dora": bool(ad.magnitude),
            "replaced_tensors": sorted(set(ad.full) | set(ad.bias)), "rslora": bool(cfg.get("use_rslora"))}
