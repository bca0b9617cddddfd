"""The Prefect cache policy of every step: keyed on content hashes, artifacts verified before a cache hit.

Tasks floor (Prefect); the pure key and fingerprint functions are in quantmill.caching.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.settings import get_current_settings

from quantmill import refresh
from quantmill.caching import Verifier, noted_key, verify_in_store

log = logging.getLogger("quantmill.cache")


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
        return noted_key(self.step, self.code_version, inputs, self.exclude)

    def compute_key(
        self,
        task_ctx: Any,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
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
