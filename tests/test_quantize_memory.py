"""Calibrated methods work layer by layer: GPTQ's peak memory grows by less than the weights it quantizes.

Each quantization runs in its own process, which reports its peak resident memory (VmHWM) above what it held
after importing torch, transformers and (for GPTQ) GPTQModel, so neither this test process nor import costs pollute it.
Two random-weight Llamas that differ only in depth (1 and 7 decoder layers of 28 MiB fp32 each) isolate what the
extra layers cost. RTN loads the whole model, so it is the control: its growth shows the probe sees whole-model
memory when it is there.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from tests import fresh
from tests.conftest import REPO

MiB = 2**20
DEEP = 7  # decoder layers of the deeper model
PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    method, model, calib, out = sys.argv[2:6]
    import torch, transformers  # imported before the baseline
    if method != "rtn":  # RTN never imports GPTQModel (≈ 7 s of CPU); only growths between two depths are compared
        import gptqmodel
    from pathlib import Path
    from quantmill.methods.registry import QuantizeJob, build_config, get_method

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

    base = status("VmRSS")
    config = build_config(method, {"bits": 4, "group_size": 128})
    get_method(method).handler(config, QuantizeJob(Path(model), Path(out), Path(calib), "cpu", lambda m: None))
    print("RESULT" + json.dumps({"peak": status("VmHWM") - base}))
""")


def make_model(folder: Path, layers: int, tokenizer_from: Path) -> int:
    """A random-weight fp32 Llama (hidden 1024, 16 heads, MLP 1024, vocab 2048); returns its weight bytes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=2048, hidden_size=1024, intermediate_size=1024, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, head_dim=64, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).exists():
            shutil.copy2(tokenizer_from / name, folder / name)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def start_probe(method: str, model: Path, calib: Path, out: Path) -> fresh.Forked:
    """The probe in a new process, forked from a template that imported torch and transformers (tests/fresh.py)."""
    # GPTQModel's offload folder: its finalizer removes it, which the probe's quick exit (python_script) skips
    scratch = out.parent / f"tmp-{out.name}"
    scratch.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QUANTMILL_HOME": str(out.parent / "home"), "TMPDIR": str(scratch)}
    return fresh.start_script(PROBE, str(REPO), method, str(model), str(calib), str(out), env=env)


def peak_bytes(proc: fresh.Forked) -> int:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.split("RESULT", 1)[1])["peak"]


@pytest.mark.slow
def test_gptq_peak_memory_grows_by_less_than_the_layers_it_adds(demo_assets, tmp_path):
    import torch
    from safetensors.torch import save_file

    calib = tmp_path / "calib.safetensors"
    save_file({"input_ids": torch.randint(0, 2048, (8, 128), generator=torch.Generator().manual_seed(0))}, str(calib))
    size = {n: make_model(tmp_path / f"layers{n}", n, demo_assets.model_dir) for n in (1, DEEP)}
    peak = {}
    for n in (1, DEEP):  # the RTN control runs beside GPTQ (one core each); each process measures only itself
        rtn = start_probe("rtn", tmp_path / f"layers{n}", calib, tmp_path / f"rtn{n}")
        peak["gptq", n] = peak_bytes(start_probe("gptq", tmp_path / f"layers{n}", calib, tmp_path / f"gptq{n}"))
        peak["rtn", n] = peak_bytes(rtn)
    added = size[DEEP] - size[1]  # DEEP - 1 decoder layers in fp32
    grow = {m: peak[m, DEEP] - peak[m, 1] for m in ("gptq", "rtn")}
    layer = added // (DEEP - 1)
    print(f"\nfp32 weights: 1 layer model {size[1] / MiB:.0f} MiB, {DEEP} layers {size[DEEP] / MiB:.0f} MiB; one layer "
          f"{layer / MiB:.0f} MiB, embeddings + head {(size[1] - layer) / MiB:.0f} MiB, calibration activations "
          f"{8 * 128 * 1024 * 4 / MiB:.0f} MiB per hidden state")
    print({f"{m} {n} layers": f"{v / MiB:.0f} MiB" for (m, n), v in peak.items()},
          {f"{m} growth / added weights": round(v / added, 2) for m, v in grow.items()})
    # control: a method holding the whole model shows it in this probe (1.14-1.41 of the added weights; 0.99 once in a
    # suite run, 2026-12-03, on a machine whose kernel was busy reclaiming memory: clean file-backed pages can leave RSS)
    assert grow["rtn"] > 0.9 * added
    # GPTQModel quantizes one decoder layer at a time (finished layers offloaded to disk): the extra layers cost
    # less than their own fp32 weights, where holding the model costs at least them once (the RTN control) and a full
    # copy twice. Measured 0.33-0.71 of them here (0.43 beside two busy-loop processes) and 0.87 once in CI, so the
    # bound is the weights themselves, not a fraction of them.
    assert grow["gptq"] < added
    assert peak["gptq", DEEP] < 2 * size[DEEP]
