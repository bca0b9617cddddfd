"""The quantize flow: download -> merge -> calibrate -> quantize -> evaluate -> register.

`prepare`, `variants` and `finish` are the three stages every flow wires: the sweep flow
(flows/sweep.py) reuses them with its recipes fanned out on a configurable task runner.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from pydantic import BaseModel, ConfigDict

from quantmill.context import StepContext
from quantmill.devices import pick_device
from quantmill.flows.hooks import step_hooks
from quantmill.memory import give_back
from quantmill.metrics import ppl_delta_pct
from quantmill.profile import Profile
from quantmill.recipes import Recipe
from quantmill.refs import EvalRef, Lineage, Variant
from quantmill.tasks.calibrate import calibrate
from quantmill.tasks.download import download
from quantmill.tasks.evaluate import eval_data, evaluate, gate
from quantmill.tasks.merge import merge
from quantmill.tasks.preflight import check_inputs, preflight
from quantmill.tasks.quantize import quantize
from quantmill.tasks.register import promote, register
from quantmill.tasks.report import publish_report
from quantmill.tasks.track import RUN_HOOKS, log_lineage, log_results, start_run


class RunSummary(BaseModel):
    """What a pipeline run produced: one row per variant, aliases, the MLflow run."""

    run_id: str
    model_name: str
    baseline: dict[str, Any]
    rows: list[dict[str, Any]]
    aliases: dict[str, str]
    notes: list[str] = []
    rss_bytes: dict[str, int] = {}  # process RSS before the variants and after each one (memory given back)
    peak_bytes: dict[str, int] = {}  # each step's peak process RSS (baseline included), as `quantmill plan` names it
    evaluation: dict[str, Any] = {}  # what the perplexity is over (EvalDataRef.description())


class Shared(BaseModel):
    """Outputs of the steps every variant shares (computed once per run)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    ctx: StepContext  # the store, the device and the MLflow run every step uses
    lineage: Lineage  # base, merged model, calibration, eval windows, baseline
    recipes: list[Recipe]  # those that fit this model and device
    skipped: list[str]  # grid recipes that did not, one line each


class Chain(NamedTuple):
    """One variant's submitted steps: futures of its Variant's fields."""

    ckpt: PrefectFuture
    result: PrefectFuture
    verdict: PrefectFuture
    version: PrefectFuture


def summary_row(variant: Variant, baseline: EvalRef) -> dict[str, Any]:
    """One line of the comparison table."""
    ckpt, result, verdict, version = variant.ckpt, variant.result, variant.verdict, variant.version
    ppl, base = result.metrics["perplexity"], baseline.metrics["perplexity"]
    return {
        "variant": ckpt.name, "method": ckpt.method, "bits": ckpt.config.get("bits", ckpt.extra.get("bits")),
        "size_bytes": ckpt.size_bytes, "compression": baseline.metrics["size_bytes"] / max(ckpt.size_bytes, 1),
        "perplexity": ppl, "ppl_delta_pct": ppl_delta_pct(ppl, base), **{
            k: v for k, v in result.metrics.items() if k not in {"perplexity", "size_bytes", "nll"}
        },
        "gate": "pass" if verdict.passed else "FAIL", "reasons": "; ".join(verdict.reasons),
        "version": version,
    }


def prepare(profile: Profile, peaks: dict[str, int] | None = None) -> Shared:
    """Run the shared steps: tracking run, download, merge, preflight, calibration, eval data, baseline."""
    store = profile.storage.root
    device = pick_device() if profile.device == "auto" else profile.device
    recipes, skipped = profile.all_recipes()
    grid = [r.name for r in recipes[len(profile.recipes):]]
    check_inputs(profile)  # local inputs, writable folders, text lengths, disk: before download/merge and the MLflow run
    ctx = StepContext(store_root=store, device=device, run_id=start_run(profile))
    base = download.with_options(**step_hooks("download", peaks))(profile.model, ctx=ctx)
    model = merge.with_options(**step_hooks("merge", peaks))(base, profile.adapter, spec=profile.merge, ctx=ctx)
    misfits = preflight(model, recipes, optional=grid, calibration=profile.calibration,
                        evaluation=profile.evaluation, ctx=ctx)
    recipes = [r for r in recipes if r.name not in misfits]
    calib = calibrate.with_options(**step_hooks("calibrate", peaks))(model, profile.calibration, ctx=ctx)
    data = eval_data(model, profile.evaluation, ctx=ctx)
    baseline = evaluate.with_options(**step_hooks("evaluate/baseline", peaks))(model, data, ctx=ctx,
                                                                              spec=profile.evaluation)
    lineage = Lineage(base=base, model=model, calib=calib, data=data, baseline=baseline)
    return Shared(ctx=ctx, lineage=lineage, recipes=recipes,
                  skipped=skipped + [f"{name}: {why}" for name, why in misfits.items()])


def variants(profile: Profile, shared: Shared, recipes: list[Recipe],
             peaks: dict[str, int] | None = None) -> list[Chain]:
    """Submit each recipe's quantize -> evaluate -> gate -> register chain to the flow's task runner.

    Stage by stage (every quantize first), so a thread pool starts the heavy steps before any task
    waits on its upstream; a Dask runner hands the dependencies to its scheduler either way.
    """
    ctx, lin = shared.ctx, shared.lineage
    # Each heavy step logs its peak RSS and gives its memory back when it ends (threads of a sweep included).
    ckpts = [quantize.with_options(**step_hooks(f"quantize/{r.name}", peaks)).submit(lin.model, r, calib=lin.calib, ctx=ctx)
             for r in recipes]
    results = [evaluate.with_options(**step_hooks(f"evaluate/{r.name}", peaks)).submit(
        c, lin.data, ctx=ctx, baseline=lin.baseline, spec=profile.evaluation) for r, c in zip(recipes, ckpts)]
    verdicts = [gate.submit(c, r, baseline=lin.baseline, spec=profile.evaluation) for c, r in zip(ckpts, results)]
    versions = [
        register.submit(c, r, v, lineage=lin, registry=profile.registry, ctx=ctx)
        for c, r, v in zip(ckpts, results, verdicts)
    ]
    return [Chain(*chain) for chain in zip(ckpts, results, verdicts, versions)]


def finish(profile: Profile, shared: Shared, variants: list[Variant], *, failed: list[str] = (),
           rss_bytes: dict[str, int] | None = None, peak_bytes: dict[str, int] | None = None) -> RunSummary:
    """Move aliases once, log lineage and the comparison report (with skipped/failed recipes), summarise."""
    s, lin, run_id = shared, shared.lineage, shared.ctx.run_id
    rows = [summary_row(v, lin.baseline) for v in variants]
    aliases = promote(profile.registry)
    log_lineage(lin, variants, ctx=s.ctx)
    notes = [f"skipped (sweep.grid): {line}" for line in s.skipped] + [f"failed: {line}" for line in failed]
    publish_report(rows, baseline=lin.baseline.metrics, model_name=profile.registry.model_name, notes=notes,
                   evaluation=lin.data.description(), ctx=s.ctx)
    log_results(run_id, rows)
    return RunSummary(
        run_id=run_id, model_name=profile.registry.model_name, baseline=lin.baseline.metrics, rows=rows,
        aliases=aliases, notes=notes, evaluation=lin.data.description(), rss_bytes=rss_bytes or {},
        peak_bytes=peak_bytes or {},
    )


def resolved(chain: Chain) -> Variant:
    """Wait for one variant's chain and return its results (raises the first failure)."""
    return Variant(**{field: future.result() for field, future in chain._asdict().items()})


@flow(name="quantize", log_prints=True, **RUN_HOOKS)  # the MLflow run ends FAILED/KILLED with the flow
def quantize_pipeline(profile: Profile) -> RunSummary:
    """Turn one run profile into quantized, evaluated, registered model variants."""
    peaks: dict[str, int] = {}
    shared = prepare(profile, peaks)
    # One variant at a time: each holds a model copy in memory (the sweep flow fans them out instead); after
    # each, the process is back to its pre-variant footprint (quantmill.memory), logged and in the summary.
    rss, done = {"before variants": give_back()}, []
    for recipe in shared.recipes:
        done.append(resolved(variants(profile, shared, [recipe], peaks)[0]))
        rss[recipe.name] = give_back()
        get_run_logger().info("memory: process RSS %.0f MiB after %s (%.0f MiB before the variants)",
                              rss[recipe.name] / 2**20, recipe.name, rss["before variants"] / 2**20)
    return finish(profile, shared, done, rss_bytes=rss, peak_bytes=peaks)


@flow(name="quantize-profile-file", log_prints=True)
def quantize_profile_file(profile_path: str, overrides: list[str] | None = None) -> RunSummary:
    """Run the pipeline on a profile file (for schedules): validated at run time, then the quantize flow."""
    from quantmill.profile_io import load_profile

    return quantize_pipeline(load_profile(profile_path, overrides or []))
