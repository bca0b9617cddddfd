"""AutoRound (Intel's `auto-round`, sign-gradient tuning of rounding and clipping per block), saved as GPTQ v1.

`auto-round` is an optional extra (`pip install "quantmill[autoround]"`, auto-round 0.16.1, Python >= 3.11; it
declares an unpinned torch, so it is installed with torch==2.13.0 as a constraint). Preflight names the missing
package in one line. The calibration rows come from the profile's calibration step (nsamples x seqlen = its
num_samples x seq_len). Output: AutoRound's `auto_gptq` export (qweight/qzeros/scales/g_idx, `quant_method: gptq`,
`provider: auto-round`), which transformers + gptqmodel load on CPU and vLLM serves as GPTQ.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from quantmill.tasks.quantize.gptq import finish_checkpoint, load_calibration, target_and_kept
from quantmill.tasks.quantize.registry import ModelInfo, QuantizeJob, QuantizeResult, register_method
from quantmill.tasks.quantize.rtn import GroupedConfig, check_cpu_int4_group, v1_zero_underflows

AUTOROUND_HINT = ('method autoround needs the optional auto-round package (Python >= 3.11): '
                  'pip install "auto-round==0.16.1" "torch==2.13.0" (or pip install -e ".[autoround]")')


class AutoRoundConfig(GroupedConfig):
    """AutoRound: bits 2/3/4/8, group_size, sym, iters, lr (None = 1/iters), batch_size; GPTQ-format output."""

    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight")
    sym: bool = Field(True, description="Symmetric quantization (no zero-point search)")
    iters: int = Field(200, ge=0, description="Sign-gradient tuning steps per block; 0 = AutoRound's RTN mode")
    lr: float | None = Field(None, gt=0, description="Learning rate of the rounding/clipping tuning; null = 1/iters")
    batch_size: int = Field(8, ge=1, description="Calibration samples per tuning step")

    def default_max_ppl_increase_pct(self) -> float:
        """Same gate as GPTQ/AWQ: 3%."""
        return 3.0

    def check_device(self, device: str) -> None:
        """auto-round must be importable; 4-bit group sizes the CPU kernels cannot load are rejected on CPU."""
        require_auto_round()
        check_cpu_int4_group(self.bits, self.group_size, device)

    def check_model(self, info: ModelInfo) -> None:
        """Group size divides in_features; in_features a multiple of 32 (GPTQ packing)."""
        super().check_model(info)
        for name, in_features in info.linear_in_features.items():
            if in_features % 32:
                raise ValueError(f"in_features={in_features} of {name} is not a multiple of 32, which packing needs")


def require_auto_round() -> None:
    """Raise a one-line ValueError when auto-round cannot be imported (never fall back silently)."""
    try:
        import auto_round  # noqa: F401
    except Exception:
        raise ValueError(AUTOROUND_HINT) from None


def run_auto_round(config: AutoRoundConfig, job: QuantizeJob, tmp: Path) -> Path:
    """Tune and export with AutoRound into `tmp`; return the folder holding the checkpoint."""
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [r["input_ids"] for r in load_calibration(job.calibration)]
    seqlen = max(r.numel() for r in rows)  # shorter samples are right-padded and masked (AutoRound drops short rows)
    pad = tokenizer_pad_id(job.model_dir)
    dataset = [{"input_ids": torch.cat([r, r.new_full((seqlen - r.numel(),), pad)])[None],
                "attention_mask": (torch.arange(seqlen) < r.numel()).long()[None]} for r in rows]
    on_cuda = job.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=torch.float16 if on_cuda else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    job.progress(f"autoround: {config.bits}-bit g{config.group_size}, {config.iters} iters on "
                 f"{len(rows)} calibration samples of up to {seqlen} tokens ({job.device})")
    tuner = AutoRound(
        model, tokenizer, bits=config.bits, group_size=config.group_size, sym=config.sym, iters=config.iters,
        lr=config.lr, nsamples=len(rows), seqlen=seqlen, batch_size=min(config.batch_size, len(rows)),
        dataset=dataset, device_map=0 if on_cuda else "cpu", enable_torch_compile=on_cuda,
    )
    tuner.quantize_and_save(str(tmp), format="auto_gptq")
    found = sorted({p.parent for p in tmp.rglob("config.json")})
    if len(found) != 1:
        raise RuntimeError(f"autoround: expected one exported checkpoint under {tmp}, found {len(found)}")
    return found[0]


def tokenizer_pad_id(model_dir: Path) -> int:
    """The pad id AutoRound masks out of its loss (it treats pad_token_id positions as padding); else EOS, else 0."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)


@register_method("autoround", AutoRoundConfig, calibrated=True)
def quantize_autoround(config: AutoRoundConfig, job: QuantizeJob) -> QuantizeResult:
    """AutoRound (sign-gradient rounding/clipping tuning) through auto-round, saved as a GPTQ v1 checkpoint."""
    require_auto_round()
    targets, kept = target_and_kept(job.model_dir)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="autoround-") as tmp:
        exported = run_auto_round(config, job, Path(tmp))
        for path in exported.iterdir():
            shutil.move(str(path), job.out_dir / path.name)
    quantized = finish_checkpoint(job, targets, kept, {"lm_head": False})
    bad = [] if config.sym else v1_zero_underflows(job.out_dir, config.bits)
    if bad:
        raise RuntimeError(f"asymmetric AutoRound produced zero-point 0 in {bad[0]} ({len(bad)} modules); the GPTQ v1 "
                           "checkpoint would be misread; use sym=true")
    job.progress(f"autoround: {len(quantized)} linears quantized")
    return QuantizeResult(quantized_modules=quantized, kept_modules=kept,
                          extra={"provider": "auto-round", "iters": config.iters, "format": "gptq"})
