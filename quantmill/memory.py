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
from pathlib import Path

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


def reset_peak() -> None:
    """Restart the kernel's high-water mark of this process (VmHWM) at the current RSS (Linux; else no-op)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Highest RSS of this process since the last `reset_peak()` (VmHWM), bytes; ru_maxrss off Linux."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


