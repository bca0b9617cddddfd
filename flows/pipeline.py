"""The quantize flow: download -> merge -> calibrate -> quantize -> evaluate -> register."""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel

from quantmill.profile import Profile
from tasks.calibrate import calibrate
from tasks.download import download
from tasks.evaluate import eval_data, evaluate, gate
from tasks.merge import merge
from tasks.preflight import preflight
from tasks.quantize import quantize
from tasks.quantize.common import pick_device
from tasks.register import promote, register
from tasks.report import publish_report
from tasks.track import log_lineage, log_results, start_run


class RunSummary(BaseModel):
    """What a pipeline run produced: one row per variant, aliases, the MLflow run."""

    run_id: str
    model_name: str
    baseline: dict[str, Any]
    rows: list[dict[str, Any]]
    aliases: dict[str, str]


def summary_row(ckpt, result, baseline, verdict, version) -> dict[str, Any]:  # noqa: ANN001
    """One line of the comparison table."""
    ppl, base = result.metrics["perplexity"], baseline.metrics["perplexity"]
    return {
        "variant": ckpt.name, "method": ckpt.method, "bits": ckpt.config.get("bits"),
        "size_bytes": ckpt.size_bytes, "compression": baseline.metrics["size_bytes"] / max(ckpt.size_bytes, 1),
        "perplexity": ppl, "ppl_delta_pct": 100.0 * (ppl / base - 1.0), **{
            k: v for k, v in result.metrics.items() if k not in {"perplexity", "size_bytes", "nll"}
        },
        "gate": "pass" if verdict.passed else "FAIL", "reasons": "; ".join(verdict.reasons),
        "version": version,
    }


@flow(name="quantize", log_prints=True)
def quantize_pipeline(profile: Profile) -> RunSummary:
    """Turn one run profile into quantized, evaluated, registered model variants."""
    store = profile.storage.root
    device = pick_device() if profile.device == "auto" else profile.device
    run_id = start_run(profile)
    base = download(profile.model, store)
    model = merge(base, profile.adapter, store, profile.merge)
    preflight(model, profile.recipes, device, store)
    calib = calibrate(model, profile.calibration, store)
    data = eval_data(model, profile.evaluation, store)
    baseline = evaluate(model, data, device, store, spec=profile.evaluation)
    rows, variants = [], []
    for recipe in profile.recipes:
        ckpt = quantize(model, recipe, calib, device, store)
        result = evaluate(ckpt, data, device, store, baseline=baseline, spec=profile.evaluation)
        verdict = gate(ckpt, result, baseline, profile.evaluation)
        version = register(ckpt, result, verdict, baseline, base, model, calib, profile.registry, run_id)
        rows.append(summary_row(ckpt, result, baseline, verdict, version))
        variants.append({"ckpt": ckpt, "result": result, "verdict": verdict, "version": version})
    aliases = promote(profile.registry)
    log_lineage(run_id, base, model, calib, data, baseline, variants)
    publish_report(run_id, rows, baseline.metrics, profile.registry.model_name, device)
    log_results(run_id, rows)
    return RunSummary(
        run_id=run_id, model_name=profile.registry.model_name, baseline=baseline.metrics, rows=rows, aliases=aliases
    )


@flow(name="quantize-profile-file", log_prints=True)
def quantize_profile_file(profile_path: str, overrides: list[str] | None = None) -> RunSummary:
    """Run the pipeline on a profile file (for schedules): validated at run time, then the quantize flow."""
    from quantmill.profile import load_profile

    return quantize_pipeline(load_profile(profile_path, overrides or []))
