"""Memory the process gives back between steps: collect garbage, return freed heap pages to the OS, measure RSS.

A quantize or evaluate step frees its model when it returns, but glibc keeps freed heap pages (and the arenas of
the threads that used them) mapped: RSS stays at the step's peak. `give_back()` runs the cyclic collector (models
in reference cycles: hooks, accelerate's wrappers) and `malloc_trim(0)`, which returns the free pages of every
arena. Measured on a 22 M-parameter model (tests/test_variant_memory.py) and at the 254 M scale
(benchmarks/scale.py): README, "Memory between variants".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading

_LOCK = threading.Lock()


def rss() -> int:
    """Resident set size of this process, bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def _trim() -> None:
    """glibc's malloc_trim(0): give every arena's free pages back to the OS (no-op off glibc)."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl/macOS: nothing to trim
        pass


def give_back() -> int:
    """Collect garbage and trim the heap; return RSS afterwards (bytes). Thread-safe (one trim at a time)."""
    with _LOCK:
        gc.collect()
        _trim()
    return rss()


def give_back_hook(*_args: object) -> None:
    """A Prefect state hook (task or flow, on completion/failure): release what the finished step held."""
    give_back()
