"""Register step: passing variants become MLflow model versions (idempotent), aliases move."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from prefect import task
from prefect.tasks import exponential_backoff

from quantmill import modelcard, state, tracking
from quantmill.caching import StepCache
from quantmill.errors import retry_on_transient
from quantmill.profile import Registry
from quantmill.refs import CalibRef, CheckpointRef, EvalRef, ModelRef, Verdict
from quantmill.store import MANIFEST

CODE_VERSION = "1"
SHA_TAG = "quantmill.checkpoint_sha256"


def version_tags(
    ckpt: CheckpointRef, result: EvalRef, baseline: EvalRef, base: ModelRef, model: ModelRef, calib: CalibRef | None
) -> dict[str, str]:
    """Tags every registered version carries (what, from where, how good)."""
    cfg = ckpt.config
    delta = 100.0 * (result.metrics["perplexity"] / baseline.metrics["perplexity"] - 1.0)
    return {
        SHA_TAG: ckpt.sha256,
        "variant": ckpt.name,
        "method": ckpt.method,
        "bits": str(cfg.get("bits", ckpt.extra.get("bits", ""))),  # gguf: from its type (extra)
        "group_size": str(cfg.get("group_size", "")),
        "method_config": str(cfg),
        "base_model": base.source,
        "base_revision": str(base.revision or ""),
        "base_sha256": base.sha256,
        "adapter_sha256": str(model.adapter_sha256 or ""),
        "merged_sha256": model.sha256 if model.merged else "",
        "calibration_digest": str(ckpt.calib_digest or (calib.digest if calib else "")),
        "calibration_used": str(ckpt.calib_digest is not None).lower(),
        "eval_digest": result.eval_digest,
        "perplexity": f"{result.metrics['perplexity']:.6g}",
        "baseline_perplexity": f"{baseline.metrics['perplexity']:.6g}",
        "ppl_delta_pct": f"{delta:.4f}",
        "size_bytes": str(ckpt.size_bytes),
        "gate": "passed",
    }


def find_version(client, name: str, sha: str):  # noqa: ANN001, ANN201
    """The READY version of `name` holding checkpoint `sha`, if any."""
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get(SHA_TAG) == sha and mv.status == "READY":
            return mv
    return None


def _verify(key: str, inputs: dict[str, Any]) -> str | None:
    """A cached registration is valid only while its version still exists."""
    if not inputs["verdict"].passed:
        return None
    try:
        found = find_version(tracking.client(), inputs["registry"].model_name, inputs["ckpt"].sha256)
    except Exception:  # noqa: BLE001 - unknown model or unreachable store: recompute
        return "missing"
    return None if found else "missing"


REGISTER_CACHE = StepCache(step="register", code_version=CODE_VERSION, verifier=_verify)


@contextlib.contextmanager
def registry_lock(name: str) -> Iterator[None]:
    """Serialise registrations of one model name across processes on this machine."""
    path = state.home() / "locks" / f"registry-{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def stage_with_card(ckpt: CheckpointRef, card: str, dest: Path) -> Path:
    """The checkpoint's files (hard links where possible) plus README.md, ready to upload."""
    for src in Path(ckpt.path).rglob("*"):
        if src.is_file() and src.name != MANIFEST:
            target = dest / src.relative_to(ckpt.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, target)
            except OSError:
                shutil.copy2(src, target)
    (dest / "README.md").write_text(card)
    return dest


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
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_transient,
    cache_policy=REGISTER_CACHE,
    persist_result=True,
)
def register(
    ckpt: CheckpointRef, result: EvalRef, verdict: Verdict, baseline: EvalRef, base: ModelRef,
    model: ModelRef, calib: CalibRef | None, registry: Registry, run_id: str,
) -> str | None:
    """Register a passing variant as a model version (once per checkpoint content); return its version."""
    import mlflow

    if not verdict.passed:
        return None
    client = tracking.client()
    name = registry.model_name
    with registry_lock(name):
        try:
            client.create_registered_model(name, description=f"Quantized variants of {base.source} (quantmill)")
        except mlflow.exceptions.MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        existing = find_version(client, name, ckpt.sha256)
        if existing is not None:
            return str(existing.version)
        tags = version_tags(ckpt, result, baseline, base, model, calib)
        card = modelcard.render(name, ckpt, result, baseline, base, model, calib.source if calib else None)
        logged = client.create_logged_model(
            tracking.experiment_id(name), name=ckpt.name, source_run_id=run_id, tags=tags,
            params=tracking.flatten(ckpt.config), model_type="quantized-causal-lm",
        )
        with tempfile.TemporaryDirectory(dir=state.home()) as tmp:
            client.log_model_artifacts(logged.model_id, str(stage_with_card(ckpt, card, Path(tmp))))
        client.finalize_logged_model(logged.model_id, "READY")
        mv = client.create_model_version(
            name, source=logged.artifact_location, run_id=run_id, tags=tags, model_id=logged.model_id,
            description=f"{ckpt.method} variant {ckpt.name} of {base.source}",
        )
    emit("quantmill.model.registered", name, str(mv.version), {"variant": ckpt.name, "sha256": ckpt.sha256})
    return str(mv.version)


def _alias(text: str) -> str:
    return re.sub(r"[^\w-]", "-", text)


@task(name="promote", retries=3, retry_condition_fn=retry_on_transient, retry_delay_seconds=2)
def promote(registry: Registry) -> dict[str, str]:
    """Point `candidate-<method>` at each method's newest version and `champion` at the best one."""
    client = tracking.client()
    name = registry.model_name
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
