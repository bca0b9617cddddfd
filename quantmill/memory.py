"""Memory the process gives back between steps (collect garbage, return freed heap pages to the OS) and its peaks.

A quantize or evaluate step frees its model when it returns, but glibc keeps freed heap pages (and the arenas of
the threads that used them) mapped: RSS stays at the step's peak. `give_back()` runs the cyclic collector (models
in reference cycles: hooks, accelerate's wrappers) and `malloc_trim(0)`, which returns the free pages of every
arena. Measured on a 22 M-parameter model (tests/test_variant_memory.py) and at the 254 M scale
(benchmarks/scale.py): README, "Memory between variants". `PeakMemory` measures a block's peak RSS (evaluation).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT in the main thread until the block ends, then deliver them to the handler in force.

    A signal handler raises (SystemExit, Prefect's TerminationSignal, KeyboardInterrupt) wherever the main thread
    is; inside a finalizer that `gc.collect()` runs, the exception is printed and swallowed ("Exception ignored
    in __del__") and the run would go on as if never told to stop. Other threads need nothing: handlers run in
    the main thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    def hold(signum: int, _frame: object) -> None:
        pending.append(signum)

    held = {sig: signal.signal(sig, hold) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        for sig in pending:
            handler = held[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


def give_back() -> int:
    """Collect garbage and trim the heap; return RSS afterwards (bytes). Thread-safe (one trim at a time)."""
    with _LOCK, signals_deferred():
        gc.collect()
        _trim()
    return rss()


def freeze_imports(*modules: str) -> None:
    """Import `modules`, then move every object alive now out of the cyclic collector's way (`gc.freeze`).

    With torch, transformers, Prefect and MLflow loaded, a full collection walks about 570,000 objects (0.4 s on
    one core), almost all of them modules, classes and functions that live as long as the process; a run collects
    after every step and variant. Frozen, they are skipped, and each `give_back()` walks only what the steps made
    since. Call it once, before any model exists: what is frozen is never collected."""
    import importlib

    for name in modules:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()


def give_back_hook(*_args: object) -> None:
    """A Prefect state hook (task or flow, on completion/failure): release what the finished step held."""
    give_back()


def reset_peak() -> bool:
    """Restart the kernel's high-water mark of this process (VmHWM) at the current RSS (Linux >= 4.0; else no-op).
    True when it was reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """Highest RSS of this process since the last `reset_peak()` (VmHWM), bytes; ru_maxrss off Linux."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak RSS while the block runs: the kernel's high-water mark (reset on entry), else a sampling thread."""

    def __init__(self, device: str, interval_s: float = 0.02) -> None:
        import psutil

        self.proc, self.device, self.interval, self._stop = psutil.Process(), device, interval_s, threading.Event()
        self.start = self.peak = self.proc.memory_info().rss
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        if not reset_peak():
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss, peak_rss() if self._thread is None else 0)

    def metrics(self) -> dict[str, float]:
        """Peak RSS, its growth over the start, and peak CUDA memory on GPU."""
        out = {"peak_rss_bytes": float(self.peak), "rss_growth_bytes": float(self.peak - self.start)}
        if self.device == "cuda":
            import torch

            out["peak_gpu_bytes"] = float(torch.cuda.max_memory_allocated())
        return out
