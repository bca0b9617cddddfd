"""Download step: a pinned hub snapshot (weights, config, tokenizer) or a hashed local folder."""

from __future__ import annotations

from prefect import task

from quantmill.context import StepContext
from quantmill.integrity import check_tokenizer
from quantmill.models import check_model_dir, model_summary
from quantmill.profile import Source
from quantmill.refs import ModelRef
from quantmill.sources import CODE_VERSION, _key, resolve
from quantmill.store import ArtifactStore
from quantmill.tasks._cache import StepCache, network_retries


def _verify(key: str, inputs: dict) -> str | None:
    """Hub snapshots must still be intact in the store; local folders are keyed by their files."""
    source: Source = inputs["source"]
    if source.path is not None:
        return None
    return ArtifactStore(inputs["ctx"].store_root).verify(_key(source, "model"))


@task(
    name="download",
    **network_retries(4, backoff_factor=5),
    cache_policy=StepCache(step="download", code_version=CODE_VERSION, ignore=("device",), verifier=_verify),
    persist_result=True,
)
def download(source: Source, *, ctx: StepContext) -> ModelRef:
    """Fetch (or hash) the base model; return a reference with its content hash."""
    path, digest = resolve(source, "model", ctx.store_root)
    check_model_dir(path, "model.path", source.allow_pickle, source.trust_remote_code)
    check_tokenizer(path, "model.path")
    return ModelRef(
        path=str(path), sha256=digest, source=source.label, revision=source.revision,
        summary=model_summary(path),
    )
