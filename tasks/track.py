"""Lineage step: the MLflow parent run of a pipeline run, its params, metrics and report."""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import task
from prefect.context import get_run_context

import quantmill
from quantmill import tracking
from quantmill.errors import retry_on_transient
from quantmill.profile import Profile

LIBRARIES = ("torch", "transformers", "peft", "safetensors", "bitsandbytes", "gptqmodel", "torchao", "prefect", "mlflow")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the outputs."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "not installed"
    return out


@task(name="start-run", retries=3, retry_delay_seconds=2, retry_condition_fn=retry_on_transient)
def start_run(profile: Profile) -> str:
    """Open the pipeline's MLflow run with the resolved profile, versions and Prefect links."""
    client = tracking.client()
    exp = tracking.experiment_id(profile.registry.model_name)
    tags = {"quantmill.version": quantmill.__version__, "mlflow.runName": profile.name}
    ctx = get_run_context()
    flow_run = getattr(getattr(ctx, "task_run", None), "flow_run_id", None)
    if flow_run:
        tags["prefect.flow_run_id"] = str(flow_run)
    run = client.create_run(exp, tags=tags)
    params = tracking.flatten(profile.model_dump(mode="json"), "profile.")
    params.update({f"lib.{k}": v for k, v in library_versions().items()})
    for i in range(0, len(params), 90):
        batch = dict(list(params.items())[i : i + 90])
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in batch.items()])
    client.log_dict(run.info.run_id, profile.model_dump(mode="json"), "profile.json")
    return run.info.run_id


@task(name="log-results", retries=3, retry_delay_seconds=2, retry_condition_fn=retry_on_transient)
def log_results(run_id: str, rows: list[dict[str, Any]], status: str = "FINISHED") -> None:
    """Log per-variant metrics and the comparison table, then close the run."""
    from mlflow.entities import Metric

    client = tracking.client()
    metrics = []
    now = int(time.time() * 1000)
    for row in rows:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics.append(Metric(f"{row['variant']}.{k}", float(v), now, 0))
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500])
    client.log_text(run_id, json.dumps(rows, indent=2, default=str), "report/variants.json")
    client.set_terminated(run_id, status)
