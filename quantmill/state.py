"""Where quantmill keeps its state: one project-local folder unless told otherwise."""

from __future__ import annotations

import os
from pathlib import Path


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
