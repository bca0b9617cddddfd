"""The quantize Prefect task: run one recipe's registered handler into the artifact store."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from quantmill.caching import StepCache
from quantmill.errors import QuantmillError, retry_on_transient
from quantmill.profile import Recipe
from quantmill.refs import CalibRef, CheckpointRef, ModelRef
from quantmill.store import ArtifactStore
from tasks.quantize.common import model_info
from tasks.quantize.registry import QuantizeJob, get_method

CODE_VERSION = "1"
SIDECAR = "quantmill.json"


def check_recipe(recipe: Recipe, index: int, model: ModelRef, device: str) -> None:
    """Fail before any work when a recipe cannot run on this model or device."""
    config = recipe.config()
    try:
        config.check_device(device)
        config.check_model(model_info(Path(model.path)))
    except ValueError as exc:
        raise QuantmillError(f"recipes.{index} ({recipe.name}): {exc}") from None


def run_method(recipe: Recipe, model: ModelRef, calib: CalibRef | None, device: str, out: Path, log) -> dict:  # noqa: ANN001
    """Call the method's handler and write the lineage sidecar next to the weights."""
    method = get_method(recipe.method)
    config = recipe.config()
    if method.calibrated and calib is None:
        raise QuantmillError(f"recipes: method {recipe.method!r} needs calibration data")
    job = QuantizeJob(Path(model.path), out, Path(calib.path) if calib else None, device, log)
    result = method.handler(config, job)
    sidecar = {
        "method": recipe.method, "name": recipe.name, "config": config.to_dict(),
        "base_sha256": model.sha256, "base_source": model.source, "base_revision": model.revision,
        "calibration_digest": calib.digest if calib else None, **dataclasses.asdict(result),
    }
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=str))
    return dataclasses.asdict(result)


def _key_inputs(inputs: dict) -> dict:
    """Calibration only keys methods that use it."""
    if not get_method(inputs["recipe"].method).calibrated:
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
def quantize(model: ModelRef, recipe: Recipe, calib: CalibRef | None, device: str, store_root: str) -> CheckpointRef:
    """Quantize the model with one recipe; return a reference to the checkpoint folder."""
    log = get_run_logger()
    key = CACHE.key_for({"model": model, "recipe": recipe, "calib": calib, "device": device})
    calib = calib if get_method(recipe.method).calibrated else None
    art = ArtifactStore(store_root).get_or_build(
        key, lambda out: run_method(recipe, model, calib, device, out, log.info)
    )
    r = art.record
    return CheckpointRef(
        name=recipe.name, method=recipe.method, config=recipe.config().to_dict(), path=str(art.path),
        sha256=art.digest, size_bytes=art.size_bytes, base_sha256=model.sha256,
        calib_digest=calib.digest if calib else None, quantized_modules=r["quantized_modules"],
        kept_modules=r["kept_modules"], layer_errors=r["layer_errors"], extra=r["extra"], store_key=key,
    )

