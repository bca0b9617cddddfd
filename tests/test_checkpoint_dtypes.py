"""Checkpoints keep their dtypes: tensors a method does not quantize stay in the base model's dtype (bf16 here).

Every registered method quantizes a bf16 copy of the trained demo Llama; the test reads the saved safetensors
headers (the library's own reader) and checks every floating tensor outside the quantized modules. The bnb
checkpoints are also compared with bitsandbytes' own save of the same bf16 model (transformers load + save).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantmill.methods.registry import QuantizeJob, build_config, get_method, known_methods

PARAMS = {"rtn": {"bits": 4, "group_size": 32}, "gptq": {"bits": 4, "group_size": 32}, "awq": {"group_size": 32},
          "autoround": {"bits": 4, "group_size": 32, "iters": 4}}  # dtypes, not quality: 4 tuning steps, not 200
# GGUF is not a safetensors checkpoint: llama.cpp's format stores norms as F32 and quantizes embeddings by design.
NOT_SAFETENSORS = {"gguf"}
OPTIONAL = {"autoround": "auto_round"}  # methods whose library is an optional install


@pytest.fixture(scope="module")
def calib(demo_assets, tmp_path_factory) -> Path:
    """Calibration ids [8, 64] from the demo's calibration text."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(demo_assets.model_dir)(demo_assets.calib_path.read_text())["input_ids"]
    path = tmp_path_factory.mktemp("calib") / "calib.safetensors"
    save_file({"input_ids": torch.tensor(ids[: 8 * 64]).view(8, 64).contiguous()}, str(path))
    return path


def header_dtypes(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype of every tensor in a checkpoint folder."""
    from safetensors import safe_open

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return out


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(set(known_methods()) - NOT_SAFETENSORS))
def test_unquantized_tensors_keep_the_base_dtype(method, bf16_model, calib, tmp_path):
    if method in OPTIONAL:
        pytest.importorskip(OPTIONAL[method])
    config = build_config(method, PARAMS.get(method, {}))
    out = tmp_path / "ckpt"
    result = get_method(method).handler(config, QuantizeJob(bf16_model, out, calib, "cpu", lambda _m: None))
    dtypes = header_dtypes(out)
    quantized = tuple(f"{m}." for m in result.quantized_modules)
    kept = {k: d for k, d in dtypes.items() if not k.startswith(quantized) and d in ("F32", "F16", "BF16")}
    assert "model.embed_tokens.weight" in kept and "model.norm.weight" in kept, sorted(dtypes)
    assert {k: d for k, d in kept.items() if d != "BF16"} == {}, method  # e.g. fp32 embeddings/norms = upcast
    layers = json.loads((bf16_model / "config.json").read_text())["num_hidden_layers"]
    assert len(result.quantized_modules) == 7 * layers  # q/k/v/o/gate/up/down of every decoder layer


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-int8"])
def test_bnb_size_matches_the_library_save(method, bf16_model, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ours = tmp_path / "ours"
    get_method(method).handler(build_config(method, {}), QuantizeJob(bf16_model, ours, None, "cpu", lambda _m: None))
    qc = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"]) if method == "bnb-int8" else
          BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             llm_int8_skip_modules=["lm_head"]))
    direct = AutoModelForCausalLM.from_pretrained(bf16_model, quantization_config=qc, dtype=torch.bfloat16,
                                                  device_map={"": "cpu"})
    direct.save_pretrained(tmp_path / "direct")
    assert abs(weight_bytes(ours) / weight_bytes(tmp_path / "direct") - 1) <= 0.02
