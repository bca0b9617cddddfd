"""Per-layer sensitivity: how much the model's output moves when one linear alone is round-to-nearest quantized.

Measured once, inside the quantize step, per model content + calibration + (bits, group_size, sym, samples) +
device and kept in the artifact store, so every mixed-precision recipe with those settings (rtn or gptq, any
budget) reuses it. The measure is the mean per-token KL(fp model || model with that one linear quantized) over the first `samples` calibration windows,
with the reference kept as top-k log-probs (quantmill.scoring.topk_kl; exact when k >= vocabulary). RTN stands in for
GPTQ here: GPTQ's own per-layer error would need one GPTQ pass per layer. Cost: one forward pass over the windows per
targeted linear, with one model copy in memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantmill.caching import noted_key
from quantmill.modelinfo import target_linears
from quantmill.quantize.common import load_fp_model
from quantmill.quantize.gptq_format import dequantize_weight, quantize_weight
from quantmill.refs import CalibRef, ModelRef
from quantmill.store import ArtifactStore

CODE_VERSION = "1"
FILE = "sensitivity.json"
TOPK = 256  # reference log-probs kept per token


@dataclass(frozen=True)
class Sensitivity:
    """Measured sensitivities and where they are stored (`cached`: found in the store, not measured now)."""

    values: dict[str, float]
    store_key: str
    digest: str
    cached: bool


def sensitivity_params(config: Any) -> dict[str, Any]:
    """What the measurement depends on besides model, calibration and device (shared by rtn and gptq recipes)."""
    return {"bits": config.bits, "group_size": config.group_size, "sym": config.sym,
            "samples": config.mixed_precision.samples}


@torch.no_grad()
def measure_sensitivity(model_dir: Path, calib_path: Path, params: dict[str, Any], device: str,
                        progress: Callable[[str], None] = print) -> dict[str, float]:
    """{linear: mean per-token KL(fp || only that linear RTN-quantized)} on the first `samples` windows."""
    from safetensors.torch import load_file

    from quantmill.metrics import LOGITS_BUDGET
    from quantmill.scoring import topk_kl

    data = load_file(str(calib_path))
    windows = data["input_ids"][: params["samples"]].to(device)
    masks = data.get("attention_mask", torch.ones_like(data["input_ids"]))[: params["samples"]].to(device)
    model = load_fp_model(model_dir, device)
    size = max(1, LOGITS_BUDGET // (windows.shape[1] * model.config.vocab_size))
    batches = list(zip(windows.split(size), masks.split(size)))

    def logprobs(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # real tokens only (samples are padded)
        ids, mask = batch
        return model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[mask.bool()]

    refs = [logprobs(b).topk(min(TOPK, model.config.vocab_size), dim=-1) for b in batches]
    targets = target_linears(model)
    progress(f"sensitivity: {len(targets)} linears x {windows.shape[0]} windows of {windows.shape[1]} tokens")
    out = {}
    for name, lin in targets.items():
        original = lin.weight.detach().clone()
        codes, scales, zeros = quantize_weight(original, params["bits"], params["group_size"], params["sym"])
        lin.weight.copy_(dequantize_weight(codes, scales, zeros).to(original.dtype))
        kl = sum(float(topk_kl(ref.values, ref.indices, logprobs(b)).sum()) for b, ref in zip(batches, refs))
        out[name] = kl / float(masks.sum())
        lin.weight.copy_(original)
    return out


def measured(model: ModelRef, calib: CalibRef, params: dict[str, Any], device: str, store_root: str,
             progress: Callable[[str], None] = print) -> Sensitivity:
    """The stored sensitivities for these inputs, measuring them first when the store has none."""
    key = noted_key("sensitivity", CODE_VERSION, {"model": model, "calib": calib, "params": params, "device": device})

    def build(out: Path) -> dict:
        start = time.perf_counter()
        values = measure_sensitivity(Path(model.path), Path(calib.path), params, device, progress)
        (out / FILE).write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
        progress(f"sensitivity: measured {len(values)} linears in {time.perf_counter() - start:.1f}s ({key})")
        return {"params": params, "linears": len(values)}

    art = ArtifactStore(store_root).get_or_build(key, build)
    if art.cached:
        progress(f"sensitivity: reusing {key}")
    return Sensitivity(json.loads((art.path / FILE).read_text()), key, art.digest, art.cached)
