"""Evaluate step: perplexity, agreement with the baseline, speed, memory and accuracy of every model; gates.

Reference for agreement/KL: the baseline's evaluation saves, for every scored token, its top-k next-token log-probs
(fp32) and their token ids (int32) as `reference.safetensors` in its store artifact (k = `evaluation.kl_topk`, capped
at the vocabulary size), so a variant's evaluation never loads the baseline model. That is 8·k bytes per token
(1 KiB at k=128) instead of 2·vocab bytes for fp16 log-probs (300 KiB for a 150k vocabulary). KL(baseline || variant)
is summed over the baseline's top-k tokens plus one bucket holding the rest of the vocabulary: exact when k >= vocab,
otherwise a lower bound of the full KL that misses only how the variant redistributes mass inside that tail.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import torch
from prefect import task

from quantmill.console import progress
from quantmill.context import StepContext
from quantmill.devices import device_name
from quantmill.errors import QuantmillError, retry_on_transient
from quantmill.methods import build_config
from quantmill.metrics import LOGITS_BUDGET, ppl_delta_pct
from quantmill.profile import Evaluation, Gates
from quantmill.refs import CheckpointRef, EvalDataRef, EvalRef, ModelRef, Verdict
from quantmill.scoring import topk_kl
from quantmill.store import ArtifactStore, canonical_safetensors
from quantmill.tasks._cache import StepCache
from quantmill.tasks._gpu import holding_gpu
from quantmill.textdata import token_stream

CODE_VERSION = "3"  # 3: .txt read as one document, rows joined with "\n\n" by default
WINDOW_CAP = 1024
TOKENS_FILE = "eval_windows.safetensors"
REFERENCE_FILE = "reference.safetensors"
log = logging.getLogger("quantmill.evaluate")


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


def _data_inputs(inputs: dict) -> dict:
    """Only what shapes the windows keys them (gates and measurement settings do not)."""
    spec = inputs["spec"]
    inputs["spec"] = {k: getattr(spec, k) for k in ("source", "max_tokens", "window", "stride")}
    return inputs


EVAL_DATA_CACHE = StepCache(step="eval-data", code_version=CODE_VERSION, ignore=("device",), normalize=_data_inputs)


@task(name="eval-data", retries=2, retry_condition_fn=retry_on_transient, cache_policy=EVAL_DATA_CACHE,
      persist_result=True)
def eval_data(model: ModelRef, spec: Evaluation, *, ctx: StepContext) -> EvalDataRef:
    """Tokenize held-out text into the windows every model is scored on."""
    key = EVAL_DATA_CACHE.key_for(locals())  # the bound arguments, as Prefect's cache key sees them
    art = ArtifactStore(ctx.store_root).get_or_build(key, lambda out: make_windows(model, spec, out))
    r = art.record
    return EvalDataRef(
        path=str(art.path / TOKENS_FILE), digest=art.digest, window=r["window"], tokens=r["tokens"],
        source=spec.source.label, store_key=key, stride=r["stride"], windows=r["windows"],
        preparation=r.get("preparation", spec.source.preparation),
    )


def load_windows(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows [n, window] and the first scored position of each."""
    from safetensors.torch import load_file

    data = load_file(path)
    ids = data["input_ids"]
    return ids, data.get("first", torch.ones(ids.shape[0], dtype=torch.long))


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


class _Clock:
    """Logits processor that timestamps every generated token."""

    def __init__(self, device: str) -> None:
        self.sync = device == "cuda"
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100.0))


@torch.no_grad()
def generation_speed(
    model, windows: torch.Tensor, spec: Evaluation.Speed, device: str,  # noqa: ANN001 - a transformers model/tokenizer (imported lazily)
) -> dict[str, float]:
    """Greedy decoding after warm-up: TTFT and per-token latency (smallest batch), tokens/s per batch size."""
    from transformers import LogitsProcessorList

    prompt = windows[:, : min(spec.prompt_tokens, windows.shape[1])]
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.generation_config.eos_token_id
    out: dict[str, float] = {}
    for b in spec.batch_sizes:
        ids = prompt[torch.arange(b) % prompt.shape[0]].to(device)
        ttft, steps, tokens, seconds = [], [], 0, 0.0
        for r in range(spec.warmup + spec.repeats):
            clock = _Clock(device)
            start = time.perf_counter()
            model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec.new_tokens,
                min_new_tokens=spec.new_tokens, do_sample=False, pad_token_id=pad,
                logits_processor=LogitsProcessorList([clock]),
            )
            clock(ids, ids)
            if r >= spec.warmup:
                ttft.append(clock.times[0] - start)
                steps.extend(t1 - t0 for t0, t1 in zip(clock.times[:-2], clock.times[1:-1]))
                tokens, seconds = tokens + b * spec.new_tokens, seconds + clock.times[-1] - start
        out[f"tokens_per_s_b{b}"] = tokens / seconds
        if b == spec.batch_sizes[0]:
            out["ttft_ms"] = 1000.0 * percentile(ttft, 50)
            for q in (50, 95, 99):
                out[f"latency_ms_p{q}"] = 1000.0 * percentile(steps, q)
    return out


def _vm_hwm() -> int | None:
    """Linux peak RSS of this process (VmHWM) in bytes, None where unavailable."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    except (OSError, StopIteration, ValueError):
        return None


class PeakMemory:
    """Peak RSS while the block runs: the kernel's high-water mark (reset on entry), else a sampling thread."""

    def __init__(self, device: str, interval_s: float = 0.02) -> None:
        import psutil

        self.proc, self.device, self.interval, self._stop = psutil.Process(), device, interval_s, threading.Event()
        self.start = self.peak = self.proc.memory_info().rss
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := current RSS
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss, (self._thread is None and _vm_hwm()) or 0)

    def metrics(self) -> dict[str, float]:
        """Peak RSS, its growth over the start, and peak CUDA memory on GPU."""
        out = {"peak_rss_bytes": float(self.peak), "rss_growth_bytes": float(self.peak - self.start)}
        if self.device == "cuda":
            out["peak_gpu_bytes"] = float(torch.cuda.max_memory_allocated())
        return out


def read_examples(spec: Evaluation.Accuracy) -> list[tuple[str, list[str], int]]:
    """(question, choices, answer index) rows of the accuracy CSV."""
    path, f = Path(spec.path), "evaluation.accuracy"
    if not path.is_file():
        raise QuantmillError(f"{f}.path: {path} does not exist; fix the path")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = [spec.question_field, spec.answer_field] + ([] if spec.labels else [spec.choices_field])
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise QuantmillError(f"{f}: {path} has no column {missing[0]!r}; rename it or set the *_field option")
        rows = list(reader)[: spec.max_examples]
    examples = []
    for n, row in enumerate(rows, 2):
        choices = spec.labels or [c.strip() for c in row[spec.choices_field].split("|")]
        raw = row[spec.answer_field].strip()
        answer = int(raw) if raw.lstrip("-").isdigit() else (choices.index(raw) if raw in choices else -1)
        if not 0 <= answer < len(choices) or len(choices) < 2:
            raise QuantmillError(f"{f}.answer_field: {path} line {n}: answer {raw!r} is not a choice index or label")
        examples.append((row[spec.question_field], choices, answer))
    if not examples:
        raise QuantmillError(f"{f}.path: {path} has no examples; add labelled rows")
    return examples


def continuation(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:  # noqa: ANN001 - a transformers model/tokenizer (imported lazily)
    """Token ids of the context and of ' choice' following it."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(f"{context} {choice}", add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] == ctx:
        cont = whole[len(ctx) :]
    else:
        cont = tokenizer(f" {choice}", add_special_tokens=False)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return ([start] if start is not None else []) + ctx, cont


@torch.no_grad()
def choice_accuracy(
    model, tokenizer, spec: Evaluation.Accuracy, device: str, batch_size: int = 16,  # noqa: ANN001 - a transformers model/tokenizer (imported lazily)
) -> dict[str, float]:
    """Accuracy of picking the choice with the highest log-likelihood given the question."""
    examples = read_examples(spec)
    pairs = [(e, continuation(tokenizer, q, c)) for e, (q, choices, _) in enumerate(examples) for c in choices]
    scores: list[float] = []
    for i in range(0, len(pairs), batch_size):
        chunk = [ctx + cont for _, (ctx, cont) in pairs[i : i + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, (_, (ctx, cont)) in enumerate(pairs[i : i + batch_size]):
            lp = logits[row, len(ctx) - 1 : len(ctx) + len(cont) - 1].float().log_softmax(-1)
            scores.append(float(lp.gather(1, torch.tensor(cont, device=device)[:, None]).sum()))
    correct, j = 0, 0
    for _, choices, answer in examples:
        best = max(range(len(choices)), key=lambda c: scores[j + c])
        correct, j = correct + int(best == answer), j + len(choices)
    return {"accuracy": correct / len(examples), "accuracy_examples": float(len(examples))}


def lm_eval_scores(model, tokenizer, spec: Evaluation.LmEval, batch_size: int) -> dict[str, float]:  # noqa: ANN001 - a transformers model/tokenizer (imported lazily)
    """lm-evaluation-harness metrics, or {} with a logged reason when the package or task data is unavailable."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        log.warning("lm_eval tasks %s skipped: the lm_eval package is not installed (pip install lm-eval)", spec.tasks)
        return {}
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        res = lm_eval.simple_evaluate(model=lm, tasks=spec.tasks, num_fewshot=spec.num_fewshot, limit=spec.limit)
    except Exception as exc:  # noqa: BLE001 - offline runs must not fail on optional benchmarks
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("lm_eval tasks %s skipped: %s", spec.tasks, why)
        return {}
    out = {}
    for name, metrics in (res or {}).get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key:
                out[f"lm_eval.{name}.{key.replace(',none', '').replace(',', '_')}"] = float(value)
    return out


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


def _evaluate_inputs(inputs: dict) -> dict:
    """The cache key sees the measurement settings of the spec, not its gates."""
    inputs["spec"] = settings(inputs.get("spec"))
    return inputs


EVALUATE_CACHE = StepCache(step="evaluate", code_version=CODE_VERSION, normalize=_evaluate_inputs)


@task(name="evaluate", retries=1, retry_condition_fn=retry_on_transient, cache_policy=EVALUATE_CACHE,
      persist_result=True)
def evaluate(
    target: ModelRef | CheckpointRef, data: EvalDataRef, *, ctx: StepContext,
    baseline: EvalRef | None = None, spec: Evaluation | None = None,
) -> EvalRef:
    """Score one model on the shared windows; with `baseline`, also KL/agreement against its saved log-probs."""
    key = EVALUATE_CACHE.key_for(locals())  # the bound arguments, as Prefect's cache key sees them
    cfg, device = settings(spec), ctx.device
    reference = baseline_reference(baseline, data, ctx.store_root) if baseline is not None else None
    art = ArtifactStore(ctx.store_root).get_or_build(key, holding_gpu(device, lambda out: score(
        target.path, data, device=device, cfg=cfg, baseline=baseline, reference=reference, out=out)))
    is_variant = isinstance(target, CheckpointRef)
    return EvalRef(
        name=target.name if is_variant else "baseline",
        method=target.method if is_variant else "none",
        path=target.path, metrics=art.record["metrics"], eval_digest=data.digest, store_key=key,
        data=data.description(),
    )


def derived(m: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Metrics relative to the baseline: perplexity change, compression, accuracy drop."""
    out = {"ppl_delta_pct": ppl_delta_pct(m["perplexity"], b["perplexity"])}
    if m.get("size_bytes") and b.get("size_bytes"):
        out["compression"] = b["size_bytes"] / m["size_bytes"]
    if "accuracy" in m and "accuracy" in b:
        out["accuracy_delta"] = m["accuracy"] - b["accuracy"]
        out["accuracy_drop"] = b["accuracy"] - m["accuracy"]
    return out


def limits_for(ckpt: CheckpointRef, spec: Evaluation) -> Gates:
    """Profile gates for this variant: variant name over method over global over method defaults."""
    merged = spec.gates.model_dump(exclude_none=True)
    merged.update(spec.method_gates.get(ckpt.method, Gates()).model_dump(exclude_none=True))
    merged.update(spec.method_gates.get(ckpt.name, Gates()).model_dump(exclude_none=True))
    merged.setdefault(
        "max_ppl_increase_pct",
        build_config(ckpt.method, {k: v for k, v in ckpt.config.items() if k not in {"type", "version"}})
        .default_max_ppl_increase_pct(),
    )
    return Gates(**merged)


# (gate field, metric, "max"/"min", label, format, what to enable when the metric is missing)
BOUNDS = (
    ("max_kl", "kl_mean", "max", "KL", "{:.4f}", "pass the baseline EvalRef to evaluate"),
    ("min_top1_agreement", "top1_agreement", "min", "top-1 agreement", "{:.4f}", "pass the baseline EvalRef"),
    ("max_size_bytes", "size_bytes", "max", "size", "{:.0f} B", ""),
    ("min_compression", "compression", "min", "compression", "{:.2f}x", ""),
    ("max_latency_ms_p50", "latency_ms_p50", "max", "latency p50", "{:.1f} ms", "enable evaluation.speed"),
    ("max_latency_ms_p95", "latency_ms_p95", "max", "latency p95", "{:.1f} ms", "enable evaluation.speed"),
    ("max_accuracy_drop", "accuracy_drop", "max", "accuracy drop", "{:.4f}", "set evaluation.accuracy"),
)


def judge(ckpt: CheckpointRef, result: EvalRef, *, baseline: EvalRef, spec: Evaluation) -> Verdict:
    """Gate verdict with the reason for every bound that failed (a bound on an unmeasured metric fails)."""
    gates = limits_for(ckpt, spec)
    m = {**result.metrics, **derived(result.metrics, baseline.metrics)}
    delta = m["ppl_delta_pct"]
    reasons = []
    if not math.isfinite(m["perplexity"]) or delta > gates.max_ppl_increase_pct:
        reasons.append(f"perplexity {delta:+.2f}% > +{gates.max_ppl_increase_pct}%")
    for field, metric, kind, label, fmt, hint in BOUNDS:
        bound = getattr(gates, field)
        if bound is None:
            continue
        value = m.get(metric)
        if value is None or not math.isfinite(value):
            reasons.append(f"{label} not measured ({hint or 'check the evaluation'}) but {field} is set")
        elif (value > bound) if kind == "max" else (value < bound):
            reasons.append(f"{label} {fmt.format(value)} {'>' if kind == 'max' else '<'} {bound}")
    return Verdict(name=ckpt.name, passed=not reasons, reasons=reasons, limits=gates.model_dump(exclude_none=True))


@task(name="gate", cache_policy=StepCache(step="gate", code_version=CODE_VERSION, verifier=None), persist_result=True)
def gate(ckpt: CheckpointRef, result: EvalRef, *, baseline: EvalRef, spec: Evaluation) -> Verdict:
    """Apply the quality gates to one variant."""
    return judge(ckpt, result, baseline=baseline, spec=spec)
