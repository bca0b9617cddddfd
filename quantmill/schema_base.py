"""What every profile section shares: strict models (unknown keys are errors), form-friendly JSON schema, path
expansion (core)."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict


def form_fields(schema: dict[str, Any], plain: tuple[str, ...] = ()) -> None:
    """JSON schema as a form: every field titled (pydantic leaves sections untitled), `plain` optional fields as
    plain text boxes (`type: string`) rather than a None-or-str toggle."""
    for name, prop in schema.get("properties", {}).items():
        prop.setdefault("title", name.replace("_", " ").title())
    for name in plain:
        prop = schema["properties"][name]
        prop.pop("anyOf", None)
        prop.pop("default", None)
        prop["type"] = "string"


def recipes_or_grid(schema: dict[str, Any]) -> None:
    """JSON schema: `recipes` required (the form marks it so), with at least one unless a sweep grid is given."""
    form_fields(schema)
    schema["required"].append("recipes")
    schema["properties"]["recipes"]["minItems"] = 0  # [] beside a grid: the form keeps an empty required list
    grid = {"type": "object", "required": ["grid"], "properties": {"grid": {"type": "array", "minItems": 1}}}
    schema["if"] = {"required": ["sweep"], "properties": {"sweep": grid}}
    schema["else"] = {"required": ["recipes"], "properties": {"recipes": {"type": "array", "minItems": 1}}}


class Strict(BaseModel):
    """Base for profile sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=lambda schema: form_fields(schema))


def expand(path: str) -> str:
    """Expand ${VARS} and ~ in a path-like string (${QUANTMILL_HOME} defaults to the state folder)."""
    from quantmill import state

    for var in ("${QUANTMILL_HOME}", "$QUANTMILL_HOME"):
        path = path.replace(var, str(state.home()))  # also in processes nobody configured (e.g. a worker's run)
    return os.path.expanduser(os.path.expandvars(path))
