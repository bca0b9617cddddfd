"""Prefect cache policy keyed on content hashes, with artifacts verified before a cache hit."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from prefect.cache_policies import CachePolicy
from prefect.settings import get_current_settings
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


Verifier = Callable[[str, dict[str, Any]], Optional[str]]


def verify_in_store(key: str, inputs: dict[str, Any]) -> str | None:
    """Default verifier: the step's artifact is intact in the store named by `store_root`."""
    return ArtifactStore(inputs["store_root"]).verify(key)


@dataclass
class StepCache(CachePolicy):
    """Key = step + code version + inputs' content; a stale Prefect record is dropped before lookup."""

    step: str = ""
    code_version: str = "1"
    exclude: tuple[str, ...] = ("store_root", "run_id")
    verifier: Verifier | None = verify_in_store
    normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def key_for(self, inputs: dict[str, Any]) -> str:
        """The key of a run with these inputs (task bodies use it as their store key)."""
        if self.normalize is not None:
            inputs = self.normalize(dict(inputs))
        key = step_key(self.step, self.code_version, inputs, self.exclude)
        note_inputs(key, refresh.input_keys(inputs))
        return key

    def compute_key(
        self,
        task_ctx: Any,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> Optional[str]:
        key = self.key_for(inputs)
        record = Path(get_current_settings().results.local_storage_path) / key
        if refresh.active():  # --refresh/--no-cache: drop the record so the task runs, and rebuild its artifact
            if refresh.should_force(self.step, key, self.normalize(dict(inputs)) if self.normalize else inputs):
                record.unlink(missing_ok=True)
                return key
        if self.verifier is not None and record.exists():
            problem = self.verifier(key, inputs)
            if problem is not None:
                if problem != "missing":
                    log.warning("cached %s result is stale (%s); recomputing", self.step, problem)
                os.unlink(record)
        return key
