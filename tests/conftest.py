"""Test setup: a private state folder (Prefect, MLflow, artifacts) and cached trained models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Point quantmill, Prefect and MLflow at a throw-away state folder before anything imports them."""
    home = Path(tempfile.mkdtemp(prefix="quantmill-tests-"))
    os.environ["QUANTMILL_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from quantmill import state

    state.configure_environment()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop Prefect's temporary server while the output is still open (its atexit hook logs to a closed stream)."""
    import sys

    server_mod = sys.modules.get("prefect.server.api.server")
    if server_mod is not None:
        from prefect._internal.concurrency.services import QueueService

        QueueService.drain_all(timeout=10)  # logs and events still queued for the server
        for server in list(server_mod.SubprocessASGIServer._instances.values()):
            server.stop()


def subprocess_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for a quantmill subprocess with its own state folder (nothing inherited from this session)."""
    env = {**os.environ, "QUANTMILL_HOME": str(home), **extra}
    for var in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        if var not in extra:
            env.pop(var, None)
    return env


def model_cache() -> Path:
    """Where trained test models are kept between runs ($QUANTMILL_TEST_MODELS or .quantmill/test-models)."""
    return Path(os.environ.get("QUANTMILL_TEST_MODELS") or REPO / ".quantmill" / "test-models")


def demo_llama():
    """The demo Llama (+ LoRA adapter), trained on first use and cached (callable outside fixtures)."""
    from quantmill.demo import build_demo_assets

    return build_demo_assets(model_cache(), arch="llama", with_adapter=True)


@pytest.fixture(scope="session")
def demo_assets():
    """The demo Llama (+ LoRA adapter), trained once and cached."""
    return demo_llama()


@pytest.fixture(scope="session")
def qwen2_assets():
    """A small Qwen2 (GQA, tied embeddings, attention bias), trained once and cached."""
    from quantmill.demo import build_demo_assets

    return build_demo_assets(model_cache(), arch="qwen2", with_adapter=False)
