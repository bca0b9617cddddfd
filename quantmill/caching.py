"""Cache keys from content hashes (the steps' Prefect cache policy, StepCache, is in quantmill.tasks._cache)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from quantmill import refresh
from quantmill.context import StepContext
from quantmill.hashing import sha256_file
from quantmill.refs import Ref
from quantmill.store import ArtifactStore, artifact_key, note_inputs

log = logging.getLogger("quantmill.cache")


def dir_fingerprint(root: Path) -> list[tuple[str, int, int]]:
    """Cheap identity of a folder: (relative path, size, mtime) of every file."""
    return sorted(
        (p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    )


def fingerprint(value: Any) -> Any:
    """What a cache key sees of a task input: content hashes, never bare paths (nor a context's store or run)."""
    if isinstance(value, StepContext):
        return value.keyed()
    if isinstance(value, Ref):
        return value.identity()
    if isinstance(value, BaseModel):
        data = {name: fingerprint(getattr(value, name)) for name in type(value).model_fields}
        path = data.get("path")
        if isinstance(path, str) and Path(path).is_file():
            data["path_sha256"] = sha256_file(Path(path))
        elif isinstance(path, str) and Path(path).is_dir():
            data["path_fingerprint"] = dir_fingerprint(Path(path))
        return {"type": type(value).__name__, **data}
    if isinstance(value, (list, tuple)):
        return [fingerprint(v) for v in value]
    if isinstance(value, dict):
        return {str(k): fingerprint(v) for k, v in value.items()}
    return value


def path_content(value: str | Path | None) -> Any:
    """What a key sees of a path argument: its file's sha256 or its folder's fingerprint (not the path string)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return {"sha256": sha256_file(path)}
    if path.is_dir():
        return {"fingerprint": dir_fingerprint(path)}
    return {"missing": str(path)}


def bound_arguments(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A call's arguments by parameter name, defaults included: what Prefect hands a cache policy as `inputs`."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def key_inputs(inputs: Mapping[str, Any], ignore: tuple[str, ...] = (), content: tuple[str, ...] = ()) -> dict[str, Any]:
    """A step's bound arguments as its key sees them: every one, unless named in `ignore`.

    A StepContext is spread into its keyed fields (the device; never the store root or run id), which `ignore`
    may name too; the arguments named in `content` are paths, keyed by their files' content.
    """
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, StepContext):
            clash = set(value.keyed()) & set(inputs)
            if clash:
                raise TypeError(f"parameter {sorted(clash)[0]!r} shadows the StepContext field of the same name")
            out.update(value.keyed())
        else:
            out[name] = path_content(value) if name in content else value
    return {k: v for k, v in out.items() if k not in ignore}


def step_key(step: str, code_version: str, inputs: dict[str, Any]) -> str:
    """Store and cache key of one step run (inputs as key_inputs returns them)."""
    parts = {k: fingerprint(v) for k, v in sorted(inputs.items())}
    return artifact_key(step, code=code_version, inputs=parts)


def noted_key(step: str, code_version: str, inputs: dict[str, Any]) -> str:
    """step_key, with the inputs' store keys noted beside it (what --refresh of an upstream step follows)."""
    key = step_key(step, code_version, inputs)
    note_inputs(key, refresh.input_keys(inputs))
    return key


Verifier = Callable[[str, dict[str, Any]], str | None]


def verify_in_store(key: str, inputs: dict[str, Any]) -> str | None:
    """Default verifier: the step's artifact is intact in the store of the step's context (`ctx`)."""
    return ArtifactStore(inputs["ctx"].store_root).verify(key)


