"""Merge step: fold a LoRA adapter into the base weights (quantmill.merging), or pass the base through.

The task keeps the cache key (the strategy changes memory use, not the result), the merged folder in the store, and
the `merge.on_failure` policy; strategies and QLoRA merge modes are described in quantmill.merging.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from quantmill.context import StepContext
from quantmill.merging import merge_lora
from quantmill.models import model_summary
from quantmill.profile import Merge, Source
from quantmill.refs import ModelRef
from quantmill.sources import resolve
from quantmill.store import ArtifactStore
from quantmill.tasks._cache import StepCache
from quantmill.tasks._gpu import gpu_slot

CODE_VERSION = "2"


def _verify(key: str, inputs: dict) -> str | None:
    """Merged folders live in the store; pass-through needs nothing."""
    if inputs.get("adapter") is None:
        return None
    return ArtifactStore(inputs["ctx"].store_root).verify(key)


def _key_inputs(inputs: dict) -> dict:
    """The strategy changes memory use, not the result (all compute the same fp32 math): not part of the key."""
    spec = inputs.get("spec") or Merge()
    inputs["spec"] = None if inputs.get("adapter") is None else spec.model_dump(mode="json", exclude={"strategy"})
    return inputs


def _logger():  # noqa: ANN202 - a logger
    """Prefect's run logger inside a task run, the module logger elsewhere."""
    with contextlib.suppress(Exception):
        return get_run_logger()
    return logging.getLogger("quantmill.merge")


MERGE_CACHE = StepCache(step="merge", code_version=CODE_VERSION, ignore=("device",), verifier=_verify,
                        normalize=_key_inputs)


# No retries: a merge is deterministic (a retry repeats the failure) and on_failure=skip_merge is the fallback.
@task(name="merge", retries=0, cache_policy=MERGE_CACHE, persist_result=True)
def merge(base: ModelRef, adapter: Source | None, *, spec: Merge | None = None, ctx: StepContext) -> ModelRef:
    """Merge the LoRA adapter into the base weights; without one, pass the base through."""
    key = MERGE_CACHE.key_for(locals())  # the bound arguments, as Prefect's cache key sees them
    if adapter is None:
        return base
    spec = spec or Merge()
    adapter_sha = None
    try:
        adapter_dir, adapter_sha = resolve(adapter, "adapter", ctx.store_root)
        art = ArtifactStore(ctx.store_root).get_or_build(
            key, lambda out: merge_lora(Path(base.path), adapter_dir, out, spec, slot=gpu_slot))
    except Exception as exc:
        if spec.on_failure == "stop":
            raise
        _logger().warning("merge failed (%s); merge.on_failure=skip_merge: continuing with the unmerged base", exc)
        skipped = {"skipped": True, "reason": str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__}
        return base.model_copy(update={"summary": {**base.summary, "merge": skipped}, "adapter_sha256": adapter_sha})
    record = dict(art.record)
    _logger().info("merged %s (%s strategy: %s)", adapter.label, record.pop("strategy", "?"), record.pop("strategy_reason", ""))
    return ModelRef(  # the summary keeps what defines the weights; the machine-dependent strategy stays in the store record
        path=str(art.path), sha256=art.digest, source=base.source, revision=base.revision,
        summary={**model_summary(art.path), "adapter_training": record.pop("adapter_training", None), "merge": record},
        adapter_sha256=adapter_sha, merged=True, store_key=key,
    )
