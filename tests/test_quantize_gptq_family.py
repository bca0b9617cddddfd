"""GPTQ-format family (rtn, gptq, awq): RTN math and packing, checkpoint layout, fresh-process reload, quality gap."""

from __future__ import annotations

import json
import math
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from quantmill.methods.registry import ModelInfo, QuantizeJob, build_config, get_method
from quantmill.quantize.gptq_format import (
    dequantize_weight,
    gptq_tensors,
    pack_int32,
    quantize_weight,
    require_all_quantized,
    unpack_int32,
)
from quantmill.quantize.rtn import rtn_quantize_model
from tests.fresh import run_script

SEQ = 128
CALIB_SAMPLES = 16
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ GEMM: nibble i of a word holds column AWQ_ORDER[i] of its 8
# 4-bit group 128 for all three (in=128 layers end up per-channel, down_proj has 3 groups), plus 2-bit, where the
# perplexity gap to RTN is far above noise, and 3-bit asym RTN (bitstream packing + v1 zeros through the kernel).
SETTINGS = {
    "rtn": ("rtn", {"bits": 4, "group_size": 128}),
    "gptq": ("gptq", {"bits": 4, "group_size": 128}),
    "awq": ("awq", {"group_size": 128}),
    "rtn3": ("rtn", {"bits": 3, "group_size": 32, "sym": False}),
    "rtn2": ("rtn", {"bits": 2, "group_size": 32}),
    "gptq2": ("gptq", {"bits": 2, "group_size": 32}),
}
RELOADED = ("rtn", "gptq", "awq", "rtn3")


# ---------------------------------------------------------------- pure math (fast)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_quantize_weight_error_within_half_step(bits, group_size, sym):
    w = torch.randn(64, 128) * torch.linspace(0.1, 3, 128)
    codes, scales, zeros = quantize_weight(w, bits, group_size, sym)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1 and zeros.min() >= 1  # v1 stores zero-1 >= 0
    assert torch.equal(scales, scales.half().float())  # scales are exactly what the fp16 checkpoint stores
    step = scales.repeat_interleave(128 // scales.shape[1], dim=1)
    assert ((dequantize_weight(codes, scales, zeros) - w).abs() <= step / 2 * (1 + 1e-5)).all()


def test_sym_vs_asym():
    w = torch.rand(32, 128) + 0.5  # all-positive: asym fits the range, sym wastes the negative half
    _, s_sym, z_sym = quantize_weight(w, 4, 32, sym=True)
    _, s_asym, z_asym = quantize_weight(w, 4, 32, sym=False)
    assert (z_sym == 8).all() and (z_asym == 1).all()  # min>=0 with v1 zeros: zero pinned to 1
    assert (s_asym < s_sym).all()
    err = lambda sym: (dequantize_weight(*quantize_weight(w, 4, 32, sym)) - w).pow(2).mean()  # noqa: E731
    assert err(False) < 0.5 * err(True)


def test_per_channel_vs_grouped():
    w = torch.randn(32, 256) * torch.cat([torch.full((128,), 0.01), torch.full((128,), 1.0)])
    assert quantize_weight(w, 4, -1, True)[1].shape == (32, 1) and quantize_weight(w, 4, 64, True)[1].shape == (32, 4)
    # per-channel scales are set by the large half; grouped scales adapt to the small half
    err = lambda gs: (dequantize_weight(*quantize_weight(w, 4, gs, True)) - w)[:, :128].abs().mean()  # noqa: E731
    assert err(64) < err(-1) / 5


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (64, 96), dtype=torch.int32)
    for dim in (0, 1):
        packed = pack_int32(codes, bits, dim)
        assert packed.dtype == torch.int32 and packed.shape[dim] == codes.shape[dim] * bits // 32
        assert torch.equal(unpack_int32(packed, bits, dim), codes)


def test_pack_known_patterns():
    def word(codes, bits):
        return pack_int32(torch.tensor(codes, dtype=torch.int32)[:, None], bits, 0)[:, 0].tolist()

    assert word(list(range(8)) * 4, 4)[:1] == [0x76543210]  # GPTQ: value j in bits [4j, 4j+4), LSB first
    assert word([1, 2, 3, 4] * 8, 8)[:1] == [0x04030201]
    assert word([1, 0] * 16, 2)[:1] == [0x11111111]
    three = [0] * 32
    three[10] = 7  # 3-bit: value 10 straddles words 0 and 1 (bits 30-31 | bit 0)
    assert word(three, 3) == [0xC0000000 - 2**32, 1, 0]


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM int32 words [rows, cols/8] -> 4-bit codes [rows, cols] (this test's own unpacker)."""
    nibbles = torch.stack([(packed >> (4 * i)) & 15 for i in range(8)], -1)
    return nibbles[..., torch.tensor(AWQ_ORDER).argsort()].reshape(packed.shape[0], -1)


def test_awq_unpacker_known_pattern():
    word = torch.tensor([[0x75316420]], dtype=torch.int32)  # columns 0..7 holding their own index, AWQ order
    assert unpack_awq(word).tolist() == [list(range(8))]


def test_gptq_tensors_layout_and_v1_zero_point():
    w = torch.randn(64, 256)
    codes, scales, zeros = quantize_weight(w, 4, 64, sym=True)
    t = gptq_tensors(codes, scales, zeros, 4, bias=torch.zeros(64))
    assert t["qweight"].shape == (32, 64) and t["qzeros"].shape == (4, 8) and t["scales"].shape == (4, 64)
    assert t["scales"].dtype == torch.float16 and t["g_idx"].dtype == torch.int32 and t["bias"].dtype == torch.float16
    assert (t["qzeros"] == 0x77777777).all()  # sym zero 8 stored as 8-1 in every nibble
    assert torch.equal(t["g_idx"], torch.arange(256, dtype=torch.int32) // 64)


# ---------------------------------------------------------------- validation (fast)
def test_config_validation_names_fields(monkeypatch):
    info = ModelInfo("LlamaForCausalLM", {"model.layers.0.mlp.down_proj": 384, "model.layers.0.self_attn.q_proj": 128})
    for name, params in [("rtn", {"group_size": 256}), ("gptq", {"group_size": 256}), ("awq", {"group_size": 96})]:
        with pytest.raises(ValueError, match="group_size"):
            build_config(name, params).check_model(info)
    build_config("gptq", {"group_size": 128}).check_model(info)
    for name, kernel in [("gptq", "marlin"), ("gptq", "exllama_v2"), ("awq", "marlin"), ("awq", "gemm")]:
        with pytest.raises(ValueError, match=f"kernel={kernel!r}"):
            build_config(name, {"kernel": kernel}).check_device("cpu")
        build_config(name, {"kernel": kernel}).check_device("cuda")
    for name in ("rtn", "gptq", "awq"):  # CPU int4 kernels cannot load 4-bit per-channel checkpoints
        with pytest.raises(ValueError, match="group_size=-1"):
            build_config(name, {"group_size": -1}).check_device("cpu")
        build_config(name, {"group_size": -1}).check_device("cuda")
    build_config("gptq", {"group_size": -1, "bits": 3}).check_device("cpu")
    with pytest.raises(ValueError, match="bits"):
        build_config("rtn", {"bits": 5})
    with pytest.raises(ValueError, match="group_size"):
        build_config("gptq", {"group_size": 0})
    assert build_config("gptq", {}).default_max_ppl_increase_pct() == 3.0
    assert build_config("awq", {}).default_max_ppl_increase_pct() == 3.0
    monkeypatch.setitem(sys.modules, "awq", None)  # simulate AutoAWQ missing: must fail loudly, never fall back
    with pytest.raises(ValueError, match=r"pip install --no-deps autoawq==0\.2\.9 "):
        build_config("awq", {"backend": "autoawq"}).check_device("cpu")


def test_unquantized_target_is_named(tmp_path):
    from safetensors.torch import save_file

    zero = torch.zeros(1, 1, dtype=torch.int32)
    save_file({"model.layers.0.mlp.up_proj.qweight": zero}, str(tmp_path / "m.safetensors"))
    with pytest.raises(RuntimeError, match="model.layers.0.mlp.down_proj"):
        require_all_quantized(["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_gptqmodel_pack_block(bits):
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from torch import nn

    w = torch.randn(64, 128)
    codes, scales, zeros = quantize_weight(w, bits, 32, sym=False)
    t = gptq_tensors(codes, scales, zeros, bits, None)
    lin = nn.Linear(128, 64, bias=False)
    lin.weight.data = dequantize_weight(codes, scales, zeros)
    ql = TorchLinear(bits=bits, group_size=32, desc_act=False, sym=False, in_features=128, out_features=64, bias=False,
                     pack_dtype=torch.int32, backend="gptq_torch", adapter=None, register_buffers=True)
    ql.pack_block(lin, scales, zeros, t["g_idx"])  # gptqmodel packs v2 (unshifted) zeros
    assert torch.equal(ql.qweight, t["qweight"])
    assert torch.equal(ql.qzeros, pack_int32(zeros.t(), bits, 1))


# ------------------ end to end on conftest's trained demo Llama and Qwen2 (GQA, tied embeddings, q/k/v bias) (slow)
@pytest.fixture(scope="session", params=["llama", "qwen2"])
def assets(request):
    """Each trained demo architecture in turn (conftest's `demo_assets` / `qwen2_assets`, cached)."""
    return request.getfixturevalue("demo_assets" if request.param == "llama" else "qwen2_assets")


def token_data(assets, folder: Path) -> SimpleNamespace:
    """Calibration file (safetensors input_ids [16, 128]) in `folder`, eval windows [n, 128] and a probe [1, 64]."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    ids = lambda p: torch.tensor(tok(Path(p).read_text(), add_special_tokens=False)["input_ids"])  # noqa: E731
    calib_ids = ids(assets.calib_path)
    n = min(CALIB_SAMPLES, calib_ids.numel() // SEQ)
    calib = folder / "calib.safetensors"
    save_file({"input_ids": calib_ids[: n * SEQ].view(n, SEQ).contiguous()}, str(calib))
    eval_ids = ids(assets.eval_path)
    windows = eval_ids[: eval_ids.numel() // SEQ * SEQ].view(-1, SEQ)
    return SimpleNamespace(calib=calib, windows=windows, probe=eval_ids[:64][None])


@pytest.fixture(scope="session")
def data(assets, tmp_path_factory):
    """Calibration file and eval token ids of the architecture under test."""
    return token_data(assets, tmp_path_factory.mktemp("calib"))


@pytest.fixture(scope="session")
def runs(assets, data, tmp_path_factory):
    """Run each handler once per setting: {key: (out_dir, result, seconds)}."""
    root, out = tmp_path_factory.mktemp("ckpt"), {}
    for key, (method, params) in SETTINGS.items():
        (config := build_config(method, params)).check_device("cpu")
        job, t0 = QuantizeJob(assets.model_dir, root / key, data.calib, "cpu", lambda m: None), time.time()
        out[key] = (root / key, get_method(method).handler(config, job), time.time() - t0)
    return out


def load_reference(model_dir: Path, ckpt: Path) -> torch.nn.Module:
    """fp32 model whose weights are the checkpoint's tensors, dequantized by this test's own unpackers."""
    from safetensors.torch import load_file

    from quantmill.quantize.common import load_fp_model

    cfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    bits, state = cfg["bits"], {}
    tensors = {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    for key, v in tensors.items():
        name, leaf = key.rsplit(".", 1)
        if leaf != "qweight":
            state.update({} if leaf in ("qzeros", "scales", "g_idx") else {key: v.float()})
            continue
        scales = tensors[f"{name}.scales"].float()
        if cfg["quant_method"] == "gptq":
            q, z = unpack_int32(v, bits, 0), unpack_int32(tensors[f"{name}.qzeros"], bits, 1) + 1  # v1: zero-1 stored
            g_idx = tensors[f"{name}.g_idx"].long()
        else:  # AWQ GEMM: [in, out/8] words, columns interleaved by AWQ_ORDER
            q, z = unpack_awq(v), unpack_awq(tensors[f"{name}.qzeros"])
            g_idx = torch.arange(q.shape[0]) // (q.shape[0] // scales.shape[0])
        state[f"{name}.weight"] = ((q - z[g_idx]).float() * scales[g_idx]).t().contiguous()
    model = load_fp_model(model_dir, "cpu", torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return model


@torch.no_grad()
def score(model, windows: torch.Tensor, ref_logprobs: list[torch.Tensor]) -> tuple[float, float]:
    """(perplexity, mean KL(reference || model) per token) over non-overlapping eval windows, batches of 16."""
    nll = kl = 0.0
    for chunk, ref in zip(windows.split(16), ref_logprobs):
        logp = model(input_ids=chunk).logits.float().log_softmax(-1)
        nll -= logp[:, :-1].gather(-1, chunk[:, 1:, None]).sum().item()
        kl += (ref.exp() * (ref - logp)).sum().item()
    return math.exp(nll / (windows.shape[0] * (SEQ - 1))), kl / windows.numel()


def noisy_copies(model_dir: Path, rtn: torch.nn.Module, seeds: int = 4):
    """fp models perturbed by Gaussian noise with the per-layer RMS of RTN's rounding error ("RTN-size" noise)."""
    from quantmill.modelinfo import target_linears
    from quantmill.quantize.common import load_fp_model

    for seed in range(seeds):
        gen, model = torch.Generator().manual_seed(seed), load_fp_model(model_dir, "cpu", torch.float32)
        with torch.no_grad():
            for name, lin in target_linears(model).items():
                rms = (rtn.get_submodule(name).weight - lin.weight).pow(2).mean().sqrt()
                lin.weight += torch.randn(lin.weight.shape, generator=gen) * rms
        yield model


RELOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    args = json.loads(sys.argv[1]); probe = torch.load(args["tmp"] + "/probe.pt"); out = []
    for i, d in enumerate(args["dirs"]):
        m = AutoModelForCausalLM.from_pretrained(d, device_map="cpu", dtype=torch.float32)
        x = AutoTokenizer.from_pretrained(d)("class Foo:", return_tensors="pt")
        with torch.no_grad():
            gen = m.generate(**x, max_new_tokens=6, do_sample=False)
            torch.save(m(probe).logits, f"{args['tmp']}/logits{i}.pt")
        types = {n: type(mod).__name__ for n, mod in m.named_modules() if n.endswith("_proj")}
        out.append([gen.shape[1] - x["input_ids"].shape[1], types])
    print("RESULT" + json.dumps(out))
""")


def reload_in_fresh_process(dirs: list[Path], probe: torch.Tensor, tmp: Path) -> list[tuple[int, dict, torch.Tensor]]:
    """Load each checkpoint with transformers in a new process, nothing of quantmill in it (`run_script`): (tokens
    generated, {linear: class}, probe logits)."""
    torch.save(probe, tmp / "probe.pt")
    args = json.dumps({"dirs": [str(d) for d in dirs], "tmp": str(tmp)})
    proc = run_script(RELOAD, args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.split("RESULT", 1)[1])
    return [(n, types, torch.load(tmp / f"logits{i}.pt")) for i, (n, types) in enumerate(info)]


def max_logit_error(model_dir: Path, ckpt: Path, probe: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(max |reloaded logits - this test's dequantized reference|, max |reference logit|)."""
    with torch.no_grad():
        ref = load_reference(model_dir, ckpt)(probe).logits
    return (logits - ref).abs().max().item(), ref.abs().max().item()


@pytest.mark.slow
def test_checkpoints_reload_in_fresh_process(assets, data, runs, tmp_path):
    reloaded = reload_in_fresh_process([runs[k][0] for k in RELOADED], data.probe, tmp_path)
    for key, (generated, types, logits) in zip(RELOADED, reloaded):
        kernel = types["model.layers.0.mlp.down_proj"]
        assert generated == 6 and kernel != "Linear", (key, kernel)  # generated; a quantized kernel ran
        err, top = max_logit_error(assets.model_dir, runs[key][0], data.probe, logits)
        print(f"\n{key}: {kernel} max|logit - reference| = {err:.4f} (max|logit| {top:.2f})")
        assert err < 0.02 * top, f"{key}: kernel logits differ from the dequantized reference"


@pytest.mark.slow
def test_rtn_checkpoint_equals_in_memory_model(assets, runs):
    from quantmill.quantize.common import load_fp_model

    for key in ("rtn", "rtn3"):
        model = load_fp_model(assets.model_dir, "cpu", torch.float32)
        rtn_quantize_model(model, build_config(*SETTINGS[key]))
        ref = load_reference(assets.model_dir, runs[key][0])
        for name in runs[key][1].quantized_modules:
            assert torch.equal(ref.get_submodule(name).weight, model.get_submodule(name).weight), (key, name)


@pytest.mark.slow
def test_checkpoint_layout_as_vllm_expects(runs):
    from safetensors.torch import load_file

    for key, pack in (("gptq", "gptq"), ("rtn", "gptq"), ("awq", "awq")):
        ckpt, result, _ = runs[key]
        top = json.loads((ckpt / "config.json").read_text())
        cfg, qwen2 = top["quantization_config"], top["model_type"] == "qwen2"
        t = load_file(str(ckpt / "model.safetensors"))
        name = "model.layers.1.mlp.down_proj"  # in=384, out=128, group 128 -> 3 groups
        qw, qz, sc = t[f"{name}.qweight"], t[f"{name}.qzeros"], t[f"{name}.scales"]
        assert qw.dtype == qz.dtype == torch.int32 and sc.dtype == torch.float16 and sc.shape == (3, 128)
        if pack == "gptq":
            assert {k: cfg[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym")} == \
                {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
            assert cfg["checkpoint_format"] == "gptq"
            assert qw.shape == (384 // 8, 128) and qz.shape == (3, 128 // 8)
            assert torch.equal(t[f"{name}.g_idx"], torch.arange(384, dtype=torch.int32) // 128)  # int32 [in]
        else:
            assert (cfg["quant_method"], cfg["version"], cfg["zero_point"], cfg["bits"], cfg["group_size"]) == \
                ("awq", "gemm", True, 4, 128)
            assert qw.shape == (384, 128 // 8) and qz.shape == (3, 128 // 8)
        assert ("lm_head.weight" in t) != qwen2 and "model.embed_tokens.weight" in t  # Qwen2 ties lm_head: stored once
        bias = t.get("model.layers.1.self_attn.k_proj.bias")  # Qwen2's q/k/v bias stays fp16 beside the packed weight
        assert (bias.dtype, bias.shape) == (torch.float16, (64,)) if qwen2 else bias is None
        assert set(result.kept_modules) == {"lm_head", "model.embed_tokens"} and len(result.quantized_modules) == 28
        assert cfg["modules_to_not_convert"] == result.kept_modules
    for key in ("gptq", "awq"):  # per-module losses GPTQModel logs, keyed by full module name
        errors, quantized = runs[key][1].layer_errors, set(runs[key][1].quantized_modules)
        # GQA (Qwen2: v_proj out 64 != o_proj in 128): AWQ cannot scale v_proj->o_proj, so o_proj has no searched loss
        unscored = {n for n in quantized if n.endswith("o_proj")} if qwen2 and key == "awq" else set()
        assert set(errors) == quantized - unscored and all(v >= 0 for v in errors.values()), key


@pytest.mark.slow
def test_calibrated_methods_beat_rtn_beyond_noise(assets, data, runs):
    from quantmill.quantize.common import load_fp_model

    fp = load_fp_model(assets.model_dir, "cpu", torch.float32)
    with torch.no_grad():
        ref = [fp(input_ids=c).logits.float().log_softmax(-1) for c in data.windows.split(16)]
    models = {k: load_reference(assets.model_dir, runs[k][0]) for k in ("rtn", "gptq", "awq", "rtn2", "gptq2")}
    s = {k: score(m, data.windows, ref) for k, m in models.items()} | {"fp": score(fp, data.windows, ref)}
    noise = {bits: [score(m, data.windows, ref) for m in noisy_copies(assets.model_dir, models[key])]
             for bits, key in ((4, "rtn"), (2, "rtn2"))}
    spread = {(bits, i): max(x[i] for x in v) - min(x[i] for x in v) for bits, v in noise.items() for i in (0, 1)}
    print("\n" + "\n".join(f"{k:6s} ppl={p:.3f} kl={q:.5f}" for k, (p, q) in s.items()))
    print({f"{b}-bit noise": [f"ppl={p:.3f} kl={q:.5f}" for p, q in v] for b, v in noise.items()})
    print({k: f"{v[2]:.1f}s" for k, v in runs.items()})
    ppl, kl = {k: v[0] for k, v in s.items()}, {k: v[1] for k, v in s.items()}
    # 2-bit: GPTQ's perplexity gap to RTN is far above the spread of RTN-size random noise.
    assert ppl["fp"] < ppl["gptq2"] and ppl["rtn2"] - ppl["gptq2"] > spread[(2, 0)]
    # 4-bit (AWQ's only width): perplexity gaps here are of the order of the noise spread (GPTQ's clears it on
    # Llama; on Qwen2 RTN's own perplexity is within noise of fp's, 71.25 vs 71.40, so there is no gap to close),
    # so both are also judged on the distortion KL(fp || quantized), whose noise spread is small.
    if assets.root.name.startswith("llama"):
        assert ppl["fp"] < ppl["gptq"] < ppl["rtn"] and ppl["fp"] < ppl["awq"] < ppl["rtn"]
        assert ppl["rtn"] - ppl["gptq"] > spread[(4, 0)]
    for key in ("gptq", "awq"):
        assert kl["rtn"] - kl[key] > spread[(4, 1)] and kl[key] < min(q for _, q in noise[4]), key


@pytest.mark.slow
def test_autoawq_backend_when_installed(assets, data, runs, tmp_path):
    """AutoAWQ (optional) writes the same GEMM format; its perplexity is within a few percent of GPTQModel's AWQ."""
    pytest.importorskip("awq", reason="autoawq not installed (optional; pip install --no-deps autoawq==0.2.9)")
    if not assets.root.name.startswith("llama"):
        pytest.skip("the backend comparison runs on the Llama model (measured 1.2% apart on Qwen2 too; ~1 min)")
    from quantmill.quantize.common import load_fp_model

    config = build_config("awq", {"group_size": 128, "backend": "autoawq"})
    config.check_device("cpu")
    out = tmp_path / "autoawq"
    result = get_method("awq").handler(config, QuantizeJob(assets.model_dir, out, data.calib, "cpu"))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "awq" and cfg["version"] == "gemm" and len(result.quantized_modules) == 28
    fp = load_fp_model(assets.model_dir, "cpu", torch.float32)
    with torch.no_grad():
        ref = [fp(input_ids=c).logits.float().log_softmax(-1) for c in data.windows.split(16)]
    (ppl_fp, _), (ppl_rtn, _) = (score(m, data.windows, ref) for m in (fp, load_reference(assets.model_dir, runs["rtn"][0])))
    ppl_auto, kl_auto = score(load_reference(assets.model_dir, out), data.windows, ref)
    ppl_gm, kl_gm = score(load_reference(assets.model_dir, runs["awq"][0]), data.windows, ref)
    print(f"\nfp {ppl_fp:.3f}  rtn {ppl_rtn:.3f}  awq/gptqmodel {ppl_gm:.3f} (kl {kl_gm:.5f})  awq/autoawq {ppl_auto:.3f} (kl {kl_auto:.5f})")
    # Same model, same calibration tokens: within 3% (measured 1.2% on Llama). AutoAWQ's fp16 CPU search ends
    # with a larger KL than GPTQModel's here, one reason GPTQModel is the default backend.
    assert abs(ppl_auto / ppl_gm - 1) < 0.03 and ppl_fp < ppl_auto, (ppl_auto, ppl_gm)
    # what AutoAWQ wrote loads in transformers (+ gptqmodel kernels) on CPU and matches its dequantized weights
    (generated, _, logits), = reload_in_fresh_process([out], data.probe, tmp_path)
    err, scale = max_logit_error(assets.model_dir, out, data.probe, logits)
    assert generated > 0 and err < 0.02 * scale, (err, scale)
