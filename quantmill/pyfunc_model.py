"""The `python_function` flavor of a registered version: prompts in, greedy completions out.

Self-contained on purpose (torch, transformers and, for DataFrames, pandas): the register step copies this
file into every version's `code/` folder, so `mlflow.pyfunc.load_model(...)` and `mlflow models serve` work
without quantmill installed. MLflow calls `_load_pyfunc(path)` with the version's root folder, where the
checkpoint files lie as they were written.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_NEW_TOKENS = 32


def _prompts(model_input: Any) -> list[str]:
    """A list of prompts from a list/tuple of strings, one string, a dict {'prompt': [...]} or a DataFrame."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        values = model_input.get("prompt", next(iter(model_input.values()), []))
        return _prompts(values)
    if hasattr(model_input, "columns"):  # pandas DataFrame: the `prompt` column, else the first one
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[column].tolist()]
    if hasattr(model_input, "tolist"):  # numpy array / pandas Series
        return [str(v) for v in model_input.tolist()]
    return [str(v) for v in model_input]


class CompletionModel:
    """A causal LM and its tokenizer loaded from a checkpoint folder; greedy decoding per prompt."""

    def __init__(self, path: str) -> None:
        from pathlib import Path

        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {}
        ggufs = sorted(p.name for p in Path(path).glob("*.gguf"))
        if ggufs and not (Path(path) / "config.json").exists():  # a GGUF export: transformers' GGUF loader
            kwargs["gguf_file"] = ggufs[0]
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        """The completion (prompt excluded) of each prompt."""
        import torch

        max_new = int((params or {}).get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = []
        device = next(self.model.parameters()).device
        for prompt in _prompts(model_input):
            ids = self.tokenizer(prompt, return_tensors="pt").to(device)
            with torch.no_grad():
                gen = self.model.generate(**ids, max_new_tokens=max_new, do_sample=False, pad_token_id=pad)
            out.append(self.tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        return out


def _load_pyfunc(path: str) -> CompletionModel:
    """MLflow's loader hook (`loader_module` in the MLmodel's python_function flavor)."""
    return CompletionModel(path)
