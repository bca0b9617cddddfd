"""Cache keys from content hashes (the steps' Prefect cache policy, StepCache, is in quantmill.tasks._cache)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from quantmill import refresh
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
    """What a cache key sees of a task input: content hashes, never bare paths."""
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


def step_key(step: str, code_version: str, inputs: dict[str, Any], exclude: tuple[str, ...] = ()) -> str:
    """Store and cache key of one step run."""
    parts = {k: fingerprint(v) for k, v in sorted(inputs.items()) if k not in exclude}
    return artifact_key(step, code=code_version, inputs=parts)


def noted_key(step: str, code_version: str, inputs: dict[str, Any], exclude: tuple[str, ...] = ()) -> str:
    """step_key, with the inputs' store keys noted beside it (what --refresh of an upstream step follows)."""
    key = step_key(step, code_version, inputs, exclude)
    note_inputs(key, refresh.input_keys(inputs))
    return key


Verifier = Callable[[str, dict[str, Any]], str | None]


def verify_in_store(key: str, inputs: dict[str, Any]) -> str | None:
    """Default verifier: the step's artifact is intact in the store named by `store_root`."""
    return ArtifactStore(inputs["store_root"]).verify(key)


