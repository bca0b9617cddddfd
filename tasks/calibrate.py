"""Calibrate step: prepare the calibration text and draw seeded windows (or samples with masks), saved as an artifact.

The artifact holds `input_ids` [num_samples, seq_len] for `mode: packed`; for `mode: samples`, `input_ids`
[num_samples, longest] right-padded and `attention_mask` (1 on real tokens). Its metadata names the source, mode and
preparation, so its digest changes when any of them does.
"""

from __future__ import annotations

from prefect import task

from quantmill.context import StepContext
from quantmill.errors import QuantmillError, retry_on_transient
from quantmill.profile import Calibration
from quantmill.refs import CalibRef, ModelRef
from quantmill.safetensors_io import canonical_safetensors
from quantmill.store import ArtifactStore
from quantmill.tasks._cache import StepCache
from quantmill.textdata import draw_samples, draw_windows, token_stream

CODE_VERSION = "2"  # 2: .txt read as one document, rows joined with "\n\n" by default
TOKENS_FILE = "calibration.safetensors"


def build_calibration(model: ModelRef, spec: Calibration, out) -> dict:  # noqa: ANN001 - Path
    """Tokenize with the model's tokenizer and save the windows (packed) or padded samples with their mask."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    ctx = model.summary.get("max_position_embeddings")
    if ctx and spec.seq_len > ctx:
        raise QuantmillError(
            f"calibration.seq_len: {spec.seq_len} exceeds the model's context of {ctx} tokens; lower it"
        )
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    field = "calibration.source"
    if spec.mode == "samples":
        tensors = draw_samples(spec.source, field, tokenizer, spec.num_samples, spec.seq_len, spec.seed)
    else:  # hub datasets: rows shuffled with the seed, read only until num_samples windows fill
        hub = spec.source.path is None
        stream = token_stream(spec.source, field, tokenizer, spec.num_samples * spec.seq_len if hub else None,
                              seed=spec.seed if hub else None)
        tensors = {"input_ids": draw_windows(stream, spec.num_samples, spec.seq_len, spec.seed)}
    meta = {"source": spec.source.label, "mode": str(spec.mode), "preparation": spec.source.preparation}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / TOKENS_FILE), metadata=meta)
    canonical_safetensors(out / TOKENS_FILE)  # same windows, same bytes: a rebuilt calibration keeps its digest
    mask = tensors.get("attention_mask")
    return {"tokens": int(mask.sum() if mask is not None else tensors["input_ids"].numel()), **meta}


CALIBRATE_CACHE = StepCache(step="calibrate", code_version=CODE_VERSION, ignore=("device",))


@task(
    name="calibrate",
    retries=2,
    retry_condition_fn=retry_on_transient,
    cache_policy=CALIBRATE_CACHE,
    persist_result=True,
)
def calibrate(model: ModelRef, spec: Calibration, *, ctx: StepContext) -> CalibRef:
    """Draw `num_samples` windows (or samples) of at most `seq_len` tokens with `seed`; return their digest."""
    key = CALIBRATE_CACHE.key_for(locals())  # the bound arguments, as Prefect's cache key sees them
    art = ArtifactStore(ctx.store_root).get_or_build(key, lambda out: build_calibration(model, spec, out))
    return CalibRef(
        path=str(art.path / TOKENS_FILE), digest=art.digest, num_samples=spec.num_samples,
        seq_len=spec.seq_len, seed=spec.seed, source=spec.source.label, store_key=key, mode=str(spec.mode),
        preparation=spec.source.preparation,
    )
