"""Small typed records that steps pass to each other: paths plus content hashes, never tensors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Ref(BaseModel):
    """Base record; `identity()` is what cache keys use (content, not location)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def identity(self) -> dict[str, Any]:
        """Fields that define the content (paths excluded)."""
        return self.model_dump(mode="json", exclude={"path", "store_key", "cached"})


class ModelRef(Ref):
    """A full-precision model folder: where, what, and its content hash."""

    path: str
    sha256: str
    source: str
    revision: str | None = None
    summary: dict[str, Any] = {}
    adapter_sha256: str | None = None
    merged: bool = False
    store_key: str | None = None


class CalibRef(Ref):
    """Tokenized calibration windows saved as safetensors (`input_ids` [n, seq_len])."""

    path: str
    digest: str
    num_samples: int
    seq_len: int
    seed: int
    source: str
    store_key: str
    mode: str = "packed"  # or "samples": padded rows with an attention_mask
    preparation: str = ""


class CheckpointRef(Ref):
    """A quantized variant's checkpoint folder."""

    name: str
    method: str
    config: dict[str, Any]
    path: str
    sha256: str
    size_bytes: int
    base_sha256: str
    calib_digest: str | None
    quantized_modules: list[str] = []
    kept_modules: list[str] = []
    layer_errors: dict[str, float] = {}
    extra: dict[str, Any] = {}
    store_key: str


class EvalRef(Ref):
    """Evaluation of one model (baseline or variant) on the held-out windows."""

    name: str
    method: str
    path: str
    metrics: dict[str, float]
    eval_digest: str
    store_key: str
    data: dict[str, Any] = {}  # what the perplexity is over: EvalDataRef.description()


class Verdict(Ref):
    """A variant's gate outcome."""

    name: str
    passed: bool
    reasons: list[str] = []
    limits: dict[str, float] = {}


class EvalDataRef(Ref):
    """Held-out token windows shared by the baseline and every variant."""

    path: str
    digest: str
    window: int
    tokens: int
    source: str
    store_key: str
    stride: int | None = None
    windows: int | None = None
    preparation: str = ""

    def description(self) -> dict[str, Any]:
        """What a perplexity on these windows means: source, text preparation, window, stride, scored tokens."""
        return {"source": self.source, "preparation": self.preparation, "window": self.window, "stride": self.stride,
                "windows": self.windows, "tokens": self.tokens}


class Lineage(BaseModel):
    """The refs every variant of a run descends from, as one record (two ModelRefs cannot trade places)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: ModelRef  # the downloaded base model
    model: ModelRef  # the model that was quantized: the base merged with the adapter, or the base itself
    calib: CalibRef | None
    data: EvalDataRef
    baseline: EvalRef  # the model's own evaluation on `data`


class Variant(BaseModel):
    """One variant's chain: its checkpoint, evaluation, gate verdict and registered version (None: not registered)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ckpt: CheckpointRef
    result: EvalRef
    verdict: Verdict
    version: str | None = None
