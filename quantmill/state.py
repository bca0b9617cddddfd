"""Where quantmill keeps its state: one project-local folder unless told otherwise."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Runs beside `quantmill run` (no imports beyond the standard library): when the CLI dies, even by kill -9,
# it stops Prefect's temporary server, which would otherwise be re-parented and keep listening for good.
WATCHDOG = """
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
while os.getppid() == parent:
    if not alive(server):
        sys.exit(0)
    time.sleep(0.3)
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    try:
        os.kill(server, sig)
    except ProcessLookupError:
        sys.exit(0)
    deadline = time.time() + wait
    while alive(server) and time.time() < deadline:
        time.sleep(0.1)
"""


def home() -> Path:
    """State folder: $QUANTMILL_HOME, else ./.quantmill (absolute)."""
    return Path(os.environ.get("QUANTMILL_HOME") or ".quantmill").expanduser().resolve()


def tracking_uri() -> str:
    """MLflow tracking URI: $MLFLOW_TRACKING_URI, else a SQLite file in the state folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def artifact_root() -> Path:
    """Local MLflow artifact folder used with the default SQLite store."""
    return home() / "mlartifacts"


def prefect_results() -> Path:
    """Where Prefect persists task results and cache records."""
    return home() / "prefect" / "results"


def configure_environment() -> None:
    """Point Prefect and MLflow at the state folder unless the user configured them."""
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["QUANTMILL_HOME"] = str(root)
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(prefect_results()))
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Busy-waiting OpenMP threads make CPU forward passes ~10x slower when other processes compete for cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 2)))


def viewer_commands() -> list[str]:
    """Commands a user runs to look at what a run left behind."""
    cmds = []
    uri = tracking_uri()
    if uri.startswith("sqlite:"):
        cmds.append(f"mlflow ui --backend-store-uri {uri} --default-artifact-root {artifact_root()}")
    else:
        cmds.append(f"open {uri}")
    if os.environ.get("PREFECT_API_URL"):
        cmds.append(f"open {os.environ['PREFECT_API_URL'].removesuffix('/api')}")
    else:
        cmds.append(f"PREFECT_HOME={home() / 'prefect'} prefect server start")
    return cmds


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scratch_root() -> Path:
    """Per-process temporary folders (library scratch such as GPTQModel's offload folder) under the state folder."""
    return home() / "tmp"


def sweep_scratch() -> list[Path]:
    """Remove the temporary folders of processes that died (kill -9) without cleaning up; returns them."""
    root, gone = scratch_root(), []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.name.isdigit() and not pid_alive(int(d.name)):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def private_scratch() -> Path:
    """Point this process's (and its children's) temporary files at `<state>/tmp/<pid>`, swept by later runs."""
    sweep_scratch()
    mine = scratch_root() / str(os.getpid())
    mine.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(mine)
    tempfile.tempdir = str(mine)
    atexit.register(shutil.rmtree, mine, ignore_errors=True)
    return mine


