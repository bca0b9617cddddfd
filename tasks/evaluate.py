"""Evaluate step: perplexity of the baseline and each variant on identical held-out windows; gates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from prefect import task

from quantmill.caching import StepCache
from quantmill.errors import QuantmillError, retry_on_transient
from quantmill.profile import Evaluation, Gates
from quantmill.refs import CheckpointRef, EvalRef, ModelRef, Ref, Verdict
from quantmill.store import ArtifactStore
from quantmill.textdata import read_documents, tokenize_stream
from tasks.quantize import build_config

CODE_VERSION = "1"
WINDOW_CAP = 1024
TOKENS_FILE = "eval_windows.safetensors"


class EvalDataRef(Ref):
    """Held-out token windows shared by the baseline and every variant."""

    path: str
    digest: str
    window: int
    tokens: int
    source: str
    store_key: str


def make_windows(model: ModelRef, spec: Evaluation, out: Path) -> dict:
    """Tokenize the eval text into non-overlapping windows (up to max_tokens)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    ctx = model.summary.get("max_position_embeddings") or WINDOW_CAP
    window = spec.window or min(ctx, WINDOW_CAP)
    if window > ctx:
        raise QuantmillError(f"evaluation.window: {window} exceeds the model's context of {ctx}; lower it")
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    stream = tokenize_stream(read_documents(spec.source, "evaluation.source"), tokenizer)[: spec.max_tokens]
    if stream.numel() < window:
        if stream.numel() < 2:
            raise QuantmillError(f"evaluation.source: {spec.source.label} has no usable text; add held-out text")
        window = int(stream.numel())
    stride = spec.stride or window
    starts = range(0, stream.numel() - window + 1, stride)
    windows = torch.stack([stream[s : s + window] for s in starts])
    save_file({"input_ids": windows.contiguous()}, str(out / TOKENS_FILE))
    return {"window": window, "tokens": int(windows.numel())}


EVAL_DATA_CACHE = StepCache(step="eval-data", code_version=CODE_VERSION)


@task(
    name="eval-data",
    retries=2,
    retry_condition_fn=retry_on_transient,
    cache_policy=EVAL_DATA_CACHE,
    persist_result=True,
)
def eval_data(model: ModelRef, spec: Evaluation, store_root: str) -> EvalDataRef:
    """Tokenize held-out text into the windows every model is scored on."""
    key = EVAL_DATA_CACHE.key_for({"model": model, "spec": spec})
    art = ArtifactStore(store_root).get_or_build(key, lambda out: make_windows(model, spec, out))
    return EvalDataRef(
        path=str(art.path / TOKENS_FILE), digest=art.digest, window=art.record["window"],
        tokens=art.record["tokens"], source=spec.source.label, store_key=key,
    )


def load_model(path: str, device: str):  # noqa: ANN201 - a transformers model
    """Load a checkpoint (full precision or quantized) for scoring."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map=device if device == "cuda" else None)
    return model.eval()


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: str = "cpu", batch_size: int = 8) -> dict[str, float]:  # noqa: ANN001
    """Token-weighted perplexity over windows (each window scored independently)."""
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        target = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        nll += float(loss)
        count += target.numel()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "eval_tokens": float(count)}


def size_on_disk(path: str) -> int:
    """Bytes of model weights and config in a folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name != ".manifest.json")


def score(path: str, data: EvalDataRef, device: str, out: Path) -> dict:
    """Compute and save the metrics of one model."""
    from safetensors.torch import load_file

    windows = load_file(data.path)["input_ids"]
    model = load_model(path, device)
    metrics = perplexity(model, windows, device)
    metrics["size_bytes"] = float(size_on_disk(path))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"metrics": metrics}


EVALUATE_CACHE = StepCache(step="evaluate", code_version=CODE_VERSION)


@task(
    name="evaluate",
    retries=1,
    retry_condition_fn=retry_on_transient,
    cache_policy=EVALUATE_CACHE,
    persist_result=True,
)
def evaluate(target: ModelRef | CheckpointRef, data: EvalDataRef, device: str, store_root: str) -> EvalRef:
    """Score one model (baseline or variant) on the shared eval windows."""
    key = EVALUATE_CACHE.key_for({"target": target, "data": data, "device": device})
    art = ArtifactStore(store_root).get_or_build(key, lambda out: score(target.path, data, device, out))
    is_variant = isinstance(target, CheckpointRef)
    return EvalRef(
        name=target.name if is_variant else "baseline",
        method=target.method if is_variant else "none",
        path=target.path, metrics=art.record["metrics"], eval_digest=data.digest, store_key=key,
    )


def limits_for(ckpt: CheckpointRef, spec: Evaluation) -> Gates:
    """Profile gates for this variant: method-specific over global over method defaults."""
    merged = spec.gates.model_dump(exclude_none=True)
    merged.update(spec.method_gates.get(ckpt.method, Gates()).model_dump(exclude_none=True))
    merged.update(spec.method_gates.get(ckpt.name, Gates()).model_dump(exclude_none=True))
    merged.setdefault(
        "max_ppl_increase_pct",
        build_config(ckpt.method, {k: v for k, v in ckpt.config.items() if k not in {"type", "version"}})
        .default_max_ppl_increase_pct(),
    )
    return Gates(**merged)


def judge(ckpt: CheckpointRef, result: EvalRef, baseline: EvalRef, spec: Evaluation) -> Verdict:
    """Gate verdict with the reason for every bound that failed."""
    gates = limits_for(ckpt, spec)
    m, b = result.metrics, baseline.metrics
    delta = 100.0 * (m["perplexity"] / b["perplexity"] - 1.0)
    reasons = []
    if not math.isfinite(m["perplexity"]) or delta > gates.max_ppl_increase_pct:
        reasons.append(f"perplexity +{delta:.2f}% > {gates.max_ppl_increase_pct}%")
    if gates.max_size_bytes is not None and m["size_bytes"] > gates.max_size_bytes:
        reasons.append(f"size {int(m['size_bytes'])} B > {gates.max_size_bytes} B")
    if gates.max_kl is not None and m.get("kl_mean", 0.0) > gates.max_kl:
        reasons.append(f"KL {m['kl_mean']:.4f} > {gates.max_kl}")
    if gates.min_top1_agreement is not None and m.get("top1_agreement", 1.0) < gates.min_top1_agreement:
        reasons.append(f"top-1 agreement {m['top1_agreement']:.4f} < {gates.min_top1_agreement}")
    if gates.max_latency_ms_p50 is not None and m.get("latency_ms_p50", 0.0) > gates.max_latency_ms_p50:
        reasons.append(f"latency p50 {m['latency_ms_p50']:.1f} ms > {gates.max_latency_ms_p50} ms")
    return Verdict(name=ckpt.name, passed=not reasons, reasons=reasons, limits=gates.model_dump(exclude_none=True))


@task(name="gate", cache_policy=StepCache(step="gate", code_version=CODE_VERSION, verifier=None), persist_result=True)
def gate(ckpt: CheckpointRef, result: EvalRef, baseline: EvalRef, spec: Evaluation) -> Verdict:
    """Apply the quality gates to one variant."""
    return judge(ckpt, result, baseline, spec)
