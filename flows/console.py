"""A CLI run's console: third-party output to a debug log, our step lines on the terminal (flows floor)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from prefect import flow  # noqa: F401 - Prefect configures logging on first use: before run_console attaches to it

from quantmill import console


@contextlib.contextmanager
def run_console(verbose: bool = False) -> Iterator[Path]:
    """Route third-party output to a debug log for the duration of a run; yields the log's path."""
    path = console.debug_log_path()
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        real = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        real = False  # sys.stdout was replaced (an embedding program, pytest's capsys): keep writing to it
    stream = console._stream = os.fdopen(os.dup(1), "w", buffering=1) if real else sys.stdout
    console._bar_on = stream.isatty()
    file_handler = logging.FileHandler(path) if verbose else None
    if not verbose:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
    steps, ours = console.StepLines(), console.OurWarnings()
    watched = [logging.getLogger(n) for n in ("prefect.task_runs", "prefect.flow_runs")]
    levels = [lg.level for lg in watched]
    for lg in watched:
        lg.addHandler(steps)
        lg.setLevel(logging.DEBUG)  # the 'Executing task' record marks a step's start
    quantmill_log = logging.getLogger("quantmill")
    quantmill_log.addHandler(ours)
    if file_handler is not None:
        logging.getLogger().addHandler(file_handler)
    try:
        yield path
    finally:
        console.keep_server_lines_in(path)
        sys.stdout.flush()
        sys.stderr.flush()
        for lg, level in zip(watched, levels):
            lg.removeHandler(steps)
            lg.setLevel(level)
        quantmill_log.removeHandler(ours)
        if file_handler is not None:
            logging.getLogger().removeHandler(file_handler)
            file_handler.close()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        console._bar_on = False
        if real:
            stream.close()
        console._stream = None
