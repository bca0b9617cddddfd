"""bnb-int8/nf4/fp4, dynamic-int8, fp8: fresh-process reload, on-disk format, quality on the demo model, validation."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from quantmill.errors import QuantmillError
from quantmill.methods.registry import ModelInfo, QuantizeJob, QuantizeResult, build_config, get_method
from quantmill.quantize import bnb, dynamic_int8, fp8
from quantmill.quantize.common import audit_quantized
from tests.fresh import run_script

METHODS = ("bnb-int8", "bnb-nf4", "bnb-fp4", "dynamic-int8", "fp8")
STEPS = {**dict.fromkeys(METHODS[:3], (bnb.quantize_bnb, bnb.save_bnb)), "fp8": (fp8.quantize_fp8, fp8.save_fp8),
         "dynamic-int8": (dynamic_int8.quantize_dynamic_int8, dynamic_int8.save_dynamic_int8)}
GATES = {"bnb-int8": 2.0, "bnb-nf4": 5.0, "bnb-fp4": 5.0, "dynamic-int8": 2.0, "fp8": 1.0}
SEQ_LEN, MAX_WINDOWS = 128, 32
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8 on CPU logs a cast warning per matmul

RELOAD_SCRIPT = r"""
import logging, sys, torch
from transformers import AutoModelForCausalLM
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
out = {}
for spec in sys.argv[2:]:
    path, ids_path = spec.split("::")
    ids, model = torch.load(ids_path), AutoModelForCausalLM.from_pretrained(path).eval()
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        out[path] = {"layer": type(q).__name__, "weight": type(q.weight).__name__, "dtype": str(q.weight.dtype),
                     "logits": model(ids).logits,
                     "generated": model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)}
torch.save(out, sys.argv[1])
"""


@dataclass
class Quantized:
    """One method's in-memory model, handler result, checkpoint folder and wall time."""

    model: nn.Module
    result: QuantizeResult
    out_dir: Path
    seconds: float = 0.0


def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token loss) over non-overlapping windows (one row each)."""
    total = 0.0
    with torch.no_grad():
        for chunk in windows.split(8):
            total += model(input_ids=chunk, labels=chunk).loss.float().item() * chunk.shape[0]
    return math.exp(total / windows.shape[0])


def tiny_model(arch: str = "llama", tied: bool = False) -> nn.Module:
    """A randomly initialised 2-layer model (no training): for structural tests only."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=tied)
    cfg = LlamaConfig(**kw) if arch == "llama" else Qwen2Config(**kw)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def run_method(name: str, model_dir: Path, out_dir: Path) -> Quantized:
    """Quantize with the method's two handler steps, keeping the in-memory model."""
    config = build_config(name, {})
    job = QuantizeJob(model_dir, out_dir, None, "cpu", progress=lambda _msg: None)
    (quantize, save), start = STEPS[name], time.perf_counter()
    model = quantize(config, job)
    return Quantized(model, save(model, config, job), out_dir, time.perf_counter() - start)


def on_disk(path: Path) -> tuple[dict, dict[str, dict], dict[str, str]]:
    """(quantization_config, tensor name -> {dtype, shape}, safetensors metadata) of a checkpoint folder."""
    from safetensors import safe_open

    tensors, meta = {}, {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            meta.update(f.metadata() or {})
            for k in f.keys():
                tensors[k] = {"dtype": f.get_slice(k).get_dtype(), "shape": f.get_slice(k).get_shape()}
    return json.loads((path / "config.json").read_text())["quantization_config"], tensors, meta


# ---------------------------------------------------------------- session fixtures (trained demo model)


@pytest.fixture(scope="session")
def eval_windows(demo_assets) -> torch.Tensor:
    """The eval text as [n, SEQ_LEN] token windows (first MAX_WINDOWS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    ids = torch.tensor(tok(demo_assets.eval_path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    n = min(ids.numel() // SEQ_LEN, MAX_WINDOWS)
    return ids[: n * SEQ_LEN].view(n, SEQ_LEN)


@pytest.fixture(scope="session")
def fp_ppl(demo_assets, eval_windows) -> float:
    """Perplexity of the unquantized demo model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32).eval()
    return perplexity(model, eval_windows)


@pytest.fixture(scope="session")
def quantized(demo_assets, tmp_path_factory) -> dict[str, Quantized]:
    """Every method applied once to the demo model (checkpoints in a temp folder)."""
    root = tmp_path_factory.mktemp("quantized")
    out = {name: run_method(name, demo_assets.model_dir, root / name) for name in METHODS}
    print("\nquantize seconds:", {k: round(v.seconds, 1) for k, v in out.items()})
    return out


@pytest.fixture(scope="session")
def tied_fp8(tmp_path_factory) -> Quantized:
    """fp8 on a random tied-embedding Qwen2 (exercises the tied lm_head on save and reload)."""
    root = tmp_path_factory.mktemp("tied")
    tiny_model("qwen2", tied=True).save_pretrained(root / "src")
    return run_method("fp8", root / "src", root / "fp8")


@pytest.fixture(scope="session")
def reloaded(quantized, tied_fp8, eval_windows, tmp_path_factory) -> dict[str, dict]:
    """Reload every checkpoint in ONE new CPU process (`run_script`); logits on a fixed batch and a greedy
    continuation."""
    tmp = tmp_path_factory.mktemp("reload")
    ids, tiny_ids = eval_windows[:2, :32].clone(), torch.randint(0, 256, (2, 16), generator=torch.Generator())
    torch.save(ids, tmp / "ids.pt")
    torch.save(tiny_ids, tmp / "tiny_ids.pt")
    specs = [f"{q.out_dir}::{tmp / 'ids.pt'}" for q in quantized.values()] + [f"{tied_fp8.out_dir}::{tmp}/tiny_ids.pt"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = run_script(RELOAD_SCRIPT, str(tmp / "out.pt"), *specs, cwd=tmp, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"\nfresh-process reload of {len(specs)} checkpoints: {time.perf_counter() - start:.1f}s")
    return {**torch.load(tmp / "out.pt"), "_ids": ids, "_tiny_ids": tiny_ids}


# ---------------------------------------------------------------- reload, disk format, quality (slow: trained model)

RELOADED_AS = {  # layers[0].self_attn.q_proj after from_pretrained, before any forward: (module, weight, dtype)
    "bnb-int8": ("Linear8bitLt", "Int8Params", "torch.int8"), "bnb-nf4": ("Linear4bit", "Params4bit", "torch.uint8"),
    "bnb-fp4": ("Linear4bit", "Params4bit", "torch.uint8"), "dynamic-int8": ("Linear", "Int8Tensor", "torch.float32"),
    "fp8": ("Linear", "Parameter", "torch.float8_e4m3fn"),
}


def _check_reload(model: nn.Module, got: dict, ids: torch.Tensor) -> None:
    """Reloaded logits/generation match the in-memory quantized model."""
    with torch.no_grad():
        want = model(ids).logits
        gen = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got["logits"], want, rtol=1e-3, atol=1e-3)
    assert torch.equal(got["generated"], gen) and gen.shape[1] > 8


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_reload_in_fresh_process_matches_in_memory(name, quantized, reloaded):
    got, r = reloaded[str(quantized[name].out_dir)], quantized[name].result
    assert (got["layer"], got["weight"], got["dtype"]) == RELOADED_AS[name]
    _check_reload(quantized[name].model, got, reloaded["_ids"])
    assert len(r.quantized_modules) == 4 * 7 and all(m.startswith("model.layers.") for m in r.quantized_modules)
    assert r.kept_modules == ["lm_head", "model.embed_tokens"] and set(r.layer_errors) == set(r.quantized_modules)
    assert max(r.layer_errors.values()) < (0.15 if "4" in name else 0.04), r.layer_errors


@pytest.mark.slow
def test_fp8_tied_embeddings_roundtrip(tied_fp8, reloaded):
    assert "lm_head" in tied_fp8.result.kept_modules and "lm_head" not in tied_fp8.result.quantized_modules
    assert json.loads((tied_fp8.out_dir / "config.json").read_text())["tie_word_embeddings"] is True
    _check_reload(tied_fp8.model, reloaded[str(tied_fp8.out_dir)], reloaded["_tiny_ids"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bnb-int8", "bnb-nf4", "bnb-fp4"])
def test_bnb_checkpoint_on_disk(name, quantized):
    qc, tensors, _ = on_disk(quantized[name].out_dir)
    w = "model.layers.0.mlp.down_proj"
    assert qc["quant_method"] == "bitsandbytes" and qc["llm_int8_skip_modules"] == ["lm_head"]
    assert tensors["lm_head.weight"]["dtype"] == "F32" and (quantized[name].out_dir / "tokenizer.json").exists()
    if name == "bnb-int8":
        assert qc["load_in_8bit"] and not qc["load_in_4bit"] and qc["llm_int8_threshold"] == 6.0
        assert tensors[f"{w}.weight"] == {"dtype": "I8", "shape": [128, 384]}
        assert tensors[f"{w}.SCB"] == {"dtype": "F32", "shape": [128]}
    else:
        kind = name.split("-")[1]
        assert qc["load_in_4bit"] and not qc["load_in_8bit"] and qc["bnb_4bit_quant_type"] == kind
        assert qc["bnb_4bit_use_double_quant"] and qc["bnb_4bit_compute_dtype"] == "float32"
        assert tensors[f"{w}.weight"] == {"dtype": "U8", "shape": [128 * 384 // 2, 1]}
        assert f"{w}.weight.quant_state.bitsandbytes__{kind}" in tensors and f"{w}.weight.nested_absmax" in tensors


@pytest.mark.slow
def test_dynamic_int8_checkpoint_on_disk(quantized):
    qc, tensors, meta = on_disk(quantized["dynamic-int8"].out_dir)
    w = "model.layers.0.mlp.down_proj"
    assert qc["quant_method"] == "torchao" and qc["modules_to_not_convert"] == ["lm_head"]
    assert qc["quant_type"]["default"]["_type"] == "Int8DynamicActivationInt8WeightConfig"
    assert tensors[f"{w}._weight_qdata"] == {"dtype": "I8", "shape": [128, 384]}
    assert tensors[f"{w}._weight_scale"] == {"dtype": "F32", "shape": [128, 1]}
    desc = json.loads(meta[f"{w}.weight"])
    assert desc["_type"] == "Int8Tensor" and desc["_data"]["act_quant_kwargs"]["_type"] == "QuantizeTensorToInt8Kwargs"
    assert tensors["lm_head.weight"]["dtype"] == "F32"


@pytest.mark.slow
def test_fp8_checkpoint_is_compressed_tensors_for_vllm(quantized, demo_assets):
    from safetensors.torch import load_file

    out = quantized["fp8"].out_dir
    qc = on_disk(out)[0]
    assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", "float-quantized")
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert group["weights"] == dict(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
    ct = pytest.importorskip("compressed_tensors.quantization")  # the parser vLLM uses
    parsed = ct.QuantizationConfig.model_validate(qc)
    assert parsed.config_groups["group_0"].weights.strategy == "channel"
    sd, src = load_file(str(out / "model.safetensors")), load_file(str(demo_assets.model_dir / "model.safetensors"))
    for name in quantized["fp8"].result.quantized_modules:
        w, s, orig = sd[f"{name}.weight"], sd[f"{name}.weight_scale"], src[f"{name}.weight"]
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (w.shape[0], 1)
        assert ((w.float() * s - orig).norm() / orig.norm()) < 0.04
    assert sd["lm_head.weight"].dtype == torch.float32 and sd["model.embed_tokens.weight"].dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_perplexity_within_gate(name, quantized, eval_windows, fp_ppl):
    ppl = perplexity(quantized[name].model, eval_windows)
    increase = 100 * (ppl / fp_ppl - 1)
    print(f"\n{name}: ppl {ppl:.3f} vs fp {fp_ppl:.3f} ({increase:+.2f}%, gate {GATES[name]}%)")
    assert build_config(name, {}).default_max_ppl_increase_pct() == GATES[name]
    assert increase <= GATES[name]


@pytest.mark.slow
def test_fp8_registered_handler_end_to_end(demo_assets, tmp_path):
    job = QuantizeJob(demo_assets.model_dir, tmp_path / "fp8", None, "cpu", progress=lambda _msg: None)
    result = get_method("fp8").handler(build_config("fp8", {}), job)
    assert len(result.quantized_modules) == 28
    assert fp8.checkpoint_fp8_modules(job.out_dir) == set(result.quantized_modules)


# ---------------------------------------------------------------- validation and guards (fast)


@pytest.mark.parametrize("name,bits,hint", [
    ("bnb-nf4", 3, "bits: 4"), ("bnb-fp4", 8, "bnb-int8"), ("bnb-int8", 4, "bnb-nf4"), ("dynamic-int8", 4, "bits: 8"),
    ("fp8", 4, "8-bit"),
])
def test_bits_is_fixed_by_the_method(name, bits, hint):
    with pytest.raises(QuantmillError, match=r"bits: .*bits=") as exc:
        build_config(name, {"bits": bits})
    assert hint in str(exc.value) and name in str(exc.value)
    default = build_config(name, {})
    assert build_config(name, {"bits": default.bits}).weight_bits == default.FIXED_BITS


@pytest.mark.parametrize("name", METHODS)
def test_unknown_option_is_rejected(name):
    with pytest.raises(QuantmillError, match=r"group_size: (unknown option|Extra inputs are not permitted)"):
        build_config(name, {"group_size": 64})


@pytest.mark.parametrize("name,params,field", [
    ("bnb-nf4", {"compute_dtype": "int8"}, "compute_dtype"), ("bnb-int8", {"threshold": -1.0}, "threshold"),
    ("bnb-int8", {"compute_dtype": "float16"}, "compute_dtype"), ("fp8", {"skip_modules": [" "]}, "skip_modules"),
    ("dynamic-int8", {"granularity": "per_group"}, "granularity"),
])
def test_bad_field_values_name_the_field(name, params, field):
    with pytest.raises(QuantmillError, match=rf"(^|: ){field}: "):
        build_config(name, params)


def test_defaults_gates_and_cpu_device():
    assert {n: build_config(n, {}).default_max_ppl_increase_pct() for n in METHODS} == GATES
    assert build_config("bnb-nf4", {}).to_dict()["skip_modules"] == ["lm_head"]
    cases = [(n, {}) for n in METHODS] + [("bnb-nf4", {"compute_dtype": d}) for d in ("bfloat16", "float16")]
    for name, params in cases:  # nothing here is CUDA-only: bnb 0.50 runs all of it on CPU
        build_config(name, params).check_device("cpu")


def test_skip_modules_must_match_a_linear():
    info = ModelInfo("LlamaForCausalLM", {"model.layers.0.self_attn.o_proj": 128})
    build_config("fp8", {"skip_modules": ["lm_head", "o_proj"]}).check_model(info)
    with pytest.raises(ValueError, match=r"skip_modules: 'out_proj' matches no linear"):
        build_config("bnb-nf4", {"skip_modules": ["lm_head", "out_proj"]}).check_model(info)


def test_unquantized_target_partial_fused_group_and_tied_lm_head_are_refused():
    model = tiny_model()
    fp8.quantize_model_fp8(model, ("lm_head",))
    model.model.layers[1].mlp.up_proj = nn.Linear(64, 128, bias=False)
    with pytest.raises(RuntimeError, match=r"fp8: module model\.layers\.1\.mlp\.up_proj was not quantized"):
        audit_quantized(model, ("lm_head",), fp8.is_fp8, "fp8")
    with pytest.raises(ValueError, match=r"skip_modules: .*q_proj.*fused by vLLM"):
        fp8.quantize_model_fp8(tiny_model(), ("lm_head", "k_proj"))
    with pytest.raises(ValueError, match=r"skip_modules: lm_head is tied"):
        fp8.quantize_model_fp8(tiny_model("qwen2", tied=True), ())


def test_fp8_weight_math():
    w = torch.randn(16, 32) * torch.logspace(-3, 1, 16)[:, None]
    w[3] = 0.0
    q, s = fp8.quantize_fp8_weight(w)
    deq, rows = q.float() * s, torch.arange(16) != 3
    assert q.dtype == torch.float8_e4m3fn and s.shape == (16, 1) and torch.isfinite(s).all()
    assert q.float().abs().amax(dim=1)[rows].eq(448).all() and torch.equal(deq[3], torch.zeros(32))
    assert ((deq - w).norm(dim=1)[rows] / w.norm(dim=1)[rows]).max() < 0.04


def test_every_registered_handler_resolves_to_its_method_module():
    """Configs register in quantmill.methods with the handler's import path: each path resolves, one module per method."""
    from quantmill.methods import get_method, known_methods
    from quantmill.methods.registry import _METHODS

    for name in known_methods():
        ref = _METHODS[name].handler_ref
        assert isinstance(ref, str) and ref.startswith("quantmill.quantize."), (name, ref)
        handler = get_method(name).handler
        assert callable(handler) and f"{handler.__module__}:{handler.__name__}" == ref
        assert get_method(name).summary == handler.__doc__.strip().splitlines()[0]  # the form's text, one source


def test_every_method_states_its_memory_loading_and_requirements():
    """The plan, the model card and the MLflow model read these facts from the registry: none may be missing."""
    from quantmill.methods import fact_table, known_methods

    for fact in ("memory", "loader", "requirements"):
        assert sorted(fact_table(fact)) == known_methods(), fact
