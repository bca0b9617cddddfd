"""Prefect task hooks the flows attach to heavy steps: peak memory logged, memory given back (flows floor)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect.logging.loggers import task_run_logger

from quantmill.memory import give_back, give_back_hook, peak_rss, reset_peak


def step_hooks(label: str, peaks: dict[str, int] | None = None) -> dict[str, list[Callable[..., None]]]:
    """`Task.with_options` hooks for one heavy step: the process's peak RSS while it ran (baseline included) is
    logged as `memory: step LABEL peak RSS N MiB` and kept in `peaks`, then the step's memory is given back.

    Steps of one pipeline run one at a time, so the peak is the step's own; in a threaded sweep it is the
    process's peak while the step ran (other variants included)."""

    def started(*_args: object) -> None:
        reset_peak()

    def ended(task: Any, run: Any, state: Any) -> None:
        if state.name == "Cached":  # a cache hit never ran: it loaded nothing to give back, the mark is not its own
            return
        peak, after = peak_rss(), give_back()
        if peaks is not None:
            peaks[label] = peak
        task_run_logger(run, task).info("memory: step %s peak RSS %.0f MiB, %.0f MiB after it", label,
                                        peak / 2**20, after / 2**20)

    return {"on_running": [started], "on_completion": [ended], "on_failure": [give_back_hook]}
