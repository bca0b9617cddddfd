"""What a step holds is released when it ends, at the cost the scale benchmark measured (benchmarks/scale.py).

* Loading a GPTQ-format checkpoint for evaluation in a process that has not imported GPTQModel yet: the model is
  freed when the step drops it. (Imported for the first time inside `from_pretrained`, GPTQModel keeps a frame of
  its import whose callers' frames hold the model: +507 MiB kept for the rest of a run at 254 M parameters.) A fresh
  interpreter, so GPTQModel is really imported there for the first time; the check is a weak reference.
* RTN on CPU loads a bf16 base in bf16 (half the memory of the former fp32 load) and writes the same checkpoint
  tensors as from an fp32 load of the same weights.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import compiled, python_script, subprocess_env

REPO = Path(__file__).resolve().parents[1]

RELEASE = r"""
import gc, sys, weakref
from quantmill.scoring import load_model
assert "gptqmodel" not in sys.modules, "gptqmodel imported before the first GPTQ load: the test would prove nothing"

def step(path):
    model = load_model(path, "cpu")
    model(input_ids=__import__("torch").tensor([[1, 2, 3, 4]]))
    return weakref.ref(model)

ref = step(sys.argv[1])
gc.collect()
print("gptqmodel imported:", "gptqmodel" in sys.modules, "model alive:", ref() is not None)
"""


@pytest.mark.slow
def test_gptq_checkpoint_loaded_for_evaluation_is_freed_after_the_step(bf16_model, tmp_path):
    from quantmill.methods.registry import QuantizeJob, build_config, get_method

    ckpt = tmp_path / "rtn"
    get_method("rtn").handler(build_config("rtn", {"bits": 4, "group_size": 32}),
                              QuantizeJob(bf16_model, ckpt, None, "cpu", lambda _m: None))
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    proc = subprocess.run(python_script(RELEASE, str(ckpt)), capture_output=True, text=True, cwd=REPO,
                          env=compiled(subprocess_env(tmp_path / "home")), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "gptqmodel imported: True model alive: False" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]


def test_rtn_on_a_bf16_base_loads_bf16_and_writes_what_an_fp32_load_writes(bf16_model, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import quantmill.quantize.rtn as rtn
    from quantmill.methods.registry import QuantizeJob, build_config, get_method

    loaded: list[torch.dtype] = []
    real = rtn.load_fp_model

    def spy(model_dir, device="cpu", dtype=None):  # records what rtn asks for
        model = real(model_dir, device, dtype)
        loaded.append(next(model.parameters()).dtype)
        return model

    config = build_config("rtn", {"bits": 4, "group_size": 32})
    monkeypatch.setattr(rtn, "load_fp_model", spy)
    get_method("rtn").handler(config, QuantizeJob(bf16_model, tmp_path / "now", None, "cpu", lambda _m: None))
    monkeypatch.setattr(rtn, "load_fp_model", lambda d, device="cpu", dtype=None: real(d, device, torch.float32))
    get_method("rtn").handler(config, QuantizeJob(bf16_model, tmp_path / "fp32", None, "cpu", lambda _m: None))
    assert loaded == [torch.bfloat16]
    now, fp32 = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("now", "fp32"))
    assert sorted(now) == sorted(fp32)
    assert [k for k in now if now[k].dtype != fp32[k].dtype or not torch.equal(now[k], fp32[k])] == []
