"""Profiles from YAML: read, apply `--set` overrides, validate; every failure is one line naming the file or
`--set` and the field (core)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from quantmill.errors import ProfileError, first_error
from quantmill.profile import Profile


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set data[a][b][0][c] = value for 'a.b.0.c'."""
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ProfileError(f"--set {dotted}: {key!r} is not an index of a {len(node)}-item list")
            key = int(key)  # type: ignore[assignment]
            if last:
                node[key] = value
            else:
                node = node[key]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ProfileError(f"--set {dotted}: cannot descend into a {type(node).__name__}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ProfileError(f"--set {item!r}: use dotted.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw else None)
    return data


def format_error(source: str, exc: ValidationError) -> str:
    """One line: file, field path, reason."""
    loc, msg, kind = first_error(exc)
    if kind == "extra_forbidden":
        msg = "unknown key (check the spelling; see profiles/demo.yaml for the schema)"
    elif kind == "missing":
        msg = "required field is missing"
    return f"{source}: {loc or '<root>'}: {msg}"


def parse_profile(data: Any, source: str = "<profile>") -> Profile:
    """Validate a loaded mapping into a Profile, raising ProfileError with the field path."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: the profile must be a YAML mapping of sections")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(format_error(source, exc)) from None


def load_profile(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Profile:
    """Read, override and validate a YAML profile; every failure is one clear line."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"{p}: profile file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "syntax"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        ctx, ctx_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if ctx and ctx_mark:
            problem += f" ({ctx} at line {ctx_mark.line + 1})"
        raise ProfileError(f"{p}: YAML error at {where}: {problem}; fix the YAML syntax") from None
    data = apply_overrides(data if isinstance(data, dict) else {}, overrides or []) if data is not None else data
    try:
        return parse_profile(data, str(p))
    except ProfileError as exc:
        raise ProfileError(blame_override(str(exc), str(p), overrides or [])) from None


def blame_override(message: str, source: str, overrides: list[str]) -> str:
    """Name the `--set` whose field failed validation instead of the profile file it did not come from."""
    field = message.removeprefix(f"{source}: ").split(": ", 1)[0]
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip()
        if field == key or field.startswith(f"{key}.") or key.startswith(f"{field}."):
            return f"--set {item}: " + message.removeprefix(f"{source}: ")
    return message
