"""LoRA adapter folders read without loading them: config checks and how the adapter was trained (core floor).

Used by the merge (quantmill/merging.py), the plan and `quantmill validate`; json/yaml/re only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from quantmill.errors import QuantmillError

QLORA_NAME = re.compile(r"(?i)(q-?lora|bnb|nf4|[-_.]4-?bit)")
# adapter_config options whose merge is not (a rescaled) W + scale·B@A
UNSUPPORTED = ("use_qalora", "use_bdlora", "target_parameters", "layer_replication", "trainable_token_indices",
               "alora_invocation_tokens", "arrow_config")
NF4 = {"bits": 4, "quant_type": "nf4", "blocksize": 64, "double_quant": False, "skip_modules": []}


def check_adapter(adapter_dir: Path) -> dict:
    """The adapter config, refusing peft types and options whose merge is not W + scale · B @ A."""
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise QuantmillError(f"adapter: {adapter_dir} has no adapter_config.json; point at a peft adapter folder")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise QuantmillError(f"adapter: peft_type {cfg.get('peft_type')!r} is not supported; only LoRA adapters merge")
    if cfg.get("use_dora") and cfg.get("fan_in_fan_out"):
        raise QuantmillError(f"adapter: DoRA with fan_in_fan_out (GPT-2 style Conv1D) in {cfg_file} is not supported; merge it with peft")
    for key in UNSUPPORTED:
        if cfg.get(key):
            raise QuantmillError(f"adapter: {key} is set in {cfg_file}; that LoRA variant cannot be merged into the weights")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise QuantmillError(f"adapter: {adapter_dir} has no adapter_model.safetensors; save the adapter with safetensors")
    for key, ranks in (("r", {"r": cfg.get("r", 8)}), ("rank_pattern", cfg.get("rank_pattern") or {})):
        bad = next(((k, v) for k, v in ranks.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0), None)
        if bad:
            raise QuantmillError(f"adapter: {key}: {bad[1]!r}{'' if key == 'r' else f' for {bad[0]!r}'} in {cfg_file} "
                                 "is not a positive LoRA rank; fix the adapter config (peft writes the rank it trained)")
    return cfg


def pattern_value(cfg: dict, pattern_key: str, module: str, default: Any) -> Any:
    """peft's rank/alpha_pattern lookup: the first key matching a suffix of the module name, else the default."""
    return next((v for k, v in (cfg.get(pattern_key) or {}).items() if re.match(rf"(.*\.)?({k})$", module)), default)


def _flat(node: Any, out: dict[str, Any]) -> dict[str, Any]:
    """Every scalar key: value pair of a nested JSON/YAML document, keys lower-cased (last one wins)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        if isinstance(v, dict) or isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
            _flat(v, out)
        elif isinstance(k, str):
            out[k.lower()] = v
    return out


def quant_facts(doc: dict[str, Any]) -> dict[str, Any]:
    """Base-model quantization settings named in one training/config document (empty when none)."""
    f = _flat(doc, {})
    bits = 4 if str(f.get("load_in_4bit")).lower() == "true" else 8 if str(f.get("load_in_8bit")).lower() == "true" else None
    if bits is None and str(f.get("quantization_bit")) in {"4", "8"}:
        bits = int(f["quantization_bit"])
    if bits is None and str(f.get("adapter", "")).lower() == "qlora":
        bits = 4
    if bits is None:
        return {}
    facts = {"bits": bits, "quant_type": str(f.get("bnb_4bit_quant_type") or "nf4").lower(), "blocksize": 64,
             "double_quant": str(f.get("bnb_4bit_use_double_quant") or f.get("double_quantization")).lower() == "true"}
    skip = f.get("llm_int8_skip_modules")
    return {**facts, "skip_modules": list(skip) if isinstance(skip, list) else []}


def _documents(adapter_dir: Path) -> list[tuple[str, dict]]:
    """Config-like files next to the adapter (JSON/YAML under 1 MiB, tokenizer files excluded), parsed."""
    import yaml

    docs = []
    for p in sorted(adapter_dir.iterdir()):
        if p.suffix in {".json", ".yaml", ".yml"} and not p.name.startswith(("tokenizer", "special_tokens", "vocab")) \
                and p.stat().st_size < 1 << 20:
            try:
                docs.append((p.name, yaml.safe_load(p.read_text())))  # YAML also reads JSON
            except (yaml.YAMLError, UnicodeDecodeError):
                continue
    return [(name, d) for name, d in docs if isinstance(d, dict)]


def _readme_block(adapter_dir: Path) -> dict[str, Any]:
    """The `bitsandbytes quantization config was used during training` list of a peft model card."""
    readme = adapter_dir / "README.md"
    text = readme.read_text(errors="replace") if readme.is_file() else ""
    m = re.search(r"bitsandbytes` quantization config was used during training:\n((?:- .*\n?)+)", text)
    return dict(re.findall(r"^- (\w+): (.*)$", m.group(1), re.M)) if m else {}


def detect_training(adapter_dir: Path, cfg: dict, base_dir: Path | None, declared: str = "auto") -> dict[str, Any]:
    """How the adapter was trained (`lora`, or `qlora` on a bnb 4-bit base) and the evidence for it."""
    sources = [*_documents(adapter_dir), ("README.md (peft model card)", {"q": _readme_block(adapter_dir)})]
    if base_dir is not None and (base_dir / "config.json").is_file():
        sources.append(("base config.json", {"q": json.loads((base_dir / "config.json").read_text()).get("quantization_config")}))
    found = [(name, facts) for name, doc in sources if (facts := quant_facts(doc))]
    if cfg.get("loftq_config"):
        found.append(("adapter_config.json loftq_config", {**NF4, "bits": int(cfg["loftq_config"].get("loftq_bits", 4))}))
    evidence = [f"{name}: {f['bits']}-bit {f['quant_type']} base" for name, f in found]
    for label, name in (("adapter folder", adapter_dir.name), ("base_model_name_or_path", cfg.get("base_model_name_or_path"))):
        if name and QLORA_NAME.search(Path(str(name)).name):
            evidence.append(f"{label} name {Path(str(name)).name!r} suggests a quantized base")
    named = len(evidence) > len(found)
    if (adapter_dir / "training_args.bin").is_file():
        evidence.append("training_args.bin present (pickle, not read)")
    if declared != "auto":
        evidence.insert(0, f"declared in the profile: merge.adapter_training={declared}")
    method = declared if declared != "auto" else "qlora" if found or named else "lora"
    confidence = "declared" if declared != "auto" else "config" if found else "name" if named else "none"
    return {"method": method, "quantization": (found[0][1] if found else dict(NF4)) if method == "qlora" else None,
            "evidence": evidence or ["no quantization settings or naming found"], "confidence": confidence}
