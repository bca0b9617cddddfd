"""What every step of one run shares: the artifact store, the device, the MLflow run (one record, not three arguments).

The steps take it as the keyword-only `ctx`. Cache keys see only the fields that can change a step's output
(`StepContext.keyed()`: the device); where artifacts live and which run records them never do (a cached result
made against another store is checked against this one by the step's verifier, quantmill.caching.verify_in_store).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class StepContext(BaseModel):
    """Where a step reads and writes artifacts, what it computes on, and which MLflow run records it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    UNKEYED: ClassVar[tuple[str, ...]] = ("store_root", "run_id")  # never part of a cache key

    store_root: str
    device: str = "cpu"
    run_id: str = ""  # the pipeline's MLflow parent run ("" outside a pipeline run)

    def keyed(self) -> dict[str, Any]:
        """The fields a cache key sees (every field but UNKEYED, so a new field keys the steps by default)."""
        return {name: getattr(self, name) for name in type(self).model_fields if name not in self.UNKEYED}
