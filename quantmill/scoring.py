"""Scoring one model on the evaluation windows (core, torch).

Reference for agreement/KL: the baseline's evaluation saves, for every scored token, its top-k next-token log-probs
(fp32) and their token ids (int32) as `reference.safetensors` in its store artifact (k = `evaluation.kl_topk`, capped
at the vocabulary size), so a variant's evaluation never loads the baseline model. That is 8·k bytes per token
(1 KiB at k=128) instead of 2·vocab bytes for fp16 log-probs (300 KiB for a 150k vocabulary). KL(baseline || variant)
is summed over the baseline's top-k tokens plus one bucket holding the rest of the vocabulary: exact when k >= vocab,
otherwise a lower bound of the full KL that misses only how the variant redistributes mass inside that tail.
Sensitivity (quantmill.quantize.sensitivity) shares `topk_kl`; the logits budget is quantmill.metrics'.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from quantmill.accuracy import choice_accuracy, lm_eval_scores
from quantmill.console import progress
from quantmill.devices import device_name
from quantmill.errors import QuantmillError
from quantmill.memory import PeakMemory
from quantmill.metrics import LOGITS_BUDGET, derived
from quantmill.profile import Evaluation
from quantmill.refs import EvalDataRef, EvalRef
from quantmill.speed import generation_speed
from quantmill.store import ArtifactStore
from quantmill.windows import load_windows

REFERENCE_FILE = "reference.safetensors"


def topk_kl(ref_lp: torch.Tensor, ref_ids: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(ref || model) over ref's top-k tokens plus one bucket for the rest of the vocabulary."""
    q = lp.gather(1, ref_ids)
    p = ref_lp.exp()
    kl = (p * (ref_lp - q)).sum(-1)
    if ref_ids.shape[1] < lp.shape[1]:
        p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
        q_rest = (1.0 - q.exp().sum(-1)).clamp_min(1e-12)
        kl = kl + torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), 0.0)
    return kl.clamp_min(0.0)


class OncePerMessage(logging.Filter):
    """Let each distinct message through once (bitsandbytes warns on every int8 matmul on CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


ONCE = OncePerMessage()


def load_model(path: str, device: str):  # noqa: ANN201 - a transformers model
    """Load a checkpoint (full precision or quantized) for scoring."""
    from transformers import AutoModelForCausalLM

    logging.getLogger("bitsandbytes.autograd._functions").addFilter(ONCE)  # thousands of identical lines otherwise
    # gptqmodel's CPU kernel torch.compiles its dequantizer; a compile that fails (seen intermittently in Dask
    # workers: "Global grad_mode state changed while dynamo tracing") must fall back to eager, not fail the step.
    torch._dynamo.config.suppress_errors = True

    from quantmill.methods.gguf import (
        loader_kwargs,  # a GGUF export: transformers' GGUF loader (dequantizes)
    )

    model = AutoModelForCausalLM.from_pretrained(path, device_map=device if device == "cuda" else None,
                                                 **loader_kwargs(path))
    return model.eval()


@torch.no_grad()
def score_windows(  # noqa: PLR0913 - keyword-only settings: one pass computes everything that needs logits
    model, windows: torch.Tensor, first: torch.Tensor, *, device: str = "cpu", batch_size: int = 8,  # noqa: ANN001 - a transformers model/tokenizer (imported lazily)
    reference: dict[str, torch.Tensor] | None = None, topk: int = 0,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Token-weighted perplexity (+ KL/top-1 agreement against `reference`, + this model's top-k log-probs)."""
    nll, count, kl, agree = 0.0, 0, 0.0, 0
    saved: dict[str, list[torch.Tensor]] = {"topk_logprobs": [], "topk_ids": []}
    positions = torch.arange(1, windows.shape[1])
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)
        mask = (positions[None, :] >= first[i : i + batch_size, None]).to(device)
        lp = model(input_ids=batch).logits[:, :-1][mask].float().log_softmax(-1)
        target = batch[:, 1:][mask]
        nll -= float(lp.gather(1, target[:, None]).sum())
        if reference is not None:
            ref_lp = reference["topk_logprobs"][count : count + target.numel()].to(device)
            ref_ids = reference["topk_ids"][count : count + target.numel()].to(device).long()
            kl += float(topk_kl(ref_lp, ref_ids, lp).sum())
            agree += int((lp.gather(1, ref_ids[:, :1]).squeeze(1) >= lp.max(-1).values).sum())
        if topk:
            values, ids = lp.topk(min(topk, lp.shape[-1]), dim=-1)
            saved["topk_logprobs"].append(values.cpu())
            saved["topk_ids"].append(ids.to(torch.int32).cpu())
        count += target.numel()
        progress("evaluate", min(i + batch_size, windows.shape[0]), windows.shape[0], "windows")
    if reference is not None and reference["topk_ids"].shape[0] != count:
        raise QuantmillError("evaluate.baseline: the baseline reference covers other windows; re-run its evaluation")
    metrics = {"perplexity": math.exp(nll / count), "nll": nll / count, "eval_tokens": float(count)}
    if reference is not None:
        metrics.update(kl_mean=kl / count, top1_agreement=agree / count)
    return metrics, ({k: torch.cat(v) for k, v in saved.items()} if topk else {})


def size_on_disk(path: str) -> int:
    """Bytes of model weights and config in a folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name != ".manifest.json")


def settings(spec: Evaluation | None) -> dict[str, Any]:
    """What shapes the measurements (not the gates): top-k, batch size, speed, accuracy, lm_eval."""
    names = ("kl_topk", "batch_size", "speed", "accuracy", "lm_eval")
    if spec is None:
        return {n: Evaluation.model_fields[n].default for n in names}
    return {n: getattr(spec, n) for n in names}


def baseline_reference(baseline: EvalRef, data: EvalDataRef, store_root: str) -> dict[str, torch.Tensor]:
    """The baseline's saved top-k log-probs, checked against the windows."""
    from safetensors.torch import load_file

    if baseline.eval_digest != data.digest:
        raise QuantmillError("evaluate.baseline: it was scored on other eval windows; evaluate it on these first")
    store = ArtifactStore(store_root)
    problem = store.verify(baseline.store_key)
    path = store.path(baseline.store_key) / REFERENCE_FILE
    if problem is not None or not path.is_file():
        raise QuantmillError(f"evaluate.baseline: {path} is {problem or 'missing'}; re-run the baseline evaluation")
    return load_file(str(path))


def score(target: str, data: EvalDataRef, *, device: str, cfg: dict[str, Any], baseline: EvalRef | None,  # noqa: PLR0913 - keyword-only: a measurement's settings, reference and output folder
          reference: dict[str, torch.Tensor] | None, out: Path) -> dict:
    """Measure one model and save its metrics (and, for a baseline, its reference log-probs)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    windows, first = load_windows(data.path)
    with PeakMemory(device) as mem:
        model = load_model(target, device)
        vocab = int(getattr(model.config.get_text_config(), "vocab_size", None) or 2**16)
        batch = max(1, min(cfg["batch_size"], LOGITS_BUDGET // (windows.shape[1] * vocab)))
        topk = 0 if baseline else cfg["kl_topk"]
        metrics, saved = score_windows(model, windows, first, device=device, batch_size=batch, reference=reference,
                                       topk=topk)
        if saved:
            save_file(saved, str(out / REFERENCE_FILE))
        if cfg["speed"] is not None and cfg["speed"].enabled:
            metrics.update(generation_speed(model, windows, cfg["speed"], device))
        if cfg["accuracy"] is not None or cfg["lm_eval"] is not None:
            from quantmill.methods.gguf import loader_kwargs

            tokenizer = AutoTokenizer.from_pretrained(target, **loader_kwargs(target))
            if cfg["accuracy"] is not None:
                metrics.update(choice_accuracy(model, tokenizer, cfg["accuracy"], device))
            if cfg["lm_eval"] is not None:
                metrics.update(lm_eval_scores(model, tokenizer, cfg["lm_eval"], batch))
    metrics.update(mem.metrics())
    metrics["size_bytes"] = float(size_on_disk(target))
    if baseline is not None:
        metrics.update(derived(metrics, baseline.metrics))
    (out / "metrics.json").write_text(json.dumps({"device": device_name(device), **metrics}, indent=2))
    return {"metrics": metrics, "device": device_name(device)}
