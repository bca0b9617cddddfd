"""Generation speed: time to first token, per-token latency percentiles and tokens/s of greedy decoding (core)."""

from __future__ import annotations

import time

import torch

from quantmill.profile import Evaluation


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
