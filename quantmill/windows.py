"""Evaluation windows: the held-out text tokenized once and cut into the windows every model is scored on (core)."""

from __future__ import annotations

from pathlib import Path

import torch

from quantmill.errors import QuantmillError
from quantmill.profile import Evaluation
from quantmill.refs import ModelRef
from quantmill.safetensors_io import canonical_safetensors
from quantmill.textdata import token_stream

WINDOW_CAP = 1024
TOKENS_FILE = "eval_windows.safetensors"

def make_windows(model: ModelRef, spec: Evaluation, out: Path) -> dict:
    """Tokenize the eval text into windows (up to max_tokens); `first` = first scored position per window.

    The text is prepared as `spec.source` says (a .txt as is, rows joined with "\\n\\n", or EOS-packed), tokenized
    once and cut into windows of `window` tokens every `stride` tokens: with stride = window (the default) these are
    the non-overlapping windows of the GPTQ/AWQ papers' perplexity.
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    ctx = model.summary.get("max_position_embeddings") or WINDOW_CAP
    window = spec.window or min(ctx, WINDOW_CAP)
    if window > ctx:
        raise QuantmillError(f"evaluation.window: {window} exceeds the model's context of {ctx}; lower it")
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    stream = token_stream(spec.source, "evaluation.source", tokenizer, spec.max_tokens)
    if stream.numel() < window:
        if stream.numel() < 2:
            raise QuantmillError(f"evaluation.source: {spec.source.label} has no usable text; add held-out text")
        window = int(stream.numel())
    stride = min(spec.stride or window, window)
    starts = range(0, stream.numel() - window + 1, stride)
    windows = torch.stack([stream[s : s + window] for s in starts])
    first = torch.full((windows.shape[0],), max(1, window - stride), dtype=torch.long)
    first[0] = 1
    meta = {"source": spec.source.label, "preparation": spec.source.preparation}
    save_file({"input_ids": windows.contiguous(), "first": first}, str(out / TOKENS_FILE), metadata=meta)
    canonical_safetensors(out / TOKENS_FILE)  # same windows, same bytes: a rebuilt one keeps its digest
    return {"window": window, "stride": stride, "windows": int(windows.shape[0]), "tokens": int((window - first).sum()),
            **meta}


def load_windows(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows [n, window] and the first scored position of each."""
    from safetensors.torch import load_file

    data = load_file(path)
    ids = data["input_ids"]
    return ids, data.get("first", torch.ones(ids.shape[0], dtype=torch.long))
