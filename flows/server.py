"""Prefect's temporary server for a CLI run, guarded so it dies with the CLI (flows floor)."""

from __future__ import annotations

import os
import subprocess
import sys

from prefect.settings import get_current_settings

from quantmill.state import WATCHDOG

_guarded: set[int] = set()


def guard_prefect_server() -> int | None:
    """Start Prefect's temporary server now (no PREFECT_API_URL) with a watchdog that stops it when this process
    dies, however it dies; returns the watchdog's pid (None with a configured server)."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    if not get_current_settings().server.ephemeral.enabled:
        return None
    # Prefect's server package (FastAPI app, database models) costs ~2 s of imports: only for the temporary server.
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    proc = server.server_process
    if proc is None or proc.pid in _guarded:
        return None
    _guarded.add(proc.pid)
    dog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(proc.pid)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dog.pid
