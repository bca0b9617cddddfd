"""Register step: passing variants become MLflow model versions (idempotent), aliases move."""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task

from quantmill import mlmodel, modelcard, state, tracking
from quantmill.context import StepContext
from quantmill.errors import retry_on_transient
from quantmill.locks import file_lock
from quantmill.metrics import ppl_delta_pct
from quantmill.profile import Registry
from quantmill.refs import CheckpointRef, EvalRef, Lineage, Verdict
from quantmill.tasks._cache import StepCache, network_retries

CODE_VERSION = "2"
SHA_TAG = tracking.SHA_TAG
LAYOUT_TAG = "quantmill.layout"


def version_tags(ckpt: CheckpointRef, result: EvalRef, *, lineage: Lineage, digest: str) -> dict[str, str]:
    """Tags every registered version carries (what, from where, how good): JSON or plain strings."""
    cfg, baseline, base = ckpt.config, lineage.baseline, lineage.base
    delta = ppl_delta_pct(result.metrics["perplexity"], baseline.metrics["perplexity"])
    return {
        SHA_TAG: digest,
        "checkpoint_store_sha256": ckpt.sha256,  # the store's artifact (cache controls keep what versions need)
        LAYOUT_TAG: mlmodel.LAYOUT,
        "variant": ckpt.name,
        "method": ckpt.method,
        "bits": json.dumps(cfg.get("bits", ckpt.extra.get("bits"))),  # gguf: from its type (extra)
        "group_size": json.dumps(cfg.get("group_size")),
        "method_config": json.dumps(cfg, sort_keys=True),
        "base_model": mlmodel.public_label(base.source),
        "base_revision": str(base.revision or ""),
        **lineage_hashes(lineage),
        "calibration_digest": str(ckpt.calib_digest or ""),
        "calibration_used": json.dumps(ckpt.calib_digest is not None),
        "eval_digest": result.eval_digest,
        "perplexity": f"{result.metrics['perplexity']:.6g}",
        "baseline_perplexity": f"{baseline.metrics['perplexity']:.6g}",
        "ppl_delta_pct": f"{delta:.4f}",
        "size_bytes": str(ckpt.size_bytes),
        "gate": "passed",
    }


def lineage_hashes(lineage: Lineage) -> dict[str, str]:
    """Base, adapter and merged model hashes, each under its own name (tags, quantmill.json, card)."""
    base, model = lineage.base, lineage.model
    return {"base_sha256": base.sha256, "adapter_sha256": str(model.adapter_sha256 or ""),
            "merged_sha256": model.sha256 if model.merged else ""}


def published_sidecar(ckpt: CheckpointRef, lineage: Lineage) -> dict[str, Any]:
    """The checkpoint's quantmill.json as published: same hash names as the tags, no machine path."""
    try:
        sidecar = json.loads((Path(ckpt.path) / "quantmill.json").read_text())
    except (OSError, ValueError):
        sidecar = {"method": ckpt.method, "name": ckpt.name, "config": ckpt.config}
    sidecar.pop("base_source", None)
    base = lineage.base
    sidecar.update(base_model=mlmodel.public_label(base.source), base_revision=base.revision, **lineage_hashes(lineage))
    return sidecar


def find_version(client, name: str, digest: str, legacy_sha: str | None = None):  # noqa: ANN001, ANN201
    """The READY version of `name` holding this checkpoint: by serving digest, or (versions written before
    layout 2) by the old whole-folder hash."""
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.status != "READY":
            continue
        sha = mv.tags.get(SHA_TAG)
        if sha == digest or (legacy_sha and LAYOUT_TAG not in mv.tags and sha == legacy_sha):
            return mv
    return None


def _verify(key: str, inputs: dict[str, Any]) -> str | None:
    """A cached registration is valid only while its version still exists."""
    if not inputs["verdict"].passed:
        return None
    try:
        ckpt = inputs["ckpt"]
        found = find_version(tracking.client(), inputs["registry"].model_name, mlmodel.serving_digest(Path(ckpt.path)),
                             ckpt.sha256)
    except Exception:  # noqa: BLE001 - unknown model or unreachable store: recompute
        return "missing"
    return None if found else "missing"


REGISTER_CACHE = StepCache(step="register", code_version=CODE_VERSION, ignore=("device",), verifier=_verify)


@contextlib.contextmanager
def registry_lock(name: str) -> Iterator[None]:
    """Serialise registrations of one model name across processes on this machine."""
    with file_lock(state.home() / "locks" / f"registry-{name}.lock"):
        yield


def emit(event: str, name: str, version: str, payload: dict[str, Any]) -> None:
    """A Prefect event automations can react to."""
    from prefect.events import emit_event

    emit_event(
        event=event,
        resource={"prefect.resource.id": f"mlflow.registered-model.{name}", "prefect.resource.name": name},
        related=[{"prefect.resource.id": f"mlflow.model-version.{name}.{version}", "prefect.resource.role": "version"}],
        payload=payload,
    )


@task(
    name="register",
    **network_retries(3, backoff_factor=2),
    cache_policy=REGISTER_CACHE,
    persist_result=True,
)
def register(
    ckpt: CheckpointRef, result: EvalRef, verdict: Verdict, *, lineage: Lineage, registry: Registry, ctx: StepContext,
) -> str | None:
    """Register a passing variant as a model version (once per checkpoint content) under the run `ctx.run_id`;
    return its version."""
    import mlflow

    if not verdict.passed:
        return None
    client = tracking.client()
    name = registry.model_name
    digest = mlmodel.serving_digest(Path(ckpt.path))
    with registry_lock(name):
        try:
            client.create_registered_model(
                name, description=f"Quantized variants of {mlmodel.public_label(lineage.base.source)} (quantmill)")
        except mlflow.exceptions.MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        existing = find_version(client, name, digest, ckpt.sha256)
        if existing is not None:
            return str(existing.version)
        mv = _create_version(client, name, ckpt, result, lineage=lineage, run_id=ctx.run_id, digest=digest)
    emit("quantmill.model.registered", name, str(mv.version), {"variant": ckpt.name, "sha256": digest})
    return str(mv.version)


def _create_version(  # noqa: PLR0913 - keyword-only: where the version goes (client, name, run) and what it holds
    client, name: str, ckpt: CheckpointRef, result: EvalRef, *, lineage: Lineage, run_id: str, digest: str,  # noqa: ANN001 - an MlflowClient (mlflow imported lazily)
) -> Any:
    """Variant child run -> logged model (metrics, params, MLflow model files) -> model version."""
    base = lineage.base
    tags = version_tags(ckpt, result, lineage=lineage, digest=digest)
    card = modelcard.render(name, ckpt, result, lineage=lineage)
    metrics = tracking.variant_metrics(ckpt, result, lineage.baseline)
    exp = client.get_run(run_id).info.experiment_id
    child = tracking.child_run(client, run_id, exp, f"evaluate/{ckpt.name}", params={"variant": ckpt.name},
                               tags={"quantmill.variant": ckpt.name, "gate": "passed"})
    params = {"method": ckpt.method, "method_config": json.dumps(ckpt.config, sort_keys=True),
              **tracking.flatten(ckpt.config, "config.")}
    logged = client.create_logged_model(exp, name=ckpt.name, source_run_id=child, tags=tags, params=params,
                                        model_type="quantized-causal-lm")
    tracking.log_metrics(client, child, metrics, model_id=logged.model_id)
    with tempfile.TemporaryDirectory(dir=state.home()) as tmp:
        staged = mlmodel.stage_version(
            Path(ckpt.path), Path(tmp) / "version", method=ckpt.method, label=mlmodel.public_label(base.source),
            card=card, sidecar=published_sidecar(ckpt, lineage), run_id=child, model_id=logged.model_id,
        )
        how = mlmodel.publish(client, logged.model_id, logged.artifact_location, staged)
    client.set_logged_model_tags(logged.model_id, {"quantmill.stored": how})
    client.finalize_logged_model(logged.model_id, "READY")
    mv = client.create_model_version(
        name, source=f"models:/{logged.model_id}", run_id=child, tags=tags, model_id=logged.model_id,
        description=modelcard.body(card),
    )
    client.set_tag(child, "model_version", str(mv.version))
    # What mlflow.register_model records: the logged model shows as registered (the SQL registry keeps no
    # model_id column; `source` = models:/<model_id> is the link MLflow's UI and loaders follow).
    client.set_logged_model_tags(logged.model_id, {"mlflow.modelVersions": json.dumps(
        [{"name": name, "version": str(mv.version)}])})
    return mv


def _alias(text: str) -> str:
    return re.sub(r"[^\w-]", "-", text)


@task(name="promote", retries=3, retry_condition_fn=retry_on_transient, retry_delay_seconds=2)
def promote(registry: Registry) -> dict[str, str]:
    """Point `candidate-<method>` at each method's newest version and `champion` at the best one."""
    client = tracking.client()
    name = registry.model_name
    # read, then move: two runs of one model at once would both find an alias unset and both insert it (MLflow's
    # SQLite store: UNIQUE constraint failed, seen 2026-12-02 in the two-concurrent-runs test)
    with registry_lock(name):
        return _move_aliases(client, name, registry)


def _move_aliases(client, name: str, registry: Registry) -> dict[str, str]:  # noqa: ANN001 - an MlflowClient
    versions = [mv for mv in client.search_model_versions(f"name='{name}'") if mv.tags.get("gate") == "passed"]
    if not versions:
        return {}
    moved: dict[str, str] = {}
    newest: dict[str, Any] = {}
    for mv in versions:
        m = mv.tags.get("method", "unknown")
        if m not in newest or int(mv.version) > int(newest[m].version):
            newest[m] = mv
    if "candidate" in registry.aliases:
        for m, mv in newest.items():
            moved[f"candidate-{_alias(m)}"] = str(mv.version)
    if "champion" in registry.aliases:
        if registry.champion_objective == "smallest_size":
            rank = lambda mv: (int(mv.tags["size_bytes"]), float(mv.tags["perplexity"]), -int(mv.version))  # noqa: E731
        else:
            rank = lambda mv: (float(mv.tags["perplexity"]), int(mv.tags["size_bytes"]), -int(mv.version))  # noqa: E731
        moved["champion"] = str(min(versions, key=rank).version)
    for alias, version in moved.items():
        current = next((mv.version for mv in versions if alias in (mv.aliases or [])), None)
        if str(current) != version:
            client.set_registered_model_alias(name, alias, version)
            if alias == "champion":
                emit("quantmill.champion.moved", name, version, {"from": str(current), "to": version})
    return moved
