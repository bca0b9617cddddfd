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

import torch

from quantmill.methods.autoround import AutoRoundConfig, require_auto_round
from quantmill.methods.registry import QuantizeJob, QuantizeResult
from quantmill.quantize.gptq_format import v1_zero_underflows
from quantmill.quantize.gptqmodel_backend import finish_checkpoint, load_calibration, target_and_kept


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
