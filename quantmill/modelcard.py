"""Model cards: the README.md that travels with every registered checkpoint."""

from __future__ import annotations

import json
from typing import Any

from quantmill.refs import CheckpointRef, EvalRef, ModelRef

LOADERS = {
    "rtn": ("gptq", "pip install gptqmodel optimum"),
    "gptq": ("gptq", "pip install gptqmodel optimum"),
    "awq": ("awq", "pip install gptqmodel"),
    "bnb-int8": (None, "pip install bitsandbytes"),
    "bnb-nf4": (None, "pip install bitsandbytes"),
    "bnb-fp4": (None, "pip install bitsandbytes"),
    "dynamic-int8": (None, "pip install torchao"),
    "fp8": ("compressed-tensors", "pip install compressed-tensors"),
    "w8a8-int8": ("compressed-tensors", "pip install compressed-tensors"),
    "autoround": ("gptq", "pip install gptqmodel optimum"),
    "gguf": (None, "pip install gguf"),
}


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _evaluation_text(result: EvalRef) -> str:
    """What the perplexity is over (source, text preparation, windows), when the evaluation says."""
    from quantmill.report import evaluation_text

    text = evaluation_text(result.data)
    return f"{text[0].upper()}{text[1:]}." if text else ""


def render(
    model_name: str, ckpt: CheckpointRef, result: EvalRef, baseline: EvalRef, base: ModelRef, model: ModelRef,
    calib_source: str | None,
) -> str:
    """Markdown model card: lineage, method, evaluation, and how to load it."""
    vllm_q, extra_pip = LOADERS.get(ckpt.method, (None, ""))
    m, b = result.metrics, baseline.metrics
    delta = 100.0 * (m["perplexity"] / b["perplexity"] - 1.0)
    metric_rows = [("perplexity", f"{m['perplexity']:.4f} (baseline {b['perplexity']:.4f}, {delta:+.2f}%)"),
                   ("size on disk", f"{ckpt.size_bytes} bytes (baseline {int(b.get('size_bytes', 0))})")]
    metric_rows += [(k, f"{v:.6g}") for k, v in sorted(m.items()) if k not in {"perplexity", "size_bytes"}]
    vllm_arg = f', quantization="{vllm_q}"' if vllm_q else ""
    gguf_file = ckpt.extra.get("gguf_file")  # a GGUF export: transformers' GGUF loader, and llama.cpp instead of vLLM
    load_kw = f', gguf_file="{gguf_file}"' if gguf_file else ""
    vllm = f'```python\nfrom vllm import LLM\nllm = LLM(model="path/to/this/folder"{vllm_arg})\n```'
    serve = (f"With llama.cpp: `llama-cli -m path/to/this/folder/{gguf_file}` (or Ollama / LM Studio)." if gguf_file
             else f"With vLLM (GPU):\n\n{vllm}")
    return f"""---
library_name: transformers
tags: [quantmill, quantized, {ckpt.method}]
base_model: {base.source}
---
# {model_name}: {ckpt.name}

Quantized with [quantmill](https://github.com/) from **{base.source}**
(revision `{base.revision or 'local'}`, content sha256 `{base.sha256}`)
{f"with a LoRA adapter merged in (adapter sha256 `{model.adapter_sha256}`, merged sha256 `{model.sha256}`)" if model.merged else "without an adapter"}.

## Method

`{ckpt.method}` with parameters:

```json
{json.dumps(ckpt.config, indent=2, sort_keys=True)}
```

Quantized modules: {len(ckpt.quantized_modules)}; kept in full precision: {", ".join(ckpt.kept_modules) or "none"}.
Calibration data: {calib_source or "none"} (digest `{ckpt.calib_digest or "-"}`).
Checkpoint content sha256: `{ckpt.sha256}`.

## Evaluation

Held-out evaluation windows digest `{result.eval_digest}`.
{_evaluation_text(result)}

{_table(metric_rows)}

## Load it

```python
# {extra_pip}
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{load_kw})
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder"{load_kw})
```

{serve}

From the registry: `quantmill pull {model_name}@champion ./model` or
`mlflow.artifacts.download_artifacts("models:/{model_name}@champion")`.
"""
