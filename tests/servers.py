"""Prefect servers for tests: one started per test (`prefect_server`), one for the session shared by every test
process's flows and CLI runs (`shared_prefect_api`), and the database a server leaves after its first start (`seed_prefect_home`)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, subprocess_env

PREFECT = [sys.executable, "-m", "prefect"]
# Server services that no run on a shared server uses (no deployments, schedules, automations, pauses or
# cancellations there; the deployment test starts its own server with every service): an idle server then costs
# ≈ 1.0 s of CPU a minute instead of ≈ 1.4-2.0 (measured 2026-12-02), over the whole suite.
UNUSED_SERVICES = {f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in (
    "SCHEDULER", "LATE_RUNS", "FOREMAN", "TRIGGERS", "CANCELLATION_CLEANUP", "CLEANUP_RECONCILER",
    "PAUSE_EXPIRATIONS", "REPOSSESSOR", "DB_VACUUM")}


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (a worker's flow-run child, uvicorn's workers), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start_prefect_server(root: Path, ui: bool = False, *, seed: bool = True, port: int | None = None,
                         **settings: str) -> tuple[str, subprocess.Popen]:
    """`prefect server start` on a loopback port (`port`, else a free one) with its own PREFECT_HOME (SQLite database
    there, seeded by `seed_prefect_home` unless `seed` is false) under `root`; returns its API URL once /api/health
    answers, and the process (stop it with `stop`). `settings`: more PREFECT_* environment for the server."""
    if seed:
        seed_prefect_home(root / "server-prefect")
    port = port or free_port()
    log = root / "server.log"
    env = subprocess_env(root / "server-home", PREFECT_HOME=str(root / "server-prefect"),
                         PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED=str(ui).lower(),
                         PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api", **settings)
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=root, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}: {tail(log)}")
        try:
            if requests.get(f"{api}/health", timeout=2).ok:
                return api, proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop(proc)
    pytest.fail("prefect server did not answer /api/health within 240 s: " + tail(log))


@contextlib.contextmanager
def prefect_server(root: Path, ui: bool = False) -> Iterator[str]:
    """A Prefect server for the block (see `start_prefect_server`)."""
    api, proc = start_prefect_server(root, ui)
    try:
        yield api
    finally:
        stop(proc)


API_VAR = "QUANTMILL_TEST_PREFECT_API"  # the session's shared server: set by the first pytest process, inherited
_owned: dict[str, object] = {}


def reserve_shared_api() -> str:
    """The URL of the session's shared Prefect server: a free loopback port chosen by the first pytest process (the
    pytest-xdist controller, or the only process), which its workers inherit (pytest_configure, before any import of
    Prefect, which reads its settings once)."""
    if API_VAR not in os.environ:
        os.environ[API_VAR] = f"http://127.0.0.1:{free_port()}/api"
    return os.environ[API_VAR]


def start_shared_server() -> None:
    """Start the session's shared server (its owner: the controller, in a background thread at session start, so the
    workers start beside it; or the only process, on first use)."""
    port = int(os.environ[API_VAR].removesuffix("/api").rsplit(":", 1)[1])
    root = Path(tempfile.mkdtemp(prefix="quantmill-prefect-"))
    _owned["root"] = root
    _owned["proc"] = start_prefect_server(root, port=port, **UNUSED_SERVICES)[1]


def stop_shared_server() -> None:
    """Stop the shared server this process started, and remove its folder."""
    proc = _owned.pop("proc", None)
    if isinstance(proc, subprocess.Popen):
        stop(proc)
    root = _owned.pop("root", None)
    if isinstance(root, Path):
        shutil.rmtree(root, ignore_errors=True)


@functools.cache
def shared_prefect_api() -> str:
    """The one Prefect server of the test session: every test process's own Prefect client (in-process flows) and its
    CLI runs (`served_env`) report to it. The pytest-xdist controller starts it (conftest: pytest_sessionstart) and
    stops it after the workers end; a worker waits until it answers. One server instead of one per worker: each idle
    server costs ≈ 1 s of CPU a minute beside what it serves, and ≈ 4 s to start (measured 2026-12-02).

    A `quantmill run` without PREFECT_API_URL starts Prefect's temporary server and migrates a fresh database for
    its state folder (≈ 12 s of CPU); runs that test something else report to this one instead, as a deployment's
    runs do. Tests of the temporary server itself (first-run console, crash safety) keep it. In-process flows did
    use a temporary server each test process started: two pytest-xdist workers starting theirs at the same moment
    could end up on one (Prefect picks a random port and takes the first server that answers there; seen
    2026-12-02). The tests of the `gpu` concurrency limit, the one server-wide setting a test changes, run on one
    worker (test_concurrency: one xdist_group)."""
    api = os.environ[API_VAR]
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # no controller: this process owns the server
        start_shared_server()
        atexit.register(stop_shared_server)
        return api
    deadline = time.time() + 600  # on a fresh clone the controller first makes the seed database (prefect_db)
    while time.time() < deadline:
        try:
            if requests.get(f"{api}/health", timeout=2).ok:
                return api
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"the session's Prefect server ({api}, started by pytest-xdist's controller) did not answer in 600 s")


def served_env(home: Path, **extra: str) -> dict[str, str]:
    """`subprocess_env` for a CLI run that reports to `shared_prefect_api()` (its own PREFECT_HOME in `home`)."""
    return subprocess_env(home, PREFECT_API_URL=shared_prefect_api(), PREFECT_HOME=str(home / "prefect"), **extra)


def prefect_db() -> Path:
    """A Prefect database as a server leaves it after its first start (migrated, block types registered), made once
    per Prefect version and kept beside the test models."""
    from importlib.metadata import version

    from tests.conftest import made_once, model_cache

    def build(folder: Path) -> None:
        stop(start_prefect_server(folder, seed=False)[1])
        db = folder / "server-prefect" / "prefect.db"
        with contextlib.closing(sqlite3.connect(db)) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # what the server wrote, in the one file
        db.rename(folder / "prefect.db")

    return made_once(model_cache() / f"prefect-db-{version('prefect')}", build) / "prefect.db"


def seed_prefect_home(prefect_home: Path) -> None:
    """Give a new PREFECT_HOME the database of `prefect_db()`, so that its server (`prefect server start`, or the
    temporary server of a run whose state folder it is) starts as on a second run: ≈ 4 s of CPU instead of ≈ 13 s
    migrating a new database (measured 2026-12-02). Tests of a first run in a new state folder do not seed it."""
    db = prefect_home / "prefect.db"
    if not db.exists():
        prefect_home.mkdir(parents=True, exist_ok=True)
        shutil.copy2(prefect_db(), db)
