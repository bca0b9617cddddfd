"""Run one recipe's registered handler (after any sensitivity a mixed-precision recipe needs) into a folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from quantmill.context import StepContext
from quantmill.errors import QuantmillError
from quantmill.methods.checks import uses_calibration
from quantmill.methods.registry import QuantizeJob, get_method
from quantmill.profile import Recipe
from quantmill.quantize.sensitivity import measured, sensitivity_params
from quantmill.refs import CalibRef, ModelRef

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
