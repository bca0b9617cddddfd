"""Model cards: the README.md that travels with every registered checkpoint."""

from __future__ import annotations

import json
from typing import Any

from quantmill import __version__
from quantmill.methods import fact_table
from quantmill.metrics import ppl_delta_pct
from quantmill.refs import CheckpointRef, EvalRef, Lineage

LOADERS: dict[str, tuple[str | None, str]] = fact_table("loader")  # vLLM quantization=, pip line (MethodFacts)


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def number(value: float) -> str:
    """A metric for people: integers with thousands separators, others with 4 significant digits."""
    if float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.4g}"


def body(card: str) -> str:
    """The card without its YAML front matter (for places that render Markdown, e.g. a version description)."""
    if card.startswith("---\n"):
        end = card.find("\n---\n", 4)
        if end != -1:
            return card[end + 5:].lstrip("\n")
    return card


def _evaluation_text(result: EvalRef) -> str:
    """What the perplexity is over (source, text preparation, windows), when the evaluation says."""
    from quantmill.mlmodel import public_label
    from quantmill.report import evaluation_text

    data = dict(result.data or {})
    if data.get("source"):
        data["source"] = public_label(str(data["source"]))  # a file name, never a machine path
    text = evaluation_text(data)
    return f"{text[0].upper()}{text[1:]}." if text else ""


def render(model_name: str, ckpt: CheckpointRef, result: EvalRef, *, lineage: Lineage) -> str:
    """Markdown model card: lineage, method, evaluation, and how to load it."""
    from quantmill.mlmodel import public_label

    baseline, base, model = lineage.baseline, lineage.base, lineage.model
    calib_source = lineage.calib.source if lineage.calib else None

    label = public_label(base.source)
    vllm_q, extra_pip = LOADERS.get(ckpt.method, (None, ""))
    m, b = result.metrics, baseline.metrics
    delta = ppl_delta_pct(m["perplexity"], b["perplexity"])
    metric_rows = [("perplexity", f"{m['perplexity']:.4f} (baseline {b['perplexity']:.4f}, {delta:+.2f}%)"),
                   ("size on disk", f"{number(ckpt.size_bytes)} bytes (baseline {number(b.get('size_bytes', 0))})")]
    metric_rows += [(k, number(v)) for k, v in sorted(m.items()) if k not in {"perplexity", "size_bytes", "nll"}]
    vllm_arg = f', quantization="{vllm_q}"' if vllm_q else ""
    if ckpt.calib_digest:
        calibration = f"Calibration data: {public_label(calib_source or 'unknown')} (digest `{ckpt.calib_digest}`)."
    else:
        calibration = "Calibration data: none (this method does not use any)."
    origin = [("base model", f"{label} (revision `{base.revision or 'local'}`)"), ("base_sha256", f"`{base.sha256}`")]
    if model.merged:
        origin += [("adapter_sha256", f"`{model.adapter_sha256}`"), ("merged_sha256", f"`{model.sha256}`")]
    gguf_file = ckpt.extra.get("gguf_file")  # a GGUF export: transformers' GGUF loader, and llama.cpp instead of vLLM
    load_kw = f', gguf_file="{gguf_file}"' if gguf_file else ""
    vllm = f'```python\nfrom vllm import LLM\nllm = LLM(model="path/to/this/folder"{vllm_arg})\n```'
    serve = (f"With llama.cpp: `llama-cli -m path/to/this/folder/{gguf_file}` (or Ollama / LM Studio)." if gguf_file
             else f"With vLLM (GPU):\n\n{vllm}")
    return f"""---
library_name: transformers
tags: [quantmill, quantized, {ckpt.method}]
base_model: {label}
---
# {model_name}: {ckpt.name}

Quantized with quantmill {__version__} from **{label}**
{"with a LoRA adapter merged in" if model.merged else "without an adapter"}.

{_table(origin)}

## Method

`{ckpt.method}` with parameters:

```json
{json.dumps(ckpt.config, indent=2, sort_keys=True)}
```

Quantized modules: {len(ckpt.quantized_modules)}; kept in full precision: {", ".join(ckpt.kept_modules) or "none"}.
{calibration}

## Evaluation

Held-out evaluation windows digest `{result.eval_digest}`.
{_evaluation_text(result)}

{_table(metric_rows)}

## Load it

```python
# pip install -r requirements.txt   (pinned: {extra_pip.replace("pip install ", "") or "no extra package"})
import mlflow
model = mlflow.pyfunc.load_model("models:/{model_name}@champion")
print(model.predict(["def main"]))          # completions
```

With transformers, from a downloaded copy (`mlflow.artifacts.download_artifacts("models:/{model_name}@champion")`
or `quantmill pull {model_name}@champion ./model`):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{load_kw})
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder"{load_kw})
```

{serve}
"""
