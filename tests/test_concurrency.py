"""The `gpu` global concurrency limit: GPU-bound steps never overlap beyond the slots; CPU steps are free."""

from __future__ import annotations

import time

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.task_runners import ThreadPoolTaskRunner

from quantmill.tasks._gpu import GPU_LIMIT, gpu_slot, holding_gpu

# The `gpu` limit lives on the session's shared Prefect server: these tests, which create, read and delete it, run
# one after another on one worker (no other test touches it: their steps run on the CPU).
pytestmark = pytest.mark.xdist_group("gpu-limit")


@task
def hold(device: str, seconds: float) -> tuple[float, float]:
    """Occupy the device for a while; return (start, end) of the held section."""
    with gpu_slot(device):
        start = time.monotonic()
        time.sleep(seconds)
        return start, time.monotonic()


@flow(task_runner=ThreadPoolTaskRunner(max_workers=3))
def contend(device: str) -> list[tuple[float, float]]:
    return [f.result() for f in [hold.submit(device, 1.0) for _ in range(3)]]


def overlaps(spans: list[tuple[float, float]]) -> int:
    spans = sorted(spans)
    return sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1] - 0.05)


def limit():
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            return None


@pytest.fixture()
def no_gpu_limit():
    with get_client(sync_client=True) as client:
        if limit() is not None:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
    yield
    with get_client(sync_client=True) as client:
        if limit() is not None:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)


def test_cpu_steps_run_side_by_side_and_take_no_slot(no_gpu_limit):
    spans = contend("cpu")
    assert overlaps(spans) >= 1  # the same tasks do overlap without the limit
    assert limit() is None


def test_gpu_steps_hold_one_slot_each(no_gpu_limit, monkeypatch):
    monkeypatch.setenv("QUANTMILL_GPU_SLOTS", "1")
    spans = contend("cuda")
    assert overlaps(spans) == 0, spans
    created = limit()
    assert created is not None and created.limit == 1 and created.active_slots == 0


def test_an_operators_limit_is_kept_and_honoured(no_gpu_limit, monkeypatch):
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=2))
    monkeypatch.setenv("QUANTMILL_GPU_SLOTS", "1")  # ignored: the limit exists
    spans = contend("cuda:0")
    assert limit().limit == 2
    assert 1 <= overlaps(spans) <= 2  # two at a time, never three
    assert min(b for _, b in spans) <= max(a for a, _ in spans)  # the third waited for a slot


def test_holding_gpu_wraps_a_store_build():
    built = holding_gpu("cpu", lambda out: {"out": out})
    assert built("x") == {"out": "x"}
