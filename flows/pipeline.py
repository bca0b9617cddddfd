"""The quantize flow: download -> merge -> calibrate -> quantize -> evaluate -> register.

`prepare`, `variants` and `finish` are the three stages every flow wires: the sweep flow
(flows/sweep.py) reuses them with its recipes fanned out on a configurable task runner.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.futures import PrefectFuture
from pydantic import BaseModel, ConfigDict

from quantmill.profile import Profile, Recipe
from quantmill.refs import CalibRef, EvalDataRef, EvalRef, ModelRef
from tasks.calibrate import calibrate
from tasks.download import download
from tasks.evaluate import eval_data, evaluate, gate
from tasks.merge import merge
from tasks.preflight import check_inputs, preflight
from tasks.quantize import quantize
from tasks.quantize.common import pick_device
from tasks.register import promote, register
from tasks.report import publish_report
from tasks.track import RUN_HOOKS, log_lineage, log_results, start_run


class RunSummary(BaseModel):
    """What a pipeline run produced: one row per variant, aliases, the MLflow run."""

    run_id: str
    model_name: str
    baseline: dict[str, Any]
    rows: list[dict[str, Any]]
    aliases: dict[str, str]
    notes: list[str] = []
    evaluation: dict[str, Any] = {}  # what the perplexity is over (EvalDataRef.description())


class Shared(BaseModel):
    """Outputs of the steps every variant shares (computed once per run)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    run_id: str
    device: str
    base: ModelRef
    model: ModelRef
    calib: CalibRef
    data: EvalDataRef
    baseline: EvalRef
    recipes: list[Recipe]  # those that fit this model and device
    skipped: list[str]  # grid recipes that did not, one line each


def summary_row(ckpt, result, baseline, verdict, version) -> dict[str, Any]:  # noqa: ANN001
    """One line of the comparison table."""
    ppl, base = result.metrics["perplexity"], baseline.metrics["perplexity"]
    return {
        "variant": ckpt.name, "method": ckpt.method, "bits": ckpt.config.get("bits", ckpt.extra.get("bits")),
        "size_bytes": ckpt.size_bytes, "compression": baseline.metrics["size_bytes"] / max(ckpt.size_bytes, 1),
        "perplexity": ppl, "ppl_delta_pct": 100.0 * (ppl / base - 1.0), **{
            k: v for k, v in result.metrics.items() if k not in {"perplexity", "size_bytes", "nll"}
        },
        "gate": "pass" if verdict.passed else "FAIL", "reasons": "; ".join(verdict.reasons),
        "version": version,
    }


def prepare(profile: Profile) -> Shared:
    """Run the shared steps: tracking run, download, merge, preflight, calibration, eval data, baseline."""
    store = profile.storage.root
    device = pick_device() if profile.device == "auto" else profile.device
    recipes, skipped = profile.all_recipes()
    grid = [r.name for r in recipes[len(profile.recipes):]]
    check_inputs(profile)  # local inputs, writable folders, text lengths, disk: before download/merge and the MLflow run
    run_id = start_run(profile)
    base = download(profile.model, store)
    model = merge(base, profile.adapter, store, profile.merge)
    misfits = preflight(model, recipes, device, store, optional=grid)
    recipes = [r for r in recipes if r.name not in misfits]
    calib = calibrate(model, profile.calibration, store)
    data = eval_data(model, profile.evaluation, store)
    baseline = evaluate(model, data, device, store, spec=profile.evaluation)
    return Shared(run_id=run_id, device=device, base=base, model=model, calib=calib, data=data, baseline=baseline,
                  recipes=recipes, skipped=skipped + [f"{name}: {why}" for name, why in misfits.items()])


def variants(profile: Profile, shared: Shared, recipes: list[Recipe]) -> list[dict[str, PrefectFuture]]:
    """Submit each recipe's quantize -> evaluate -> gate -> register chain to the flow's task runner.

    Stage by stage (every quantize first), so a thread pool starts the heavy steps before any task
    waits on its upstream; a Dask runner hands the dependencies to its scheduler either way.
    """
    s, store = shared, profile.storage.root
    ckpts = [quantize.submit(s.model, recipe, s.calib, s.device, store) for recipe in recipes]
    results = [evaluate.submit(c, s.data, s.device, store, baseline=s.baseline, spec=profile.evaluation) for c in ckpts]
    verdicts = [gate.submit(c, r, s.baseline, profile.evaluation) for c, r in zip(ckpts, results)]
    versions = [
        register.submit(c, r, v, s.baseline, s.base, s.model, s.calib, profile.registry, s.run_id)
        for c, r, v in zip(ckpts, results, verdicts)
    ]
    keys = ("ckpt", "result", "verdict", "version")
    return [dict(zip(keys, chain)) for chain in zip(ckpts, results, verdicts, versions)]


def finish(profile: Profile, shared: Shared, variants: list[dict[str, Any]], failed: list[str] = ()) -> RunSummary:
    """Move aliases once, log lineage and the comparison report (with skipped/failed recipes), summarise."""
    s = shared
    rows = [summary_row(v["ckpt"], v["result"], s.baseline, v["verdict"], v["version"]) for v in variants]
    aliases = promote(profile.registry)
    log_lineage(s.run_id, s.base, s.model, s.calib, s.data, s.baseline, variants)
    notes = [f"skipped (sweep.grid): {line}" for line in s.skipped] + [f"failed: {line}" for line in failed]
    publish_report(s.run_id, rows, s.baseline.metrics, profile.registry.model_name, s.device, notes,
                   evaluation=s.data.description())
    log_results(s.run_id, rows)
    return RunSummary(
        run_id=s.run_id, model_name=profile.registry.model_name, baseline=s.baseline.metrics, rows=rows,
        aliases=aliases, notes=notes, evaluation=s.data.description(),
    )


def resolved(futures: dict[str, PrefectFuture]) -> dict[str, Any]:
    """Wait for one variant's chain and return its results (raises the first failure)."""
    return {k: f.result() for k, f in futures.items()}


@flow(name="quantize", log_prints=True, **RUN_HOOKS)  # the MLflow run ends FAILED/KILLED with the flow
def quantize_pipeline(profile: Profile) -> RunSummary:
    """Turn one run profile into quantized, evaluated, registered model variants."""
    shared = prepare(profile)
    # One variant at a time: each holds a model copy in memory (the sweep flow fans them out instead).
    done = [resolved(variants(profile, shared, [recipe])[0]) for recipe in shared.recipes]
    return finish(profile, shared, done)


@flow(name="quantize-profile-file", log_prints=True)
def quantize_profile_file(profile_path: str, overrides: list[str] | None = None) -> RunSummary:
    """Run the pipeline on a profile file (for schedules): validated at run time, then the quantize flow."""
    from quantmill.profile import load_profile

    return quantize_pipeline(load_profile(profile_path, overrides or []))
