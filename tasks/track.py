"""Lineage step: the MLflow parent run of a pipeline run, its params, metrics and report."""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import get_run_context
from prefect.settings import get_current_settings

import quantmill
from quantmill import state, tracking
from quantmill.context import StepContext
from quantmill.errors import retry_on_transient
from quantmill.memo import installed_versions
from quantmill.profile import Profile
from quantmill.refs import Lineage, Variant
from quantmill.tracking import child_run

LIBRARIES = ("torch", "transformers", "peft", "safetensors", "bitsandbytes", "gptqmodel", "torchao", "prefect", "mlflow")


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
        ui = get_current_settings().ui_url
        if ui:
            tags["prefect.flow_run_url"] = f"{ui}/runs/flow-run/{flow_run}"
    recover_dead_runs()
    run = client.create_run(exp, tags=tags)
    open_marker(run.info.run_id, str(flow_run or ""))
    params = tracking.flatten(profile.model_dump(mode="json"), "profile.")
    params.update({f"lib.{k}": v for k, v in installed_versions(*LIBRARIES).items()})  # what shapes the outputs
    for i in range(0, len(params), 90):
        batch = dict(list(params.items())[i : i + 90])
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in batch.items()])
    client.log_dict(run.info.run_id, profile.model_dump(mode="json"), "profile.json")
    return run.info.run_id


# ---------- honest end states: every parent run ends FINISHED, FAILED or KILLED ----------

def markers() -> Path:
    """Folder of open-run markers: one file per MLflow parent run still running, with its process and flow run."""
    return state.home() / "runs"


def open_marker(run_id: str, flow_run_id: str) -> None:
    """Record which process owns an open MLflow run (the next run closes it if that process died)."""
    markers().mkdir(parents=True, exist_ok=True)
    data = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(), "flow_run_id": flow_run_id}
    (markers() / f"{run_id}.json").write_text(json.dumps(data))


def open_runs() -> list[dict[str, Any]]:
    """Markers of MLflow runs this state folder opened and has not closed."""
    out = []
    for f in sorted(markers().glob("*.json")) if markers().is_dir() else []:
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            f.unlink(missing_ok=True)
    return out


def end_run(run_id: str, status: str, error: str) -> None:
    """End an MLflow run still RUNNING with `status` and the error as the tag `quantmill.error`; drop its marker."""
    from mlflow.entities import RunTag

    client = tracking.client()
    if client.get_run(run_id).info.status == "RUNNING":
        client.log_batch(run_id, tags=[RunTag("quantmill.error", error[:5000] or status)])
        client.set_terminated(run_id, status)
    (markers() / f"{run_id}.json").unlink(missing_ok=True)


def _error_of(flow_state: Any) -> str:
    """The exception a failed flow run raised, as the CLI prints it (else the state's message)."""
    from quantmill.errors import QuantmillError

    try:
        exc = flow_state.result(raise_on_failure=False)
    except Exception as err:  # noqa: BLE001 - the result may not be retrievable; the message still is
        exc = err
    if isinstance(exc, QuantmillError):
        return str(exc)
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    return flow_state.message or flow_state.name


def close_flow_run(flow: Any, flow_run: Any, flow_state: Any) -> None:
    """Prefect flow hook: end the flow run's MLflow parent run FAILED (failure) or KILLED (crash: SIGTERM, ^C)."""
    mine = [m for m in open_runs() if m.get("flow_run_id") == str(flow_run.id)]
    if flow_state.is_completed():
        for m in mine:  # log_results closed it FINISHED
            (markers() / f"{m['run_id']}.json").unlink(missing_ok=True)
        return
    status = "KILLED" if flow_state.is_crashed() or flow_state.is_cancelled() else "FAILED"
    for m in mine:
        end_run(m["run_id"], status, _error_of(flow_state))


RUN_HOOKS = {"on_failure": [close_flow_run], "on_crashed": [close_flow_run], "on_cancellation": [close_flow_run],
             "on_completion": [close_flow_run]}


def crash_flow_run(flow_run_id: str, message: str) -> None:
    """Mark a flow run (and its unfinished task runs) Crashed when the process running it died."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        if run.state is not None and not run.state.is_final():
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
        for tr in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))):
            if tr.state is not None and not tr.state.is_final():
                client.set_task_run_state(tr.id, Crashed(message=message), force=True)


def recover_dead_runs() -> list[str]:
    """Close what runs killed outright (kill -9, OOM killer) left open: MLflow run KILLED, flow run Crashed."""
    closed = []
    for m in open_runs():
        if m.get("host") == socket.gethostname() and state.pid_alive(int(m.get("pid", 0))):
            continue
        msg = f"process {m.get('pid')} on {m.get('host')} died before the run finished (killed); closed by a later run"
        try:
            if m.get("flow_run_id"):
                crash_flow_run(m["flow_run_id"], msg)
            end_run(m["run_id"], "KILLED", msg)
            closed.append(m["run_id"])
        except Exception as exc:  # noqa: BLE001 - another store or server: leave the marker for a later run
            get_run_logger_or_none(f"could not close dead run {m['run_id']}: {exc}")
    return closed


def get_run_logger_or_none(message: str) -> None:
    """Log a warning through Prefect's run logger when there is one."""
    import logging

    try:
        from prefect.logging import get_run_logger

        get_run_logger().warning(message)
    except Exception:  # noqa: BLE001 - outside a run
        logging.getLogger("quantmill.track").warning(message)


@task(name="log-results", retries=3, retry_delay_seconds=2, retry_condition_fn=retry_on_transient)
def log_results(run_id: str, rows: list[dict[str, Any]], status: str = "FINISHED") -> None:
    """Log the comparison table (per-variant metrics live on the variants' child runs), then close the run."""
    client = tracking.client()
    client.log_text(run_id, json.dumps(rows, indent=2, default=str), "report/variants.json")
    client.set_terminated(run_id, status)


def git_commit() -> str:
    """quantmill's own commit when run from a checkout, else 'unknown'."""
    import subprocess
    from pathlib import Path

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dataset_input(name: str, source: str, digest: str, context: str):  # noqa: ANN201 - mlflow DatasetInput
    """An MLflow dataset input (source + digest) for calibration or evaluation data."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import HuggingFaceDatasetSource, LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    if source.startswith("/") or source.startswith("."):
        src = LocalArtifactDatasetSource(source)
    else:
        src = HuggingFaceDatasetSource(path=source.split(":")[0].rstrip("/"))
    ds = MetaDataset(source=src, name=name, digest=digest[:36])
    return DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])


@task(name="log-lineage", retries=3, retry_delay_seconds=2, retry_condition_fn=retry_on_transient)
def log_lineage(lineage: Lineage, variants: list[Variant], *, ctx: StepContext) -> None:
    """Child runs per step and per variant under the run `ctx.run_id`: content hashes, dataset inputs, Prefect
    cross-links."""
    from prefect.artifacts import create_link_artifact

    run_id, base, model, calib, data, baseline = (ctx.run_id, lineage.base, lineage.model, lineage.calib, lineage.data,
                                                  lineage.baseline)
    client = tracking.client()
    parent = client.get_run(run_id)
    exp = parent.info.experiment_id
    hashes = {"base_sha256": base.sha256, "merged_sha256": model.sha256 if model.merged else "",
              "adapter_sha256": model.adapter_sha256 or "", "calibration_digest": calib.digest,
              "eval_digest": data.digest}
    for k, v in hashes.items():
        client.set_tag(run_id, f"quantmill.{k}", v)
    client.set_tag(run_id, "quantmill.commit", git_commit())
    child_run(client, run_id, exp, "download", params={"source": base.source, "revision": base.revision},
              tags={"sha256": base.sha256, **{f"model.{k}": v for k, v in base.summary.items()}})
    merge_facts = {k: model.summary.get(k) for k in ("merge", "adapter_training") if model.summary.get(k)}
    child_run(client, run_id, exp, "merge", params={"adapter": bool(model.merged), **tracking.flatten(merge_facts)},
              tags={"merged_sha256": model.sha256, "adapter_sha256": model.adapter_sha256 or ""})
    cal = child_run(client, run_id, exp, "calibrate",
                    params={"num_samples": calib.num_samples, "seq_len": calib.seq_len, "seed": calib.seed,
                            "source": calib.source, "mode": calib.mode, "preparation": calib.preparation},
                    tags={"digest": calib.digest})
    log_inputs = functools.partial(tracking.tolerating_races, client.log_inputs)  # one dataset row, many runs
    log_inputs(cal, [dataset_input("calibration", calib.source, calib.digest, "calibration")])
    log_inputs(run_id, [dataset_input("calibration", calib.source, calib.digest, "calibration"),
                        dataset_input("evaluation", data.source, data.digest, "evaluation")])
    ev = child_run(client, run_id, exp, "evaluate/baseline", params=data.description(),
                   tags={"eval_digest": data.digest}, metrics=baseline.metrics)
    log_inputs(ev, [dataset_input("evaluation", data.source, data.digest, "evaluation")])
    for v in variants:
        ckpt, result, verdict = v.ckpt, v.result, v.verdict
        child_run(client, run_id, exp, f"quantize/{ckpt.name}", params=tracking.flatten(ckpt.config, "config."),
                  tags={"checkpoint_sha256": ckpt.sha256, "kept_modules": ",".join(ckpt.kept_modules),
                        "quantized_modules": len(ckpt.quantized_modules)},
                  metrics={**{f"layer_error.{k}": e for k, e in list(ckpt.layer_errors.items())[:500]},
                           "size_bytes": ckpt.size_bytes})
        gate_tags = {"gate": "passed" if verdict.passed else "failed", "gate_reasons": "; ".join(verdict.reasons),
                     "model_version": v.version or ""}
        registered = tracking.variant_run(client, run_id, ckpt.name)  # the register step made it (version's run)
        if registered:
            for k, val in gate_tags.items():
                client.set_tag(registered, k, str(val))
        else:
            child_run(client, run_id, exp, f"evaluate/{ckpt.name}", params={"variant": ckpt.name},
                      tags={"quantmill.variant": ckpt.name, **gate_tags},
                      metrics=tracking.variant_metrics(ckpt, result, baseline))
    create_link_artifact(
        key="mlflow-run", link=f"{state.tracking_uri()}#/experiments/{exp}/runs/{run_id}",
        link_text=f"MLflow run {run_id}", description="The pipeline's MLflow run (lineage, metrics, report)",
    )
