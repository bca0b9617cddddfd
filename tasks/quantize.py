"""The quantize Prefect task: run one recipe's registered handler (quantmill.quantize.run) into the artifact store."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from quantmill.context import StepContext
from quantmill.errors import retry_on_transient
from quantmill.methods.checks import uses_calibration
from quantmill.profile import Recipe
from quantmill.quantize.run import run_method
from quantmill.refs import CalibRef, CheckpointRef, ModelRef
from quantmill.store import ArtifactStore
from quantmill.tasks._cache import StepCache
from quantmill.tasks._gpu import holding_gpu

CODE_VERSION = "1"


def _key_inputs(inputs: dict) -> dict:
    """Calibration only keys recipes that use it."""
    if not uses_calibration(inputs["recipe"]):
        inputs["calib"] = None
    return inputs


CACHE = StepCache(step="quantize", code_version=CODE_VERSION, normalize=_key_inputs)


@task(
    name="quantize",
    retries=1,
    retry_condition_fn=retry_on_transient,
    cache_policy=CACHE,
    persist_result=True,
)
def quantize(model: ModelRef, recipe: Recipe, *, calib: CalibRef | None, ctx: StepContext) -> CheckpointRef:
    """Quantize the model with one recipe; return a reference to the checkpoint folder."""
    key = CACHE.key_for(locals())  # the bound arguments, as Prefect's cache key sees them
    log = get_run_logger()
    calib = calib if uses_calibration(recipe) else None
    art = ArtifactStore(ctx.store_root).get_or_build(
        key, holding_gpu(ctx.device, lambda out: run_method(recipe, model, calib, ctx=ctx, out=out, log=log.info))
    )
    r = art.record
    return CheckpointRef(
        name=recipe.name, method=recipe.method, config=recipe.config().to_dict(), path=str(art.path),
        sha256=art.digest, size_bytes=art.size_bytes, base_sha256=model.sha256,
        calib_digest=calib.digest if calib else None, quantized_modules=r["quantized_modules"],
        kept_modules=r["kept_modules"], layer_errors=r["layer_errors"], extra=r["extra"], store_key=key,
    )
