"""Driving GPTQModel (shared by gptq, awq and w8a8's GPTQ weights) and finishing its checkpoints: calibration rows,
devices and compute dtypes, the quant log's per-layer losses, kept-tensor dtypes, coverage checks."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantmill.methods.registry import QuantizeJob
from quantmill.modelinfo import meta_model, target_linears
from quantmill.quantize.common import copy_tokenizer, kept_dtype, kept_module_names
from quantmill.quantize.gptq_format import require_all_quantized

if TYPE_CHECKING:  # imported where used: loading this module stays light
    from gptqmodel import QuantizeConfig

# Compute dtype of the calibrated methods on CPU when `compute_dtype: auto`: bf16, chosen by measurement (README:
# "Compute dtype"): GPTQ's quality gap to RTN and its KL stay within the calibrated-method tests' noise, and bf16
# runs GPTQModel's per-layer work faster than fp32 on CPU. On CUDA "auto" is the library's own choice.
CPU_AUTO_DTYPE = torch.bfloat16


def gptqmodel_env() -> None:
    """Keep GPTQModel within the machine's cores unless the caller chose otherwise."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 8))))


def resolve_cpu_dtype(name: str) -> torch.dtype:
    """The CPU compute dtype a recipe's `compute_dtype` names ("auto": CPU_AUTO_DTYPE)."""
    return CPU_AUTO_DTYPE if name == "auto" else getattr(torch, name)


def gptqmodel_device(device: str) -> str:
    """GPTQModel device string for the job's device."""
    return "cuda:0" if device == "cuda" else "cpu"


def load_calibration(path: Path | None) -> list[dict[str, torch.Tensor]]:
    """Calibration rows for GPTQModel: one {'input_ids', 'attention_mask'} dict per sample.

    Packed windows are full rows; samples (an `attention_mask` in the file) are cut to their real tokens, so rows may
    differ in length (GPTQModel pads each batch itself and masks the padding).
    """
    if path is None:
        raise ValueError("this method needs calibration data (job.calibration is None)")
    from safetensors.torch import load_file

    data = load_file(str(path))
    ids = data["input_ids"]
    if ids.dim() != 2 or ids.dtype != torch.int64:
        raise ValueError(f"{path}: input_ids must be int64 [num_samples, seq_len], got {ids.dtype} {list(ids.shape)}")
    mask = data.get("attention_mask", torch.ones_like(ids))
    if mask.shape != ids.shape:
        raise ValueError(f"{path}: attention_mask {list(mask.shape)} does not match input_ids {list(ids.shape)}")
    lengths = mask.sum(1).tolist()
    return [{"input_ids": row[:n], "attention_mask": torch.ones(n, dtype=torch.long)} for row, n in zip(ids, lengths) if n]


def parse_layer_errors(quant_log: Any, targets: list[str]) -> dict[str, float]:
    """Per-module loss from GPTQModel's quant log ({process: [row]} or [row]), keyed by the full module name."""
    rows = [r for rs in quant_log.values() for r in rs] if isinstance(quant_log, dict) else list(quant_log or [])
    errors: dict[str, float] = {}
    for row in rows:
        layer, module = row.get("layer"), row.get("module")
        try:
            loss = float(row.get("loss"))
        except (TypeError, ValueError):
            continue
        pattern = re.compile(rf"(^|\.){re.escape(str(layer))}\.{re.escape(str(module))}$")
        match = [t for t in targets if pattern.search(t)]
        if len(match) == 1:
            errors[match[0]] = loss
    return errors


def to_kept_dtype(out_dir: Path, dtype: torch.dtype) -> None:
    """Store unquantized tensors in `dtype` (the base's half dtype) and quantized layers' scales in fp16 (what
    GPTQ/AWQ kernels and vLLM expect), shard by shard."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
            packed = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".qweight")}
            want = {k: torch.float16 if k.rsplit(".", 1)[0] in packed else dtype for k in keys}
            names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
            if all(names.get(f.get_slice(k).get_dtype(), want[k]) == want[k] for k in keys):
                continue
            tensors = {k: f.get_tensor(k) for k in keys}
        tensors = {k: v.to(want[k]) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, str(path), metadata=meta)


def finish_checkpoint(job: QuantizeJob, targets: list[str], kept: list[str], quant_config_extra: dict) -> list[str]:
    """Copy tokenizer, verify coverage, cast to fp16, record kept modules in quantization_config."""
    copy_tokenizer(job.model_dir, job.out_dir)
    quantized = require_all_quantized(targets, job.out_dir)
    dtype = kept_dtype(job.model_dir)
    to_kept_dtype(job.out_dir, dtype)
    cfg_path = job.out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"].update(quant_config_extra, modules_to_not_convert=kept)
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for path in (cfg_path, job.out_dir / "quantize_config.json"):  # GPTQModel records a random offload temp dir
        if path.exists():
            data = json.loads(path.read_text())
            (data.get("quantization_config", data).get("meta") or {}).pop("offload_to_disk_path", None)
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return quantized


def target_and_kept(model_dir: Path) -> tuple[list[str], list[str]]:
    """Targeted linear names and full-precision module names, from the config alone (meta device)."""
    model = meta_model(model_dir)
    targets = target_linears(model)
    return sorted(targets), kept_module_names(model, targets)


def method_name(qcfg) -> str:  # noqa: ANN001 - gptqmodel QuantizeConfig
    """The method's plain name (`gptq`, `awq`) for log lines, not the enum's repr (`METHOD.GPTQ`)."""
    return str(getattr(qcfg.method, "value", qcfg.method))


def run_gptqmodel(job: QuantizeJob, qcfg: QuantizeConfig, kernel: str, batch_size: int, cpu_dtype: torch.dtype = CPU_AUTO_DTYPE) -> Any:
    """Load the fp model into GPTQModel, quantize on the job's calibration and save; return the quant log."""
    gptqmodel_env()
    from gptqmodel import GPTQModel

    from quantmill.console import gptqmodel_logs_under_state

    gptqmodel_logs_under_state()  # its per-run logs/ folder, not the working directory

    calibration = load_calibration(job.calibration)
    # CPU: use cpu_dtype (GPTQModel's CPU default is bf16); the device comes from qcfg.device, never load()
    dtype = "auto" if job.device == "cuda" else cpu_dtype
    model = GPTQModel.load(str(job.model_dir), qcfg, dtype=dtype)
    job.progress(f"{method_name(qcfg)}: quantizing with {len(calibration)} calibration samples on {job.device}")
    quant_log = model.quantize(calibration, batch_size=batch_size, backend=kernel, calibration_sort=None)
    model.save(str(job.out_dir))
    return quant_log or getattr(model, "quant_log", None)
