"""The comparison report: one row per model (baseline first), rendered as rich/Markdown tables and a chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from quantmill.errors import QuantmillError
from quantmill.units import human_bytes

REPORT_DIR = "report"
REPORT_JSON = f"{REPORT_DIR}/comparison.json"
REPORT_MD = f"{REPORT_DIR}/comparison.md"
REPORT_PNG = "ppl_vs_size.png"
SCHEMA = 1

# (row key, header); tokens/s columns are added per measured batch size, accuracy when measured.
BASE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("variant", "variant"), ("method", "method"), ("bits", "bits"), ("size_bytes", "size"),
    ("compression", "compr."), ("perplexity", "perplexity"), ("ppl_delta_pct", "delta"), ("kl_mean", "KL"),
    ("top1_agreement", "agree"), ("latency_ms_p50", "p50 ms"), ("latency_ms_p95", "p95 ms"),
)
TAIL_COLUMNS: tuple[tuple[str, str], ...] = (("gate", "gate"), ("version", "version"))


def baseline_row(baseline: dict[str, Any]) -> dict[str, Any]:
    """The baseline's line of the table (its own reference: delta 0, compression 1)."""
    row = {k: v for k, v in baseline.items() if k not in {"kl_mean", "top1_agreement"}}
    return {**row, "variant": "baseline", "method": "none", "bits": row.get("bits"), "compression": 1.0,
            "ppl_delta_pct": 0.0, "gate": "baseline", "reasons": "", "version": None}


def _speed_keys(rows: list[dict[str, Any]]) -> list[str]:
    """tokens_per_s_b<N> keys present in any row, by batch size."""
    keys = {k for r in rows for k in r if k.startswith("tokens_per_s_b") and k[14:].isdigit()}
    return sorted(keys, key=lambda k: int(k[14:]))


def columns_for(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Table columns: fixed ones, tokens/s per batch size, accuracy when measured, gate and version."""
    cols = list(BASE_COLUMNS) + [(k, f"tok/s b{k[14:]}") for k in _speed_keys(rows)]
    if any("accuracy" in r for r in rows):
        cols.append(("accuracy", "acc"))
    return cols + list(TAIL_COLUMNS)


def build_report(  # noqa: PLR0913 - keyword-only: the report's rows and the header fields it carries
    rows: list[dict[str, Any]], *, baseline: dict[str, Any], model_name: str = "", run_id: str = "", device: str = "",
    notes: list[str] | None = None, evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the tables and the chart need, as plain JSON-able data (notes: skipped/failed recipes;
    evaluation: what the perplexity is over, `EvalDataRef.description()`)."""
    all_rows = [baseline_row(baseline)] + [dict(r) for r in rows]
    return {
        "schema": SCHEMA, "model_name": model_name, "run_id": run_id, "device": device,
        "columns": [list(c) for c in columns_for(all_rows)], "rows": json.loads(json.dumps(all_rows, default=str)),
        "notes": list(notes or []), "evaluation": dict(evaluation or {}),
    }


def evaluation_text(evaluation: dict[str, Any]) -> str:
    """What the perplexity means, in one line ('' when the report does not say)."""
    if not evaluation:
        return ""
    return (f"perplexity: token-level exp(mean NLL) over {evaluation.get('windows')} windows of "
            f"{evaluation.get('window')} tokens, stride {evaluation.get('stride')} ({evaluation.get('tokens')} scored "
            f"tokens) of {evaluation.get('source')}; text: {evaluation.get('preparation')}")


def format_cell(key: str, value: Any) -> str:
    """One value as the tables show it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "size_bytes":
        return human_bytes(float(value))
    if key == "compression":
        return f"{float(value):.2f}x"
    if key == "ppl_delta_pct":
        return f"{float(value):+.2f}%"
    if key in {"perplexity", "top1_agreement", "accuracy"}:
        return f"{float(value):.4f}" if key != "perplexity" else f"{float(value):.3f}"
    if key == "kl_mean":
        return f"{float(value):.4g}"
    if key.startswith(("latency_ms", "tokens_per_s")):
        return f"{float(value):.1f}"
    if key == "gate":
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def gate_text(row: dict[str, Any]) -> str:
    """'pass', 'baseline' or 'FAIL: reasons'."""
    if row.get("gate") == "FAIL":
        return f"FAIL: {row.get('reasons') or 'gate failed'}"
    return str(row.get("gate", "-"))


def table_cells(report: dict[str, Any]) -> list[list[str]]:
    """Formatted cells, one list per row, in column order."""
    keys = [k for k, _ in report["columns"]]
    return [[gate_text(r) if k == "gate" else format_cell(k, r.get(k)) for k in keys] for r in report["rows"]]


def title(report: dict[str, Any]) -> str:
    """Table caption: model, baseline perplexity, device."""
    base = report["rows"][0]
    ppl = format_cell("perplexity", base.get("perplexity"))
    text = f"{report.get('model_name') or 'model'}: variants (baseline perplexity {ppl})"
    return text + (f" on {report['device']}" if report.get("device") else "")


def failures(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(variant, reasons) of every row that failed its gates."""
    return [(r["variant"], r.get("reasons") or "gate failed") for r in report["rows"] if r.get("gate") == "FAIL"]


def rich_table(report: dict[str, Any]):  # noqa: ANN201 - a rich renderable
    """The comparison table for the terminal, followed by the reasons of failed gates."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title(report))
    keys = [k for k, _ in report["columns"]]
    for key, header in report["columns"]:
        table.add_column(header, justify="left" if key in {"variant", "method", "gate"} else "right")
    for row, cells in zip(report["rows"], table_cells(report)):
        gate = row.get("gate")
        color = {"pass": "green", "FAIL": "red"}.get(gate)
        cells = [str(gate) if k == "gate" else c for k, c in zip(keys, cells)]
        styled = [f"[{color}]{escape(c)}[/]" if color and k == "gate" else escape(c) for k, c in zip(keys, cells)]
        table.add_row(*styled, style="bold" if gate == "baseline" else None)
    notes = [Text.assemble(("FAIL ", "red"), (f"{name}: ", "bold"), reasons) for name, reasons in failures(report)]
    notes += [Text.assemble(("NOTE ", "yellow"), note) for note in report.get("notes", [])]
    if evaluation_text(report.get("evaluation") or {}):
        notes.append(Text(evaluation_text(report["evaluation"])))
    return Group(table, *notes)


def markdown(report: dict[str, Any]) -> str:
    """The comparison table as GitHub-flavoured Markdown."""
    heads = [h for _, h in report["columns"]]
    lines = [f"### {title(report)}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for cells in table_cells(report):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if report.get("notes"):
        lines += [""] + [f"- {note}" for note in report["notes"]]
    if evaluation_text(report.get("evaluation") or {}):
        lines += ["", evaluation_text(report["evaluation"])]
    if report.get("run_id"):
        lines += ["", f"MLflow run: `{report['run_id']}`"]
    return "\n".join(lines) + "\n"


def table_records(report: dict[str, Any]) -> list[dict[str, str]]:
    """Rows as {header: cell} dicts (a Prefect table artifact)."""
    heads = [h for _, h in report["columns"]]
    return [dict(zip(heads, cells)) for cells in table_cells(report)]


def plot_ppl_vs_size(report: dict[str, Any], path: Path) -> Path:
    """PNG scatter of perplexity against size on disk; baseline starred, failing variants red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    labels = {"baseline": "baseline", "FAIL": "fails its gates"}
    seen: set[str] = set()
    for row in report["rows"]:
        size, ppl = row.get("size_bytes"), row.get("perplexity")
        if size is None or ppl is None or not math.isfinite(float(ppl)):
            continue
        kind = row.get("gate") if row.get("gate") in labels else "pass"
        color = {"baseline": "black", "FAIL": "tab:red"}.get(kind, "tab:green")
        ax.scatter(float(size) / 2**20, float(ppl), marker="*" if kind == "baseline" else "o",
                   s=180 if kind == "baseline" else 60, c=color, zorder=3,
                   label=None if kind in seen else labels.get(kind, "passes its gates"))
        seen.add(kind)
        ax.annotate(row["variant"], (float(size) / 2**20, float(ppl)), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("perplexity")
    ax.set_title(title(report), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def load_report(run_id: str) -> dict[str, Any]:
    """The report JSON saved to an MLflow run."""
    import mlflow

    from quantmill import tracking

    client = tracking.client()
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise QuantmillError(f"RUN_ID: no MLflow run {run_id!r} at {mlflow.get_tracking_uri()}; check the id") from None
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{REPORT_JSON}")
    except Exception:  # noqa: BLE001 - any storage error means the same to the user
        raise QuantmillError(f"RUN_ID: run {run_id} has no {REPORT_JSON}; was it a finished quantmill run?") from None
    return json.loads(text)
