"""Preflight step: recipes fit the model and device, and the machine has the disk and memory."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
from prefect import task

from quantmill.errors import PreflightError, QuantmillError
from quantmill.profile import Recipe
from quantmill.refs import ModelRef
from tasks.quantize.step import check_recipe

OVERHEAD = 1.10  # configs, tokenizer, scales and zero points


def checkpoint_bytes(model: ModelRef, recipe: Recipe) -> int:
    """Expected size of one variant on disk: quantized linears plus full-precision rest."""
    params = int(model.summary.get("num_parameters") or 0)
    bits = recipe.config().weight_bits
    return int(params * bits / 8 * OVERHEAD + 2 * model.summary.get("vocab_size", 0) * model.summary.get("hidden_size", 0) * 2)


def disk_needed(model: ModelRef, recipes: list[Recipe]) -> int:
    """Bytes the run will write to the store (variants plus scratch for the largest one)."""
    sizes = [checkpoint_bytes(model, r) for r in recipes]
    return sum(sizes) + max(sizes, default=0)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def memory_needed(model: ModelRef) -> int:
    """Peak RAM of the largest in-memory step: the full-precision model twice (load + quantized copy)."""
    return int(model.summary.get("weight_bytes") or 0) * 2


@task(name="preflight")
def preflight(
    model: ModelRef, recipes: list[Recipe], device: str, store_root: str, optional: list[str] | None = None,
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
    need, free = disk_needed(model, valid), free_bytes(Path(store_root))
    if need > free:
        raise PreflightError(
            f"storage.root: {store_root} has {free:,} bytes free but this run needs about {need:,}; "
            "free some space or point storage.root at a larger disk"
        )
    ram, avail = memory_needed(model), psutil.virtual_memory().available
    if device == "cpu" and ram > avail:
        raise PreflightError(
            f"model: quantizing {model.source} on CPU needs about {ram:,} bytes of RAM, {avail:,} available; "
            "use a machine with more memory or a GPU"
        )
    return skipped
