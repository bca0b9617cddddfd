"""Preflight: the run's inputs, folders and disk checked before the first heavy step; recipes fit model and device.

`check_inputs` runs first in every flow (before download and merge, before the MLflow run exists): local paths,
safetensors headers, tokenizer files, adapter config, text lengths (with the tokenizer alone), writable
`storage.root` and MLflow artifact root, and free disk for every step's output (from headers and the plan).
Its body is `quantmill.inputs.check_run_inputs`, which `quantmill run` also calls before Prefect starts.
"""

from __future__ import annotations

from pathlib import Path

import psutil
from prefect import task

from quantmill import inputs, plan
from quantmill.context import StepContext
from quantmill.errors import PreflightError, QuantmillError
from quantmill.methods.checks import check_recipe
from quantmill.profile import Calibration, Evaluation, Profile
from quantmill.recipes import Recipe
from quantmill.refs import ModelRef


@task(name="preflight")
def preflight(
    model: ModelRef, recipes: list[Recipe], *, optional: list[str] | None = None, calibration: Calibration,
    evaluation: Evaluation, ctx: StepContext,
) -> dict[str, str]:
    """Fail before heavy work: recipes valid for this model/device, enough disk and memory.

    Recipes named in `optional` (those a sweep grid generated) are skipped when invalid for this model or
    device instead of failing the run; returns {skipped recipe: reason}.
    """
    device, store_root = ctx.device, ctx.store_root
    skipped: dict[str, str] = {}
    valid = []
    for i, recipe in enumerate(recipes):
        try:
            check_recipe(recipe, i, model, device)
            valid.append(recipe)
        except QuantmillError as exc:
            if recipe.name not in (optional or []):
                raise
            skipped[recipe.name] = str(exc).split(": ", 1)[-1]
    if not valid:
        raise PreflightError("sweep.grid: no recipe fits this model and device: "
                             + "; ".join(f"{name}: {why}" for name, why in skipped.items()))
    rows = plan.preflight_rows(Path(model.path), valid, calibration, evaluation, device)  # the one estimator
    need, free = plan.disk_need(rows), inputs.free_bytes(Path(store_root))
    if need > free:
        raise PreflightError(
            f"storage.root: {store_root} has {free:,} bytes free but this run needs about {need:,}; "
            "free some space or point storage.root at a larger disk"
        )
    plan.refuse_unfit(rows, psutil.virtual_memory().available)
    return skipped


@task(name="check-inputs")
def check_inputs(profile: Profile) -> None:
    """Fail before download and merge: local inputs, writable folders, text lengths, free disk for the whole run."""
    inputs.check_run_inputs(profile)
