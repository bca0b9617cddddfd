"""Calibrate step: tokenize the calibration text and draw seeded windows, saved as an artifact."""

from __future__ import annotations

from prefect import task

from quantmill.caching import StepCache
from quantmill.errors import QuantmillError, retry_on_transient
from quantmill.profile import Calibration
from quantmill.refs import CalibRef, ModelRef
from quantmill.store import ArtifactStore
from quantmill.textdata import draw_windows, read_documents, tokenize_stream

CODE_VERSION = "1"
TOKENS_FILE = "calibration.safetensors"


def build_calibration(model: ModelRef, spec: Calibration, out) -> dict:  # noqa: ANN001 - Path
    """Tokenize with the model's tokenizer and save `input_ids` [num_samples, seq_len]."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    ctx = model.summary.get("max_position_embeddings")
    if ctx and spec.seq_len > ctx:
        raise QuantmillError(
            f"calibration.seq_len: {spec.seq_len} exceeds the model's context of {ctx} tokens; lower it"
        )
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    stream = tokenize_stream(read_documents(spec.source, "calibration.source"), tokenizer)
    windows = draw_windows(stream, spec.num_samples, spec.seq_len, spec.seed)
    save_file({"input_ids": windows.contiguous()}, str(out / TOKENS_FILE), metadata={"source": spec.source.label})
    return {"tokens": int(windows.numel())}


CALIBRATE_CACHE = StepCache(step="calibrate", code_version=CODE_VERSION)


@task(
    name="calibrate",
    retries=2,
    retry_condition_fn=retry_on_transient,
    cache_policy=CALIBRATE_CACHE,
    persist_result=True,
)
def calibrate(model: ModelRef, spec: Calibration, store_root: str) -> CalibRef:
    """Draw `num_samples` windows of `seq_len` tokens with `seed`; return their digest."""
    key = CALIBRATE_CACHE.key_for({"model": model, "spec": spec})
    art = ArtifactStore(store_root).get_or_build(key, lambda out: build_calibration(model, spec, out))
    return CalibRef(
        path=str(art.path / TOKENS_FILE), digest=art.digest, num_samples=spec.num_samples,
        seq_len=spec.seq_len, seed=spec.seed, source=spec.source.label, store_key=key,
    )
