"""Checks of a recipe against the model and device, before any work (core floor; torch only through model_info)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from quantmill.errors import QuantmillError
from quantmill.methods.registry import get_method

if TYPE_CHECKING:
    from quantmill.recipes import Recipe
    from quantmill.refs import ModelRef


def check_recipe(recipe: Recipe, index: int, model: ModelRef, device: str) -> None:
    """Fail before any work when a recipe cannot run on this model or device."""
    from quantmill.modelinfo import (
        model_info,  # torch (meta device): only when a model is checked
    )

    config = recipe.config()
    try:
        config.check_device(device)
        config.check_model(model_info(Path(model.path)))
    except ValueError as exc:
        raise QuantmillError(f"recipes.{index} ({recipe.name}): {exc}") from None


def uses_calibration(recipe: Recipe) -> bool:
    """Calibrated methods, and mixed-precision recipes (their per-layer sensitivity is measured on it)."""
    return get_method(recipe.method).calibrated or getattr(recipe.config(), "mixed_precision", None) is not None
