"""MLflow plumbing: tracking URI, experiment, the pipeline's parent run, flattened params."""

from __future__ import annotations

import fcntl
import json
import random
import time
from typing import Any

from quantmill import state
from quantmill.errors import QuantmillError

SECRET_HINTS = ("token", "secret", "password", "api_key")


def client():  # noqa: ANN201 - mlflow.MlflowClient
    """An MlflowClient on the configured tracking URI (a SQLite file by default)."""
    import mlflow

    uri = state.tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # one store for runs and registry (MLflow also exports both to os.environ)
    if not uri.startswith("sqlite:"):
        return mlflow.MlflowClient(uri, registry_uri=uri)
    lock = state.home() / "locks" / "mlflow-db.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:  # two processes creating one SQLite store race in its migrations
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            c = mlflow.MlflowClient(uri, registry_uri=uri)
            c.search_registered_models(max_results=1)  # initialise the registry store under the lock too
            return c
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_reachable(attempts: int = 4, timeout_s: float = 10.0, base_delay_s: float = 0.5) -> None:
    """Fail with one clear line when a remote tracking server stays unreachable after retries."""
    uri = state.tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    for attempt in range(attempts):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
            return
        except requests.RequestException:
            if attempt + 1 < attempts:
                time.sleep(base_delay_s * 2**attempt * (1 + random.random() / 2))
    raise QuantmillError(
        f"MLFLOW_TRACKING_URI: cannot reach the MLflow server at {uri} after {attempts} attempts; "
        "start it, fix the URI, or unset the variable to use the local SQLite store"
    )


def experiment_id(name: str) -> str:
    """Id of the experiment `name`, created with a state-folder artifact location if needed."""
    from mlflow.exceptions import MlflowException

    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if state.tracking_uri().startswith("sqlite:"):
        location = (state.artifact_root() / name).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException:
        exp = c.get_experiment_by_name(name)  # another run created it between our lookup and create
        if exp is None:
            raise
        return exp.experiment_id


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {'a.b.c': 'value'} for MLflow params, with secrets dropped."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            if any(h in str(k).lower() for h in SECRET_HINTS):
                continue
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list):
        out[prefix.rstrip(".")] = json.dumps(data, default=str)[:6000]
    else:
        out[prefix.rstrip(".")] = str(data)[:6000]
    return out


def tolerating_races(fn: Any, *args: Any, attempts: int = 4) -> Any:
    """Run an MLflow write that a concurrent run may make too (e.g. the same dataset input): retry the
    unique-constraint conflict, which the second attempt resolves by finding the other run's row."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return fn(*args)
        except MlflowException as exc:
            conflict = "UNIQUE constraint" in str(exc) or "already exists" in str(exc)
            if not conflict or attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random() * 0.5)
    raise AssertionError("unreachable")
