"""A console that is ours: one line per step, our warnings and the final table; the rest goes to a debug log.

During a run, file descriptors 1 and 2 point at a per-run debug log in the state folder
(`$QUANTMILL_HOME/logs/run-*.log`), so third-party banners, tables, progress bars and warnings (GPTQModel,
torch dynamo, torchao, transformers, bitsandbytes, Prefect's own log lines) land there, C-level output
included. Quantmill's lines go to a duplicate of the original stdout. `-v` leaves the descriptors alone
(everything live) and still writes the debug log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import IO

from quantmill import state

_stream: IO[str] | None = None
_lock = threading.Lock()
EXECUTING = re.compile(r"^Executing task '(?P<task>[^']+)' for task run '(?P<run>[^']+)'")
FINISHED = re.compile(r"^Finished in state (?P<state>\w+)\((?P<msg>.*)\)$", re.S)
QUIET_TASKS = {"preflight", "gate", "start-run", "log-lineage", "log-results", "publish-report", "promote"}


def stream() -> IO[str]:
    """Where quantmill's own console lines go (the terminal, even while fds 1/2 feed the debug log)."""
    return _stream or sys.stdout


_bar_on = False  # a progress bar may be drawn (the console is a terminal)
_bar_drawn = False


def say(line: str) -> None:
    """Print one quantmill line on the console (over a progress bar, if one is drawn)."""
    global _bar_drawn
    with _lock:
        out = stream()
        out.write(("\r\x1b[K" if _bar_drawn else "") + line.rstrip("\n") + "\n")
        _bar_drawn = False
        out.flush()


def progress(label: str, done: int, total: int, unit: str = "") -> None:
    """Progress of a long step (layers quantized, windows evaluated): one bar redrawn in place on a terminal,
    nothing otherwise (a log file or a pipe gets the step's start and finish lines only)."""
    global _bar_drawn
    if not _bar_on or total <= 0:
        return
    with _lock:
        width = 30
        filled = int(width * min(done, total) / total)
        text = f"\r\x1b[K  {label:<10} [{'█' * filled}{'░' * (width - filled)}] {done}/{total} {unit}".rstrip()
        out = stream()
        out.write(text if done < total else "\r\x1b[K")
        _bar_drawn = done < total
        out.flush()


def gptqmodel_logs_under_state() -> None:
    """GPTQModel writes `logs/*_log_*.log` relative to the working directory: keep them in the state folder."""
    with contextlib.suppress(ImportError, AttributeError):
        from gptqmodel.looper import loop_processor

        loop_processor._PROJECT_LOG_DIR = state.home() / "logs" / "gptqmodel"


class StepLines(logging.Handler):
    """Turns Prefect task-run records into 'step started / finished in N s' lines, and shows our warnings."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.started: dict[str, float] = {}

    @staticmethod
    def _step(record: logging.LogRecord) -> str:
        run = getattr(record, "task_run_name", None) or ""
        return run.rsplit("-", 1)[0] if run else ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            run = getattr(record, "task_run_name", None) or "?"
            step = self._step(record)
            if record.levelno == logging.DEBUG:
                m = EXECUTING.match(msg)
                if m and step not in QUIET_TASKS:
                    self.started[run] = time.monotonic()
                    say(f"  {time.strftime('%H:%M:%S')}  {step:<10} started   ({run})")
                return
            m = FINISHED.match(msg)
            if m and not getattr(record, "task_run_name", None):
                return  # the flow run's own end: the summary follows
            if m:
                state_name = m.group("state")
                begun = self.started.pop(run, None)
                took = f"{time.monotonic() - begun:6.1f} s" if begun is not None else "       "
                if state_name == "Completed" and step in QUIET_TASKS:
                    return
                word = {"Completed": "done", "Cached": "cached"}.get(state_name, state_name.lower())
                line = f"  {time.strftime('%H:%M:%S')}  {step:<10} {word:<9} {took}  ({run})"
                if state_name not in ("Completed", "Cached"):
                    line += f": {m.group('msg').splitlines()[0][:200] if m.group('msg') else ''}"
                say(line)
            elif record.levelno >= logging.WARNING and record.name.startswith(("prefect.task_runs", "prefect.flow_runs")):
                say(f"  warning: {step + ': ' if step else ''}{msg.splitlines()[0][:300]}")
        except Exception:  # noqa: BLE001 - a console line must never break a run (nor recurse into logging)
            pass


class OurWarnings(logging.Handler):
    """quantmill.* warnings on the console (third-party loggers only reach the debug log)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            say(f"  warning: {record.getMessage().splitlines()[0][:300]}")


class ServerLinesToLog(logging.Filter):
    """Prefect's temporary-server lines ('Stopping temporary server ...' at exit) go to the debug log only."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "prefect" and "temporary server" in record.getMessage():
            with contextlib.suppress(OSError), open(self.path, "a") as fh:
                fh.write(f"{record.levelname} | {record.name} - {record.getMessage()}\n")
            return False
        return True


def keep_server_lines_in(path: Path) -> None:
    """Route the temporary server's later lines (its exit hook runs after the run) to this debug log."""
    for handler in [*logging.getLogger().handlers, *logging.getLogger("prefect").handlers]:  # Prefect's is on root
        for old in [f for f in handler.filters if isinstance(f, ServerLinesToLog)]:
            handler.removeFilter(old)
        handler.addFilter(ServerLinesToLog(path))


def debug_log_path() -> Path:
    """A new per-run debug log file in the state folder."""
    folder = state.home() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


