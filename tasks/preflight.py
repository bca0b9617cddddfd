"""Preflight step: recipes fit the model and device, and the machine has the disk and memory."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
from prefect import task

from quantmill import plan
from quantmill.errors import PreflightError, QuantmillError
from quantmill.profile import Calibration, Evaluation, Recipe
from quantmill.refs import ModelRef
from tasks.quantize.step import check_recipe


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


@task(name="preflight")
def preflight(
    model: ModelRef, recipes: list[Recipe], device: str, store_root: str, optional: list[str] | None = None, *,
    calibration: Calibration, evaluation: Evaluation,
) -> dict[str, str]:
    """Fail before heavy work: recipes valid for this model/device, enough disk and memory.

    Recipes named in `optional` (those a sweep grid generated) are skipped when invalid for this model or
    device instead of failing the run; returns {skipped recipe: reason}.
    """
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
    need, free = plan.disk_need(rows), free_bytes(Path(store_root))
    if need > free:
        raise PreflightError(
            f"storage.root: {store_root} has {free:,} bytes free but this run needs about {need:,}; "
            "free some space or point storage.root at a larger disk"
        )
    plan.refuse_unfit(rows, psutil.virtual_memory().available)
    return skipped
