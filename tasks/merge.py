"""Merge step: fold a LoRA adapter into the full-precision base weights (or pass through)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from quantmill.caching import StepCache
from quantmill.errors import QuantmillError
from quantmill.models import model_summary
from quantmill.profile import Source
from quantmill.refs import ModelRef
from quantmill.store import ArtifactStore
from tasks.download import resolve
from tasks.quantize.common import copy_tokenizer

CODE_VERSION = "1"


def check_adapter(adapter_dir: Path, base: ModelRef) -> dict:
    """Refuse adapters that cannot belong to this base model; return the adapter config."""
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise QuantmillError(f"adapter: {adapter_dir} has no adapter_config.json; point at a peft adapter folder")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise QuantmillError(f"adapter: peft_type {cfg.get('peft_type')!r} is not supported; only LoRA adapters merge")
    if cfg.get("use_dora"):
        raise QuantmillError("adapter: DoRA adapters are not supported yet; merge it with peft yourself")
    return cfg


def merge_lora(base: ModelRef, adapter_dir: Path, out: Path) -> None:
    """peft merge_and_unload into fp32 base weights, saved as safetensors with the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = check_adapter(adapter_dir, base)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    missing = sorted(t for t in targets if t not in names and t != "all-linear")
    if missing:
        raise QuantmillError(
            f"adapter: target modules {', '.join(missing)} do not exist in the base model "
            f"({base.summary.get('architecture')}); the adapter was trained for another model"
        )
    try:
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except RuntimeError as exc:
        if "size mismatch" in str(exc):
            raise QuantmillError(
                f"adapter: its weights do not fit the base model ({str(exc).splitlines()[1].strip()}); "
                f"the adapter's base ({cfg.get('base_model_name_or_path')}) differs from model {base.source}"
            ) from None
        raise
    merged.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(Path(base.path), out)


def _verify(key: str, inputs: dict) -> str | None:
    """Merged folders live in the store; pass-through needs nothing."""
    if inputs.get("adapter") is None:
        return None
    return ArtifactStore(inputs["store_root"]).verify(key)


MERGE_CACHE = StepCache(step="merge", code_version=CODE_VERSION, verifier=_verify)


@task(
    name="merge",
    retries=2,
    retry_condition_fn=lambda t, r, s: False,
    cache_policy=MERGE_CACHE,
    persist_result=True,
)
def merge(base: ModelRef, adapter: Source | None, store_root: str) -> ModelRef:
    """Merge the LoRA adapter into the base weights; without one, pass the base through."""
    if adapter is None:
        return base
    adapter_dir, adapter_sha = resolve(adapter, "adapter", store_root)
    key = MERGE_CACHE.key_for({"base": base, "adapter": adapter})
    art = ArtifactStore(store_root).get_or_build(key, lambda out: merge_lora(base, adapter_dir, out) or {})
    return ModelRef(
        path=str(art.path), sha256=art.digest, source=base.source, revision=base.revision,
        summary=model_summary(art.path), adapter_sha256=adapter_sha, merged=True, store_key=key,
    )
