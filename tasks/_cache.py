"""The Prefect cache policy of every step: keyed on content hashes, artifacts verified before a cache hit.

Tasks floor (Prefect); the pure key and fingerprint functions are in quantmill.caching.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.settings import get_current_settings
from prefect.tasks import exponential_backoff

from quantmill import refresh
from quantmill.caching import Verifier, key_inputs, noted_key, verify_in_store
from quantmill.errors import retry_on_transient

log = logging.getLogger("quantmill.cache")


def network_retries(retries: int, backoff_factor: float) -> dict[str, Any]:
    """`@task` options of a step that talks to a network service: retry transient failures only
    (quantmill.errors.is_transient), with exponential backoff and jitter."""
    return {"retries": retries, "retry_delay_seconds": exponential_backoff(backoff_factor=backoff_factor),
            "retry_jitter_factor": 0.5, "retry_condition_fn": retry_on_transient}


@dataclass
class StepCache(CachePolicy):
    """Key = step + code version + the content of the task's bound arguments; a stale Prefect record is dropped
    before lookup.

    Every argument keys the step (a new parameter included) unless named in `ignore`; the `ctx` StepContext
    contributes its keyed fields (the device, which `ignore` may name), never the store root or run id.
    `content` names path arguments keyed by their files (Prefect's INPUTS policy would hash the path string).
    `normalize` reduces what remains to what shapes the output (e.g. an Evaluation's measurement settings).
    """

    step: str = ""
    code_version: str = "1"
    ignore: tuple[str, ...] = ()
    content: tuple[str, ...] = ()
    verifier: Verifier | None = verify_in_store
    normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def inputs_for(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """What the key sees of the task's bound arguments."""
        inputs = key_inputs(arguments, self.ignore, self.content)
        return self.normalize(inputs) if self.normalize is not None else inputs

    def key_for(self, arguments: Mapping[str, Any]) -> str:
        """The key of a run with these bound arguments: Prefect's `inputs`, or `locals()` as a task body's first
        statement (its store key: one derivation for both)."""
        return noted_key(self.step, self.code_version, self.inputs_for(arguments))

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
            if refresh.should_force(self.step, key, self.inputs_for(inputs)):
                record.unlink(missing_ok=True)
                return key
        if self.verifier is not None and record.exists():
            problem = self.verifier(key, inputs)
            if problem is not None:
                if problem != "missing":
                    log.warning("cached %s result is stale (%s); recomputing", self.step, problem)
                os.unlink(record)
        return key
