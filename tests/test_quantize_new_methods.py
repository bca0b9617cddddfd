"""w8a8-int8 (SmoothQuant + compressed-tensors), autoround (auto-round, GPTQ format), gguf (llama.cpp's format).

Fast: validation, gates, names, smoothing leaves the fp model unchanged, the GGUF chat template. Slow (per demo
architecture, Llama and Qwen2): each method's handler, the checkpoint layout its loader documents, a fresh-process
reload with the loader users run (transformers + compressed-tensors / gptqmodel / transformers' GGUF loader), logits
against this test's own reference, and quality against RTN / the fp baseline.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from quantmill.errors import QuantmillError
from quantmill.methods.registry import ModelInfo, QuantizeJob, build_config, get_method
from quantmill.modelinfo import model_info
from quantmill.quantize import gguf_export, w8a8
from tests.fresh import run_script
from tests.test_quantize_gptq_family import (
    load_reference,
    max_logit_error,
    noisy_copies,
    reload_in_fresh_process,
    score,
    token_data,
)

GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16")
W8A8 = {"w8a8": {}, "w8a8-nosmooth": {"smoothing_alpha": None}, "w8a8-dynamic": {"activations": "dynamic"},
        "w8a8-gptq": {"weights": "gptq"}}
AUTOROUND = {"bits": 2, "group_size": 32, "iters": 20}  # 20 sign-gradient steps per block: ~1 min per model on CPU
INFO = ModelInfo("LlamaForCausalLM", {"model.layers.0.mlp.down_proj": 384, "model.layers.0.self_attn.q_proj": 128})


# ---------------------------------------------------------------- validation (fast)
def test_names_gates_and_fields():
    assert build_config("w8a8-int8", {}).variant_name() == "w8a8-int8"
    assert build_config("w8a8-int8", {"activations": "dynamic", "smoothing_alpha": None, "weights": "gptq"}
                        ).variant_name() == "w8a8-int8-gptq-dynamic-nosmooth"
    assert build_config("autoround", {"bits": 2, "group_size": 32}).variant_name() == "autoround-w2g32"
    names = [build_config("gguf", {"quant_type": t}).variant_name() for t in ("Q4_0", "BF16")]
    assert names == ["gguf-q4-0", "gguf-bf16"]
    gates = {t: build_config("gguf", {"quant_type": t}).default_max_ppl_increase_pct() for t in GGUF_TYPES}
    assert gates == {"Q8_0": 2.0, "Q4_0": 5.0, "Q4_1": 5.0, "Q5_0": 5.0, "Q5_1": 5.0, "BF16": 1.0}
    assert build_config("w8a8-int8", {}).default_max_ppl_increase_pct() == 2.0
    gptq_gate = build_config("gptq", {}).default_max_ppl_increase_pct()
    assert build_config("autoround", {}).default_max_ppl_increase_pct() == gptq_gate
    bits = [build_config("gguf", {"quant_type": t}).weight_bits for t in ("Q8_0", "Q5_1", "Q4_0", "BF16")]
    assert bits == [8, 5, 4, 16]
    bad = [("w8a8-int8", {"bits": 4}, "bits"), ("w8a8-int8", {"smoothing_alpha": 1.5}, "smoothing_alpha"),
           ("w8a8-int8", {"activations": "token"}, "activations"), ("autoround", {"bits": 5}, "bits"),
           ("autoround", {"iters": -1}, "iters"), ("gguf", {"quant_type": "Q6_K"}, "quant_type"),
           ("gguf", {"bits": 4}, "unknown option")]
    for method, params, field in bad:
        with pytest.raises(QuantmillError, match=field):
            build_config(method, params)


def test_model_checks_name_the_field(monkeypatch):
    other = ModelInfo("GPT2LMHeadModel", INFO.linear_in_features)
    with pytest.raises(ValueError, match="smoothing_alpha: no smoothing map for GPT2LMHeadModel"):
        build_config("w8a8-int8", {}).check_model(other)
    build_config("w8a8-int8", {"smoothing_alpha": None}).check_model(other)  # without smoothing any architecture
    with pytest.raises(ValueError, match="gguf export supports"):
        build_config("gguf", {}).check_model(other)
    odd = ModelInfo("LlamaForCausalLM", {"model.layers.0.mlp.down_proj": 200})
    with pytest.raises(ValueError, match="quant_type=Q4_0: in_features=200"):
        build_config("gguf", {"quant_type": "Q4_0"}).check_model(odd)
    build_config("gguf", {"quant_type": "BF16"}).check_model(odd)
    with pytest.raises(ValueError, match="group_size=256"):
        build_config("autoround", {"group_size": 256}).check_model(INFO)
    with pytest.raises(ValueError, match="group_size=-1"):
        build_config("autoround", {"group_size": -1}).check_device("cpu")
    monkeypatch.setitem(sys.modules, "auto_round", None)  # auto-round missing: one line naming the install
    with pytest.raises(ValueError, match=r"auto-round package .*pip install \"auto-round==0\.16\.1\""):
        build_config("autoround", {}).check_device("cpu")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_smoothing_keeps_the_fp_model(arch, request):
    """Scaling the linears' columns by s and the norms (up_proj rows) by 1/s leaves the logits as they were."""
    from quantmill.modelinfo import target_linears
    from quantmill.quantize.common import load_fp_model

    assets = request.getfixturevalue("demo_assets" if arch == "llama" else "qwen2_assets")
    model = load_fp_model(assets.model_dir, "cpu", torch.float64)
    ids = torch.randint(4, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    stats = w8a8.activation_absmax(model, sorted(target_linears(model)), ids)
    smoothed = w8a8.smooth(model, model.config.architectures[0], stats, 0.5)
    with torch.no_grad():
        after = model(ids).logits
    norm = model.model.layers[0].input_layernorm.weight
    assert (before - after).abs().max() < 1e-8 * before.abs().max() and not torch.allclose(norm, torch.ones_like(norm))
    assert len(smoothed) == 4 * 6  # q,k,v + gate,up + down per layer; o_proj is not smoothed
    # migration: the smoothed activations' channel spread (max/median) shrinks
    name = "model.layers.1.mlp.down_proj"
    spread = lambda a: (a.max() / a.median()).item()  # noqa: E731
    assert spread(smoothed[name]) < spread(stats[name])


def test_gguf_chat_template_and_metadata(demo_assets, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    src = tmp_path / "model"
    shutil.copytree(demo_assets.model_dir, src)
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": template}))
    out = tmp_path / "out"
    config = build_config("gguf", {"quant_type": "Q8_0"})
    result = get_method("gguf").handler(config, QuantizeJob(src, out, None, "cpu"))
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf"] and len(result.quantized_modules) == 30
    fields = GGUFReader(out / "model.gguf").fields
    text = lambda k: bytes(fields[k].parts[fields[k].data[0]]).decode()  # noqa: E731
    assert text("general.architecture") == "llama" and text("tokenizer.ggml.model") == "gpt2"
    assert text("tokenizer.ggml.pre") == "gpt-2" and text("tokenizer.chat_template") == template
    assert int(fields["general.file_type"].parts[-1][0]) == 7  # LlamaFileType.MOSTLY_Q8_0
    tok = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    assert tok.chat_template == template
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|user|>hi</s>"


# ------------------ end to end on conftest's trained demo Llama and Qwen2 (slow)
@pytest.fixture(scope="module", params=["llama", "qwen2"])
def assets(request):
    """Each trained demo architecture in turn (conftest's cached `demo_assets` / `qwen2_assets`)."""
    return request.getfixturevalue("demo_assets" if request.param == "llama" else "qwen2_assets")


@pytest.fixture(scope="module")
def data(assets, tmp_path_factory):
    """Calibration file (16 x 128), eval windows and probe of the architecture under test."""
    return token_data(assets, tmp_path_factory.mktemp("calib"))


@pytest.fixture(scope="module")
def fp_logprobs(assets, data):
    """The fp model's log-probs on the eval windows (batches of 16), the reference of `score`."""
    from quantmill.quantize.common import load_fp_model

    fp = load_fp_model(assets.model_dir, "cpu", torch.float32)
    with torch.no_grad():
        return [fp(input_ids=c).logits.float().log_softmax(-1) for c in data.windows.split(16)]


def run(method: str, params: dict, assets, data, out: Path):
    """Validate and run one handler on CPU; (result, seconds)."""
    config = build_config(method, params)
    config.check_device("cpu")
    config.check_model(model_info(assets.model_dir))
    t0 = time.time()
    result = get_method(method).handler(config, QuantizeJob(assets.model_dir, out, data.calib, "cpu", lambda m: None))
    return result, time.time() - t0


FRESH = textwrap.dedent("""
    import json, math, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    args = json.loads(sys.argv[1]); windows = torch.load(args["tmp"] + "/windows.pt"); out = {}
    fp = AutoModelForCausalLM.from_pretrained(args["base"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [fp(c).logits.float().log_softmax(-1) for c in windows.split(16)]
    for i, (d, gguf_file) in enumerate(args["models"]):
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw).eval()
        nll = kl = 0.0
        with torch.no_grad():
            for c, r in zip(windows.split(16), ref):
                lp = m(c).logits.float().log_softmax(-1)
                nll -= lp[:, :-1].gather(-1, c[:, 1:, None]).sum().item()
                kl += (r.exp() * (r - lp)).sum().item()
            torch.save(m(windows[:2]).logits, f"{args['tmp']}/logits{i}.pt")
        lin = m.model.layers[0].mlp.down_proj
        scheme = getattr(lin, "quantization_scheme", None)
        tok = AutoTokenizer.from_pretrained(d, **kw)
        out[d] = {"ppl": math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))), "kl": kl / windows.numel(),
                  "class": type(lin).__name__, "tokens": tok(args["text"], add_special_tokens=False)["input_ids"],
                  "input_activations": None if scheme is None or scheme.input_activations is None
                  else scheme.input_activations.model_dump(mode="json"),
                  "input_scale": getattr(lin, "input_scale", torch.zeros(1)).flatten().tolist()}
        out[d]["decoded"] = tok.decode(out[d]["tokens"])
    print("RESULT" + json.dumps(out))
""")


def fresh_process(base: Path, models: list[tuple[Path, str | None]], windows: torch.Tensor, text: str,
                  tmp: Path) -> dict[str, dict]:
    """Load each checkpoint with transformers in a new process (`run_script`): ppl, KL to the fp model, logits on 2
    windows, tokens."""
    torch.save(windows, tmp / "windows.pt")
    args = json.dumps({"base": str(base), "models": [[str(d), g] for d, g in models], "tmp": str(tmp), "text": text})
    proc = run_script(FRESH, args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.split("RESULT", 1)[1])
    return {Path(d).name: found[str(d)] | {"logits": torch.load(tmp / f"logits{i}.pt")}
            for i, (d, _) in enumerate(models)}


# --- w8a8-int8
@pytest.fixture(scope="module")
def w8a8_runs(assets, data, tmp_path_factory):
    """Each W8A8 setting's checkpoint: {key: (dir, result, seconds)}."""
    root = tmp_path_factory.mktemp("w8a8")
    return {k: (root / k, *run("w8a8-int8", p, assets, data, root / k)) for k, p in W8A8.items()}


def reload_text(assets) -> str:
    """The text the fresh process tokenizes with each reloaded model's tokenizer (the GGUF round trip)."""
    return Path(assets.eval_path).read_text()[:3000]


@pytest.fixture(scope="module")
def reloaded(assets, data, w8a8_runs, gguf_runs, tmp_path_factory):
    """The fp model, the W8A8 checkpoints (transformers + compressed-tensors) and the GGUF exports (transformers'
    GGUF loader) loaded in one fresh process: {folder name: what `fresh_process` found}."""
    models = [(assets.model_dir, None), *((d, None) for d, _, _ in w8a8_runs.values()),
              *((d, "model.gguf") for d, _, _ in gguf_runs.values())]
    text = reload_text(assets)
    return fresh_process(assets.model_dir, models, data.windows, text, tmp_path_factory.mktemp("fresh"))


@pytest.fixture(scope="module")
def w8a8_loaded(reloaded):
    """The W8A8 checkpoints as reloaded: {setting: what `fresh_process` found}."""
    return {key: reloaded[key] for key in W8A8}


@pytest.mark.slow
def test_w8a8_checkpoint_layout_as_vllm_expects(assets, w8a8_runs):
    """compressed-tensors W8A8 int8 (what vLLM's CompressedTensorsW8A8Int8 loads), per the format's documentation."""
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    for key, (ckpt, result, _) in w8a8_runs.items():
        top = json.loads((ckpt / "config.json").read_text())
        cfg, qwen2 = top["quantization_config"], top["model_type"] == "qwen2"
        assert (cfg["quant_method"], cfg["format"], cfg["quantization_status"]) == \
            ("compressed-tensors", "int-quantized", "compressed")
        assert cfg["ignore"] == ["lm_head"] and list(cfg["config_groups"]) == ["group_0"]
        group = QuantizationConfig.model_validate(cfg).config_groups["group_0"]  # the peer library parses it
        w, a = group.weights, group.input_activations
        assert group.targets == ["Linear"] and group.output_activations is None
        assert (w.num_bits, w.type, w.strategy, w.symmetric, w.dynamic) == (8, "int", "channel", True, False)
        dynamic = key == "w8a8-dynamic"
        assert (a.num_bits, a.type, a.symmetric) == (8, "int", True)
        assert (a.strategy, a.dynamic) == (("token", True) if dynamic else ("tensor", False))
        t = load_file(str(ckpt / "model.safetensors"))
        for name in result.quantized_modules:  # 28 linears: int8 [out, in], scale [out, 1], static input_scale [1]
            weight, scale = t[f"{name}.weight"], t[f"{name}.weight_scale"]
            assert weight.dtype == torch.int8 and scale.shape == (weight.shape[0], 1) and scale.dtype == torch.float32
            assert f"{name}.weight_zero_point" not in t and f"{name}.input_zero_point" not in t  # symmetric
            if dynamic:
                assert f"{name}.input_scale" not in t
            else:
                assert t[f"{name}.input_scale"].shape == (1,) and t[f"{name}.input_scale"].item() > 0
        assert len(result.quantized_modules) == 28 and set(result.kept_modules) == {"lm_head", "model.embed_tokens"}
        assert ("lm_head.weight" in t) != qwen2 and t["model.embed_tokens.weight"].dtype == torch.float32  # tied: once
        assert t["model.layers.0.self_attn.q_proj.weight"].shape == (128, 128)
        if qwen2:  # Qwen2's q/k/v bias stays in float beside the int8 weight
            assert t["model.layers.0.self_attn.k_proj.bias"].dtype == torch.float32


def w8a8_reference(model_dir: Path, ckpt: Path, static: bool) -> torch.nn.Module:
    """This test's own W8A8 model: the checkpoint's int8 * weight_scale, its norms, inputs fake-quantized to int8."""
    from safetensors.torch import load_file

    from quantmill.quantize.common import load_fp_model

    t = load_file(str(ckpt / "model.safetensors"))
    state = {k: v for k, v in t.items() if not k.endswith(("_scale",)) and v.dtype != torch.int8}
    targets = [k[: -len(".weight")] for k, v in t.items() if v.dtype == torch.int8]
    state |= {f"{n}.weight": t[f"{n}.weight"].float() * t[f"{n}.weight_scale"] for n in targets}
    model = load_fp_model(model_dir, "cpu", torch.float32)
    model.load_state_dict(state, strict=False)

    def fake_quant(scale):
        def hook(_m, args):
            x = args[0]  # dynamic symmetric int8 (compressed-tensors' calculate_qparams): absmax / (255 / 2)
            s = scale if scale is not None else (x.abs().amax(-1, keepdim=True) / 127.5).clamp_min(1e-12)
            return (torch.round(x / s).clamp(-128, 127) * s,)
        return hook

    for n in targets:
        model.get_submodule(n).register_forward_pre_hook(fake_quant(t[f"{n}.input_scale"] if static else None))
    return model


@pytest.mark.slow
def test_w8a8_reloads_runs_int8_activations_and_smoothing_helps(assets, data, w8a8_runs, w8a8_loaded, fp_logprobs):
    fp_ppl, _ = score(load_reference_fp(assets), data.windows, fp_logprobs)
    for key, (ckpt, _, seconds) in w8a8_runs.items():
        got = w8a8_loaded[key]
        static = key != "w8a8-dynamic"
        assert got["input_activations"]["strategy"] == ("tensor" if static else "token"), key  # quantized forward
        ref = w8a8_reference(assets.model_dir, ckpt, static)
        with torch.no_grad():
            expected = ref(data.windows[:2]).logits
        err = (got["logits"] - expected).abs().max().item()
        print(f"\n{key}: ppl {got['ppl']:.3f} (fp {fp_ppl:.3f}) kl {got['kl']:.6f} |logit - reference| {err:.2e} "
              f"({seconds:.1f}s)")
        assert err < 1e-3 * expected.abs().max().item(), key  # the loader ran int8 weights + int8 activations
        assert abs(got["ppl"] / fp_ppl - 1) * 100 < build_config("w8a8-int8", W8A8[key]).default_max_ppl_increase_pct()
    for key in ("w8a8", "w8a8-nosmooth"):  # activations really are quantized: fp activations give other logits
        fp_act = w8a8_reference(assets.model_dir, w8a8_runs[key][0], static=True)
        fp_act._forward_pre_hooks.clear()
        for m in fp_act.modules():
            m._forward_pre_hooks.clear()
        with torch.no_grad():
            assert (fp_act(data.windows[:2]).logits - w8a8_loaded[key]["logits"]).abs().max() > 1e-3
    kl = {k: v["kl"] for k, v in w8a8_loaded.items()}
    # SmoothQuant (alpha 0.5) against the same int8 weights + static int8 activations without smoothing: measured
    # KL 0.00056 vs 0.00151 (Llama) and 0.00045 vs 0.00103 (Qwen2).
    assert kl["w8a8"] < 0.7 * kl["w8a8-nosmooth"], kl
    assert kl["w8a8-dynamic"] < kl["w8a8"] and kl["w8a8-gptq"] < 1.2 * kl["w8a8"], kl


def load_reference_fp(assets):
    """The fp32 model."""
    from quantmill.quantize.common import load_fp_model

    return load_fp_model(assets.model_dir, "cpu", torch.float32)


# --- gguf
@pytest.fixture(scope="module")
def gguf_runs(assets, data, tmp_path_factory):
    """Every GGUF type's export: {type: (dir, result, seconds)}."""
    root = tmp_path_factory.mktemp("gguf")
    return {t: (root / t, *run("gguf", {"quant_type": t}, assets, data, root / t)) for t in GGUF_TYPES}


@pytest.mark.slow
def test_gguf_loads_in_transformers_and_matches_gguf_quants(assets, data, gguf_runs, reloaded):
    from transformers import AutoTokenizer

    from quantmill.scoring import load_model

    text = reload_text(assets)
    original = AutoTokenizer.from_pretrained(assets.model_dir)(text, add_special_tokens=False)["input_ids"]
    fp_ppl = reloaded[assets.model_dir.name]["ppl"]  # the baseline, scored the same way
    for qt, (ckpt, result, seconds) in gguf_runs.items():
        got = reloaded[qt]
        ref = load_reference_fp(assets)
        with torch.no_grad():
            for _, p in ref.named_parameters():
                if p.dim() == 2:
                    p.copy_(gguf_export.quantize_dequantize(p, qt))
            expected = ref(data.windows[:2]).logits
        err = (got["logits"] - expected).abs().max().item()
        delta = 100 * (got["ppl"] / fp_ppl - 1)
        print(f"\n{qt}: ppl {got['ppl']:.3f} ({delta:+.2f}% vs {fp_ppl:.3f}) |logit - gguf.quants ref| {err:.1e} "
              f"size {(ckpt / 'model.gguf').stat().st_size / 2**20:.2f} MiB ({seconds:.1f}s)")
        assert err < 1e-4 * expected.abs().max().item(), qt
        assert got["tokens"] == original and got["decoded"] == text, qt  # the GGUF tokenizer round-trips
        assert len(result.quantized_modules) == (29 if assets.root.name.startswith("qwen2") else 30)
        if qt == "Q8_0":
            assert abs(delta) < 0.5, delta
        if qt == "Q4_0":
            assert delta < build_config("gguf", {"quant_type": "Q4_0"}).default_max_ppl_increase_pct()
    model = load_model(str(gguf_runs["Q8_0"][0]), "cpu")  # quantmill's evaluation finds the .gguf in the folder
    assert model.config.vocab_size == load_reference_fp(assets).config.vocab_size


@pytest.mark.slow
def test_gguf_runs_in_llama_cpp(assets, gguf_runs):
    """llama.cpp itself (llama-cpp-python) loads the file and agrees with transformers on the next tokens."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (no wheel here; it compiles llama.cpp from source: "
                            "pip install llama-cpp-python)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_runs["Q8_0"][0]
    llm = llama_cpp.Llama(model_path=str(path / "model.gguf"), n_ctx=256, verbose=False)
    tok = AutoTokenizer.from_pretrained(path, gguf_file="model.gguf")
    prompt = Path(assets.eval_path).read_text()[:200]
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
    out = llm(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    hf = AutoModelForCausalLM.from_pretrained(path, gguf_file="model.gguf").eval()
    gen = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert tok.decode(gen[0, len(ids):])[:8] == out[:8]


# --- autoround
@pytest.mark.slow
def test_autoround_2bit_beats_rtn_beyond_noise_and_reloads(assets, data, fp_logprobs, tmp_path):
    pytest.importorskip("auto_round", reason='auto-round not installed: pip install -e ".[autoround]"')
    rtn, _ = run("rtn", {"bits": 2, "group_size": 32}, assets, data, tmp_path / "rtn2")
    result, seconds = run("autoround", AUTOROUND, assets, data, tmp_path / "autoround")
    cfg = json.loads((tmp_path / "autoround" / "config.json").read_text())["quantization_config"]
    got = (cfg["quant_method"], cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"])
    assert got == ("gptq", 2, 32, True, False)
    assert cfg["provider"] == "auto-round" and len(result.quantized_modules) == 28
    assert cfg["modules_to_not_convert"] == result.kept_modules == ["lm_head", "model.embed_tokens"]
    models = {k: load_reference(assets.model_dir, tmp_path / k) for k in ("rtn2", "autoround")}
    s = {k: score(m, data.windows, fp_logprobs) for k, m in models.items()}
    noise = [score(m, data.windows, fp_logprobs)[0] for m in noisy_copies(assets.model_dir, models["rtn2"])]
    spread = max(noise) - min(noise)
    print(f"\nrtn2 ppl {s['rtn2'][0]:.3f}  autoround ppl {s['autoround'][0]:.3f} (kl {s['autoround'][1]:.5f}, "
          f"{seconds:.0f}s)  RTN-size noise ppl {[round(n, 3) for n in noise]}")
    assert s["rtn2"][0] - s["autoround"][0] > spread, (s, noise)
    # what auto-round wrote loads in transformers (+ gptqmodel kernels) in a new process and matches its tensors
    (generated, types, logits), = reload_in_fresh_process([tmp_path / "autoround"], data.probe, tmp_path)
    err, top = max_logit_error(assets.model_dir, tmp_path / "autoround", data.probe, logits)
    assert generated == 6 and types["model.layers.0.mlp.down_proj"] != "Linear" and err < 0.02 * top, (err, types)
