"""Report step: the comparison table and chart, published to MLflow (JSON, Markdown, PNG) and Prefect."""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from quantmill import tracking
from quantmill.context import StepContext
from quantmill.errors import retry_on_transient
from quantmill.report import (
    REPORT_DIR,
    REPORT_JSON,
    REPORT_MD,
    REPORT_PNG,
    build_report,
    markdown,
    plot_ppl_vs_size,
    table_records,
)

log = logging.getLogger("quantmill.report")
TAG_LIMIT = 5000  # MLflow tag value length


def artifact_key(model_name: str) -> str:
    """Prefect artifact key: lower-case letters, digits and dashes."""
    return ("quantmill-" + re.sub(r"[^a-z0-9-]+", "-", model_name.lower())).strip("-")[:100]


def log_to_mlflow(run_id: str, report: dict[str, Any]) -> None:
    """Save the report JSON, Markdown, chart and per-variant gate tags on the MLflow run."""
    client = tracking.client()
    client.log_text(run_id, json.dumps(report, indent=2), REPORT_JSON)
    client.log_text(run_id, markdown(report), REPORT_MD)
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(run_id, str(plot_ppl_vs_size(report, Path(tmp) / REPORT_PNG)), REPORT_DIR)
    for row in report["rows"][1:]:
        text = "pass" if row.get("gate") == "pass" else f"FAIL: {row.get('reasons', '')}"
        client.set_tag(run_id, f"quantmill.gate.{row['variant']}", text[:TAG_LIMIT])


def post_to_prefect(report: dict[str, Any]) -> str:
    """A Prefect table artifact with the formatted rows; returns its key."""
    from prefect.artifacts import create_table_artifact

    key = artifact_key(report.get("model_name") or "report")
    create_table_artifact(table=table_records(report), key=key, description=markdown(report).splitlines()[0][4:])
    return key


@task(name="publish-report", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_transient)
def publish_report(
    rows: list[dict[str, Any]], *, baseline: dict[str, Any], model_name: str = "", notes: list[str] | None = None,
    evaluation: dict[str, Any] | None = None, ctx: StepContext,
) -> dict[str, Any]:
    """Build the comparison report and publish it to the MLflow run `ctx.run_id` and as a Prefect table artifact."""
    from quantmill.devices import device_name

    run_id = ctx.run_id
    report = build_report(rows, baseline=baseline, model_name=model_name, run_id=run_id,
                          device=device_name(ctx.device), notes=notes, evaluation=evaluation)
    log_to_mlflow(run_id, report)
    key = post_to_prefect(report)
    log.info("report saved to MLflow run %s (%s) and Prefect artifact %r", run_id, REPORT_JSON, key)
    return report
