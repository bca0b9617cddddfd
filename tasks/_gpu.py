"""The `gpu` global concurrency limit: GPU-bound steps hold a slot, so two runs never share a GPU."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

GPU_LIMIT = "gpu"
log = logging.getLogger("quantmill.concurrency")


def gpu_slots() -> int:
    """Slots for a newly created `gpu` limit: $QUANTMILL_GPU_SLOTS, else the GPUs this machine has."""
    if os.environ.get("QUANTMILL_GPU_SLOTS"):
        return max(1, int(os.environ["QUANTMILL_GPU_SLOTS"]))
    import torch

    return max(1, torch.cuda.device_count())


def ensure_limit(name: str, slots: int) -> None:
    """Create the global concurrency limit `name` with `slots` unless it exists (an operator's setting wins)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
                log.info("created global concurrency limit %r with %d slot(s)", name, slots)


@contextlib.contextmanager
def gpu_slot(device: str) -> Iterator[None]:
    """Hold one slot of the `gpu` limit while the body runs on CUDA; CPU work is not limited."""
    if not device.startswith("cuda"):
        yield
        return
    from prefect.concurrency.sync import concurrency

    ensure_limit(GPU_LIMIT, gpu_slots())
    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        yield


def holding_gpu(device: str, build: Callable[..., T]) -> Callable[..., T]:
    """Wrap a store build function so it runs holding a GPU slot (cache hits never wait for one)."""

    def run(*args, **kwargs) -> T:  # noqa: ANN002, ANN003
        with gpu_slot(device):
            return build(*args, **kwargs)

    return run
