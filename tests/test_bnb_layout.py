"""bitsandbytes 4-bit checkpoints keep the portable layout even when the model ran a forward pass on CPU first.

bitsandbytes 0.50 repacks a 4-bit layer for its AVX512-BF16 CPU kernel on the first forward pass in eval mode
(`weight.data` changes shape, `quant_state.packing_format_for_cpu` appears); saving such a layer runs a lossy
inverse (wrong, without double quant). How these tests know which path this CPU takes: a control model loaded with
plain transformers is run once and checked for that flag, which must agree with `bitsandbytes.functional.has_avx512bf16()`.
Where the CPU lacks the path, the repack is forced with bitsandbytes' own `_convert_weight_packed_for_cpu`.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from quantmill.methods.bnb import BnbNF4Config
from quantmill.methods.registry import QuantizeJob
from quantmill.quantize.bnb import is_cpu_repacked, linear_4bit, quantize_bnb, save_bnb

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])


def nf4(double_quant: bool) -> BnbNF4Config:
    return BnbNF4Config(double_quant=double_quant)


def job(model_dir, out) -> QuantizeJob:
    return QuantizeJob(model_dir, out, None, "cpu", progress=lambda _msg: None)


def cpu_path_repacks(model_dir) -> bool:
    """Does a forward pass repack 4-bit layers on this CPU? (A plain transformers NF4 load, run once.)"""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qc, dtype=torch.float32, device_map="cpu")
    with torch.no_grad():
        model(input_ids=IDS)
    return any(is_cpu_repacked(m) for m in linear_4bit(model).values())


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_saved_after_forward_is_the_portable_checkpoint(demo_assets, tmp_path, double_quant):
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    assert cpu_path_repacks(demo_assets.model_dir) == bool(bnbf.has_avx512bf16())
    config = nf4(double_quant)
    model = quantize_bnb(config, job(demo_assets.model_dir, tmp_path / "after"))
    with torch.no_grad():  # e.g. a smoke generation before saving
        model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert not any(is_cpu_repacked(m) for m in linear_4bit(model).values())
    save_bnb(model, config, job(demo_assets.model_dir, tmp_path / "after"))
    fresh = quantize_bnb(config, job(demo_assets.model_dir, tmp_path / "fresh"))
    save_bnb(fresh, config, job(demo_assets.model_dir, tmp_path / "fresh"))

    after, fresh_t = load_file(tmp_path / "after" / "model.safetensors"), load_file(tmp_path / "fresh" / "model.safetensors")
    assert set(after) == set(fresh_t) and all(torch.equal(after[k], fresh_t[k]) for k in after)
    base = load_file(demo_assets.model_dir / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    out_f, in_f = base[name].shape
    assert after[name].dtype == torch.uint8 and tuple(after[name].shape) == (out_f * in_f // 2, 1)  # plain layout
    absmax = after[name + ".absmax"]
    assert (absmax.dtype, absmax.numel()) == ((torch.uint8 if double_quant else torch.float32), out_f * in_f // 64)
    assert (name + ".nested_absmax" in after) == double_quant

    # a fresh transformers load (before any forward) decodes exactly the NF4 of the original weights
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "after", device_map="cpu")
    w = reloaded.get_submodule(name.removesuffix(".weight")).weight
    want = bnbf.dequantize_4bit(*bnbf.quantize_4bit(base[name].float(), blocksize=64, quant_type="nf4",
                                                     compress_statistics=double_quant))
    torch.testing.assert_close(bnbf.dequantize_4bit(w.data, w.quant_state).float(), want.float(), rtol=0, atol=0)


def test_repacked_layer_is_refused_at_save(demo_assets, tmp_path):
    import bitsandbytes.functional as bnbf

    config = nf4(True)
    model = quantize_bnb(config, job(demo_assets.model_dir, tmp_path / "out"))
    w = model.get_submodule("model.layers.0.self_attn.q_proj").weight
    w.data, w.quant_state = bnbf._convert_weight_packed_for_cpu(w.data, w.quant_state)  # what the forward does
    with pytest.raises(RuntimeError, match=r"'model.layers.0.self_attn.q_proj' \(1 in all\) was repacked"):
        save_bnb(model, config, job(demo_assets.model_dir, tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()
