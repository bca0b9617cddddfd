"""`--refresh STEP[,STEP]` and `--no-cache`: recompute chosen steps and every step that consumes their output.

The steps to refresh travel in $QUANTMILL_REFRESH (so local worker processes see them too). A step run is
forced when its step is named there, or when one of its (key-relevant) inputs is an artifact that this
process rebuilt because of a refresh: `--refresh calibrate` rebuilds calibrate, then the quantize runs of
the recipes that use calibration, then their evaluations, and nothing else.
"""

from __future__ import annotations

import os
import threading
from typing import Any

ENV = "QUANTMILL_REFRESH"
RUN_ENV = "QUANTMILL_REFRESH_ID"  # names a file of rebuilt keys, shared with local worker processes (Dask)
ALL = "*"
# Steps a user may name (the Prefect task names that keep artifacts in the store).
STEPS = ("download", "merge", "calibrate", "eval-data", "evaluate", "quantize", "sensitivity", "register")
STORED = ("download", "merge", "calibrate", "eval-data", "evaluate", "quantize", "sensitivity")  # what consumers inherit

_lock = threading.Lock()
_forced: set[str] = set()  # keys whose next build must recompute
_rebuilt: set[str] = set()  # keys recomputed in this process because of a refresh


def parse_steps(text: str) -> list[str]:
    """Validated step names of a `--refresh` value (one clear line for an unknown one)."""
    from quantmill.errors import QuantmillError

    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STEPS]
    if bad or not names:
        raise QuantmillError(f"--refresh {text!r}: unknown step {', '.join(bad) or '(none)'}; steps: {', '.join(STEPS)}")
    return names


def requested() -> set[str]:
    """Steps named by $QUANTMILL_REFRESH ('*' = every step, i.e. --no-cache)."""
    return {s for s in os.environ.get(ENV, "").split(",") if s}


def active() -> bool:
    """True when this run refreshes anything."""
    return bool(requested())


def input_keys(value: Any) -> list[str]:
    """Store keys of the artifacts referenced in a step's inputs."""
    key = getattr(value, "store_key", None)
    if isinstance(key, str):
        return [key]
    if isinstance(value, (list, tuple)):
        return [k for v in value for k in input_keys(v)]
    if isinstance(value, dict):
        return [k for v in value.values() for k in input_keys(v)]
    return []


def _shared_file():  # noqa: ANN202 - Path | None
    from quantmill import state

    run = os.environ.get(RUN_ENV)
    return state.home() / "refresh" / f"{run}.keys" if run else None


def _load_shared() -> None:
    path = _shared_file()
    if path is not None and path.is_file():
        _rebuilt.update(line for line in path.read_text().splitlines() if line)


def should_force(step: str, key: str, inputs: dict[str, Any]) -> bool:
    """Whether this step run must recompute (and registers it as forced); False once it was rebuilt."""
    wanted = requested()
    if not wanted:
        return False
    with _lock:
        _load_shared()
        if key in _rebuilt:
            return False
        named = ALL in wanted or step in wanted or step.split("-")[0] in wanted
        hit = named or (step in STORED and bool(set(input_keys(inputs)) & _rebuilt))
        if hit:
            _forced.add(key)
        return hit


def take(key: str) -> bool:
    """True (once) when the store must rebuild `key` because of a refresh."""
    with _lock:
        return key in _forced and key not in _rebuilt


def rebuilt(key: str) -> None:
    """Record that `key` was recomputed (its consumers will be forced too)."""
    with _lock:
        _forced.discard(key)
        _rebuilt.add(key)
        path = _shared_file()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as fh:
                fh.write(key + "\n")
