"""The quantize Prefect task: run one recipe's registered handler into the artifact store."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from quantmill.context import StepContext
from quantmill.errors import QuantmillError, retry_on_transient
from quantmill.methods.checks import check_recipe, uses_calibration  # noqa: F401 - check_recipe re-exported
from quantmill.methods.registry import QuantizeJob, get_method
from quantmill.profile import Recipe
from quantmill.refs import CalibRef, CheckpointRef, ModelRef
from quantmill.store import ArtifactStore
from quantmill.tasks._cache import StepCache
from quantmill.tasks._gpu import holding_gpu
from quantmill.tasks.quantize.sensitivity import measured, sensitivity_params

CODE_VERSION = "1"
SIDECAR = "quantmill.json"


def run_method(
    recipe: Recipe, model: ModelRef, calib: CalibRef | None, *, ctx: StepContext, out: Path, log,  # noqa: ANN001 - a progress sink, Callable[[str], None]
) -> dict:
    """Call the method's handler (after any sensitivity a mixed-precision recipe needs); write the lineage sidecar."""
    device = ctx.device
    method = get_method(recipe.method)
    config = recipe.config()
    if uses_calibration(recipe) and calib is None:
        raise QuantmillError(f"recipes: {recipe.name!r} needs calibration data (method {recipe.method!r})")
    job = QuantizeJob(Path(model.path), out, Path(calib.path) if calib else None, device, log)
    found = None
    if getattr(config, "mixed_precision", None) is not None:  # measured once per model + calibration, then reused
        found = measured(model, calib, sensitivity_params(config), device, ctx.store_root, log)
        job = dataclasses.replace(job, sensitivity=found.values)
    result = method.handler(config, job)
    if found is not None:  # lineage: the stored measurement that chose the kept layers
        result.extra["mixed_precision"].update(sensitivity_key=found.store_key, sensitivity_digest=found.digest)
    sidecar = {
        "method": recipe.method, "name": recipe.name, "config": config.to_dict(),
        "base_sha256": model.sha256, "base_source": model.source, "base_revision": model.revision,
        "calibration_digest": calib.digest if calib else None, **dataclasses.asdict(result),
    }
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=str))
    return dataclasses.asdict(result)


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

