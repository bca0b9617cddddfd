"""The sweep flow: one model, many recipes; shared steps once, variants fanned out on a task runner."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel

from quantmill.errors import QuantmillError
from quantmill.flows.pipeline import RunSummary, Shared, finish, prepare, resolved, variants
from quantmill.memory import give_back
from quantmill.profile import Profile
from quantmill.recipes import Sweep
from quantmill.refs import Variant
from quantmill.tasks.track import RUN_HOOKS


class Failed(BaseModel):
    """A variant whose chain raised: its recipe and the first line of the error."""

    name: str
    error: str


def api_url() -> str:
    """The Prefect API this flow reports to (the temporary server's URL when none is configured)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


def task_runner(spec: Sweep.Runner) -> TaskRunner:
    """Threads in this process, a local Dask cluster, or the Dask scheduler at `spec.address`."""
    if spec.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=spec.max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise QuantmillError("sweep.runner.kind: dask needs the `dask` extra: pip install 'quantmill[dask]'") from None
    if spec.address:
        if not os.environ.get("PREFECT_API_URL"):
            raise QuantmillError("sweep.runner.address: workers of a remote Dask cluster report to a Prefect server; "
                                 "start one and set PREFECT_API_URL (README: Run as a service)")
        return DaskTaskRunner(address=spec.address)
    # Local workers report task runs to this flow's API (else each would start a temporary server of its own),
    # and split the cores between them (torch in each would otherwise start a thread per core).
    threads = str(max(1, (os.cpu_count() or 1) // (spec.max_workers * spec.threads_per_worker)))
    env = {"PREFECT_API_URL": api_url(), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "GPTQMODEL_CPU_WORKERS": threads}
    cluster: dict[str, Any] = {"n_workers": spec.max_workers, "threads_per_worker": spec.threads_per_worker,
                               "processes": True, "dashboard_address": ":0", "env": env}
    if spec.memory_limit:
        cluster["memory_limit"] = spec.memory_limit
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster)


@flow(name="sweep-variants", log_prints=True)
def fan_out(profile: Profile, shared: Shared) -> list[Variant | Failed]:
    """Submit every recipe's chain at once; return each variant's results, or its error."""
    out = []
    for recipe, chain in zip(shared.recipes, variants(profile, shared, shared.recipes)):
        try:
            out.append(resolved(chain))
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not lose the others
            get_run_logger().error("variant %s failed: %s", recipe.name, exc)
            out.append(Failed(name=recipe.name, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500]))
        get_run_logger().info("memory: process RSS %.0f MiB after %s", give_back() / 2**20, recipe.name)
    return out


@flow(name="sweep", log_prints=True, **RUN_HOOKS)
def sweep(profile: Profile) -> RunSummary:
    """Quantize one model with a grid of recipes: shared steps once, variants in parallel, one report."""
    spec = profile.sweep.runner if profile.sweep else Sweep.Runner()
    runner = task_runner(spec)
    shared = prepare(profile)
    log = get_run_logger()
    for line in shared.skipped:
        log.warning("sweep.grid: skipped %s", line)
    log.info("sweep of %d recipes on %s", len(shared.recipes), spec.address or f"{spec.kind} x{spec.max_workers}")
    results = fan_out.with_options(task_runner=runner)(profile, shared)
    failed = [r for r in results if isinstance(r, Failed)]
    summary = finish(profile, shared, [r for r in results if isinstance(r, Variant)],
                     failed=[f"{r.name}: {r.error}" for r in failed])
    if failed:
        raise QuantmillError(f"sweep: {len(failed)} of {len(results)} variants failed: "
                             + "; ".join(f"{r.name} ({r.error})" for r in failed))
    return summary
