"""MLflow plumbing: tracking URI, experiment, the pipeline's parent run, flattened params."""

from __future__ import annotations

import json
import random
import time
from typing import Any

from quantmill import state
from quantmill.errors import QuantmillError
from quantmill.locks import file_lock
from quantmill.metrics import ppl_delta_pct

# Registry tag holding the serving digest of a version's checkpoint (layout 2: serving_digest; older versions:
# hash of the whole folder); written by the register step, read by serving.
SHA_TAG = "quantmill.checkpoint_sha256"

SECRET_HINTS = ("token", "secret", "password", "api_key")


def client():  # noqa: ANN201 - mlflow.MlflowClient
    """An MlflowClient on the configured tracking URI (a SQLite file by default)."""
    import mlflow

    uri = state.tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # one store for runs and registry (MLflow also exports both to os.environ)
    if not uri.startswith("sqlite:"):
        return mlflow.MlflowClient(uri, registry_uri=uri)
    # two processes creating one SQLite store race in its migrations
    with file_lock(state.home() / "locks" / "mlflow-db.lock"):
        c = mlflow.MlflowClient(uri, registry_uri=uri)
        c.search_registered_models(max_results=1)  # initialise the registry store under the lock too
        return c


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


# Metrics every variant's child run (and its logged model) carries, under the same names, so MLflow's run
# comparison charts variants side by side. Evaluation metrics not listed here are logged too, by their own name.
VARIANT_METRICS = ("perplexity", "ppl_delta_pct", "kl_mean", "top1_agreement", "latency_ms_p50", "latency_ms_p95",
                   "latency_ms_p99", "peak_rss_bytes", "size_bytes", "compression")


def variant_metrics(ckpt: Any, result: Any, baseline: Any) -> dict[str, float]:
    """One variant's numbers against the baseline: evaluation metrics plus delta, size and compression."""
    m, b = result.metrics, baseline.metrics
    out = {k: float(v) for k, v in m.items() if k != "nll"}
    out.update(ppl_delta_pct=ppl_delta_pct(m["perplexity"], b["perplexity"]), size_bytes=float(ckpt.size_bytes),
               compression=float(b.get("size_bytes", 0.0)) / max(ckpt.size_bytes, 1))
    return out


def log_metrics(client: Any, run_id: str, metrics: dict[str, float], model_id: str | None = None) -> None:
    """Log metrics on a run, linked to a logged model when model_id is given (MLflow 3)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0, model_id=model_id) for k, v in sorted(metrics.items())]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i : i + 500])


def variant_run(client: Any, parent: str, variant: str) -> str | None:
    """The child run of `parent` holding `variant`'s numbers, if one was made (by the register step)."""
    exp = client.get_run(parent).info.experiment_id
    found = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}' and tags.`quantmill.variant` = '{variant}'")
    return found[0].info.run_id if found else None


def child_run(client, parent: str, experiment: str, name: str, *, params: dict, tags: dict, metrics: dict | None = None) -> str:  # noqa: PLR0913,ANN001 - keyword-only: what the run logs; client is an MlflowClient
    """A finished child run under the pipeline's parent run."""
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "mlflow.runName": name})
    now = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
