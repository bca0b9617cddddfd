"""LoRA merge: equal to peft's merge_and_unload for every strategy, QLoRA-aware, streaming within memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.merge import run_child, synthetic_adapter, synthetic_model
from quantmill.adapters import detect_training
from quantmill.context import StepContext
from quantmill.errors import QuantmillError
from quantmill.merging import merge_lora
from quantmill.profile import Merge, Source
from quantmill.refs import ModelRef
from quantmill.tasks.merge import MERGE_CACHE, merge

STRATEGIES = ("cpu", "streaming")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's safetensors shards."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def peft_merged(base: Path, adapter: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload of the adapter into the base loaded in `dtype` (the reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return {k: v.detach().clone() for k, v in PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict().items()}


def train_adapter(base: Path, out: Path, lora, quantized: bool = False, steps: int = 3, before_training=None):
    """Train a LoRA for a few AdamW steps (non-zero B) on a float32 or bitsandbytes-4bit base; return the peft model.

    `before_training(model)` is called on the peft model before its first forward pass.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=torch.float32), "device_map": "cpu"} if quantized else {}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kwargs), lora)
    if before_training is not None:
        before_training(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 2000, (2, 32), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    if quantized:  # peft 0.21 does not write the bnb config into the model card: record it the way trainers do
        (out / "training_config.json").write_text(json.dumps({"quantization_config": model.config.quantization_config.to_dict()}))
    return model


@pytest.fixture(scope="module")
def rs_adapter(demo_assets, tmp_path_factory) -> Path:
    """rsLoRA on attention, MLP and embeddings with an alpha pattern and a fully trained lm_head."""
    from peft import LoraConfig

    out = tmp_path_factory.mktemp("rslora") / "adapter"
    lora = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj", "embed_tokens"],
                      alpha_pattern={"down_proj": 16}, modules_to_save=["lm_head"], lora_dropout=0.0)
    train_adapter(demo_assets.model_dir, out, lora)
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"]
    return out


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def sharded(request, demo_assets, tmp_path_factory) -> Path:
    """The demo model saved in half precision as several shards (+ index json)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp(f"sharded-{request.param}")
    model = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=getattr(torch, request.param))
    model.save_pretrained(out, max_shard_size="1MB")
    shutil.copy(demo_assets.model_dir / "tokenizer.json", out)
    assert len(list(out.glob("*.safetensors"))) > 2 and (out / "model.safetensors.index.json").is_file()
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_demo_adapter_merge_equals_peft(demo_assets, tmp_path, strategy):
    record = merge_lora(demo_assets.model_dir, demo_assets.adapter_dir, tmp_path, Merge(strategy=strategy))
    got, ref = weights(tmp_path), peft_merged(demo_assets.model_dir, demo_assets.adapter_dir, torch.float32)
    base = weights(demo_assets.model_dir)
    assert record["strategy"] == strategy and record["lora_modules"] == 16
    assert record["adapter_training"]["method"] == "lora"
    assert set(got) == set(base) and all(got[k].dtype == base[k].dtype for k in got)
    assert max((got[k] - ref[k]).abs().max().item() for k in got) <= 1e-6
    assert sum(not torch.equal(got[k], base[k]) for k in got) == 16  # the trained B is non-zero
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "config.json").is_file()


def test_streaming_without_kernel_copy_writes_the_same_bytes(demo_assets, tmp_path, monkeypatch):
    merge_lora(demo_assets.model_dir, demo_assets.adapter_dir, tmp_path / "kernel", Merge(strategy="streaming"))
    monkeypatch.delattr("os.copy_file_range")  # e.g. macOS: untouched tensors go through a 16 MiB buffer instead
    merge_lora(demo_assets.model_dir, demo_assets.adapter_dir, tmp_path / "buffer", Merge(strategy="streaming"))
    name = "model.safetensors"
    assert (tmp_path / "kernel" / name).read_bytes() == (tmp_path / "buffer" / name).read_bytes()


def test_rslora_multishard_half_precision_equals_peft(sharded, rs_adapter, tmp_path):
    dtype = next(iter(weights(sharded).values())).dtype
    ref = peft_merged(sharded, rs_adapter, dtype)
    base = weights(sharded)
    for strategy in STRATEGIES:
        out = tmp_path / strategy
        record = merge_lora(sharded, rs_adapter, out, Merge(strategy=strategy))
        got = weights(out)
        assert record["rslora"] and "lm_head.weight" in record["replaced_tensors"]
        assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in sharded.glob("*.safetensors"))
        for k in got:
            assert got[k].dtype == dtype, k
            # peft adds a delta already rounded to the half dtype, quantmill rounds once (in fp32): they differ
            # by at most one unit in the last place of the largest operand
            w, g, r = base[k].float(), got[k].float(), ref[k].float()
            ulp = torch.finfo(dtype).eps * torch.maximum(w.abs(), (g - w).abs()).maximum(g.abs())
            assert ((g - r).abs() <= ulp * 1.01).all(), k
        changed = {k for k in got if not torch.equal(got[k], base[k])}
        assert {"lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"} <= changed


def lora_targets(model) -> dict[str, torch.nn.Module]:
    """The LoRA layers of a peft model (`.base_layer` is the bnb 4-bit one), by their base weight's name."""
    return {name.removeprefix("base_model.model.") + ".weight": module
            for name, module in model.named_modules() if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")}


@pytest.fixture(scope="module")
def qlora(demo_assets, tmp_path_factory):
    """A LoRA trained on the demo model loaded as bitsandbytes NF4 (CPU), and what its targets looked like in training.

    bitsandbytes 0.50 repacks a 4-bit weight into its CPU kernel's layout on the first forward pass where the CPU has
    AVX512-BF16, the layer is in eval mode and its input needs no grad (here: layer 0's q/v, fed by the frozen
    embeddings): `weight.data` changes shape and the quant state gains `packing_format_for_cpu`, after which
    `dequantize_4bit(w.data, w.quant_state)` decodes garbage. So the weights training saw are captured before the
    first forward (they are frozen: training never changes them). Whether a forward repacked a layer is detected by
    that flag; every layer it did not repack is then repacked with bitsandbytes' own `_convert_weight_packed_for_cpu`
    (the function the forward calls), so on every CPU the fixture ends where an AVX512-BF16 machine ends and the test
    shows that what it compares against does not depend on the kernel path.
    """
    import bitsandbytes.functional as bnbf
    from peft import LoraConfig

    out = tmp_path_factory.mktemp("qlora") / "adapter"
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    seen: dict[str, torch.Tensor] = {}
    repacked_by_forward: set[str] = set()

    def capture(model) -> None:
        for key, layer in lora_targets(model).items():
            w = layer.base_layer.weight
            assert not getattr(w.quant_state, "packing_format_for_cpu", False), key  # the plain (saved) layout
            seen[key] = bnbf.dequantize_4bit(w.data, w.quant_state).float()
            layer.base_layer.register_forward_hook(  # peft's save_pretrained undoes the repack: look after each forward
                lambda m, _i, _o, key=key: repacked_by_forward.add(key) if getattr(m.weight.quant_state, "packing_format_for_cpu", False) else None)

    model = train_adapter(demo_assets.model_dir, out, lora, quantized=True, before_training=capture)
    deltas, naive = {}, {}
    for key, layer in lora_targets(model).items():
        w = layer.base_layer.weight
        if not getattr(w.quant_state, "packing_format_for_cpu", False):
            w.data, w.quant_state = bnbf._convert_weight_packed_for_cpu(w.data, w.quant_state)
        deltas[key] = layer.get_delta_weight("default").float()
        naive[key] = bnbf.dequantize_4bit(w.data, w.quant_state).float()
    return out, seen, deltas, {"repacked_by_forward": repacked_by_forward, "naive_after_repack": naive}


def test_qlora_detected_and_both_merge_modes(demo_assets, qlora, tmp_path):
    adapter, seen, deltas, kernel = qlora
    # the CPU kernel path was taken where bitsandbytes says the CPU has it (and only there) ...
    import bitsandbytes.functional as bnbf

    layer0 = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"}
    assert kernel["repacked_by_forward"] == (layer0 if bnbf.has_avx512bf16() else set())
    # ... and reading the repacked weights as plain NF4 (the old fixture) is far off, so the capture matters
    assert all((kernel["naive_after_repack"][k] - seen[k]).abs().max() > 1e-2 for k in seen)
    full = merge_lora(demo_assets.model_dir, adapter, tmp_path / "full", Merge(qlora_merge="full_precision"))
    deq = merge_lora(demo_assets.model_dir, adapter, tmp_path / "deq", Merge(qlora_merge="dequantized", strategy="streaming"))
    finding = full["adapter_training"]
    assert finding["method"] == "qlora" and finding["confidence"] == "config"
    assert finding["quantization"]["quant_type"] == "nf4" and finding["quantization"]["bits"] == 4
    assert any("training_config.json" in e for e in finding["evidence"])
    assert (full["qlora_merge"], deq["qlora_merge"]) == ("full_precision", "dequantized")
    got_full, got_deq, base = weights(tmp_path / "full"), weights(tmp_path / "deq"), weights(demo_assets.model_dir)
    ref = peft_merged(demo_assets.model_dir, adapter, torch.float32)  # peft into the full-precision base
    assert max((got_full[k] - ref[k]).abs().max().item() for k in ref) <= 1e-6
    assert set(seen) == {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))}
    for k in base:
        if k in seen:  # dequantized mode: exactly the 4-bit weights training saw, plus the delta
            torch.testing.assert_close(got_deq[k], seen[k] + deltas[k], rtol=0, atol=1e-6)
            assert (got_deq[k] - got_full[k]).abs().max() > 1e-4
            torch.testing.assert_close(got_deq[k] - got_full[k], seen[k] - base[k], rtol=0, atol=1e-6)
        else:
            assert torch.equal(got_deq[k], got_full[k]), k


def _adapter_dir(tmp_path: Path, name: str, files: dict[str, str], **cfg) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, **cfg}))
    for fname, text in files.items():
        (d / fname).write_text(text)
    return d


@pytest.mark.parametrize("name, files, cfg, method, confidence, clue", [
    ("readme", {"README.md": "## Training procedure\n\nThe following `bitsandbytes` quantization config was used "
                "during training:\n- load_in_4bit: True\n- bnb_4bit_quant_type: fp4\n- bnb_4bit_use_double_quant: True\n"},
     {}, "qlora", "config", "README.md"),
    ("axolotl", {"config.yml": "base_model: x\nadapter: qlora\nload_in_4bit: true\n"}, {}, "qlora", "config", "config.yml"),
    ("factory", {"training_args.yaml": "quantization_bit: 4\nquantization_method: bitsandbytes\n"}, {}, "qlora", "config", "training_args"),
    ("plain", {}, {"base_model_name_or_path": "meta-llama/Llama-3.1-8B"}, "lora", "none", "no quantization"),
    ("named", {}, {"base_model_name_or_path": "unsloth/llama-3-8b-bnb-4bit"}, "qlora", "name", "bnb-4bit"),
])
def test_detection_evidence(tmp_path, name, files, cfg, method, confidence, clue):
    d = _adapter_dir(tmp_path, name, files, **cfg)
    found = detect_training(d, json.loads((d / "adapter_config.json").read_text()), None)
    assert (found["method"], found["confidence"]) == (method, confidence)
    assert any(clue in e for e in found["evidence"]), found["evidence"]
    if name == "readme":
        assert found["quantization"] == {"bits": 4, "quant_type": "fp4", "blocksize": 64, "double_quant": True, "skip_modules": []}


def test_dora_adapter_merge_equals_peft(demo_assets, tmp_path):
    from peft import LoraConfig

    adapter = tmp_path / "dora"
    train_adapter(demo_assets.model_dir, adapter, LoraConfig(r=4, lora_alpha=8, use_dora=True, lora_dropout=0.0,
                                                            target_modules=["q_proj", "o_proj", "up_proj"]))
    ref = peft_merged(demo_assets.model_dir, adapter, torch.float32)
    for strategy in STRATEGIES:
        record = merge_lora(demo_assets.model_dir, adapter, tmp_path / strategy, Merge(strategy=strategy))
        got = weights(tmp_path / strategy)
        assert record["dora"] and record["lora_modules"] == 12
        assert max((got[k] - ref[k]).abs().max().item() for k in got) <= 1e-6


@pytest.mark.parametrize("cfg, message", [
    ({"use_dora": True, "fan_in_fan_out": True}, "DoRA with fan_in_fan_out"), ({"use_dora": True}, "DoRA magnitude"),
    ({"peft_type": "IA3"}, "IA3"), ({"use_qalora": True}, "use_qalora"),
])
def test_unsupported_adapters_refused(demo_assets, tmp_path, cfg, message):
    bad = tmp_path / "bad"
    shutil.copytree(demo_assets.adapter_dir, bad)
    data = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**data, **cfg}))
    with pytest.raises(QuantmillError, match=message):
        merge_lora(demo_assets.model_dir, bad, tmp_path / "out")


def test_task_policy_summary_and_cache_key(demo_assets, tmp_path):
    from quantmill.models import model_summary

    base = ModelRef(path=str(demo_assets.model_dir), sha256="b" * 64, source="demo", summary=model_summary(demo_assets.model_dir))
    store = str(tmp_path / "store")
    ok = merge.fn(base, Source(path=str(demo_assets.adapter_dir)), spec=Merge(strategy="streaming"), ctx=StepContext(store_root=store))
    assert ok.merged and ok.summary["adapter_training"]["method"] == "lora" and ok.summary["merge"]["lora_modules"] == 16
    assert "strategy" not in ok.summary["merge"]  # machine-dependent: kept out of downstream cache keys
    qalora = tmp_path / "qalora"
    shutil.copytree(demo_assets.adapter_dir, qalora)
    cfg = json.loads((qalora / "adapter_config.json").read_text())
    (qalora / "adapter_config.json").write_text(json.dumps({**cfg, "use_qalora": True}))
    with pytest.raises(QuantmillError, match="use_qalora"):
        merge.fn(base, Source(path=str(qalora)), spec=Merge(), ctx=StepContext(store_root=store))
    skipped = merge.fn(base, Source(path=str(qalora)), spec=Merge(on_failure="skip_merge"), ctx=StepContext(store_root=store))
    assert not skipped.merged and skipped.path == base.path and skipped.adapter_sha256
    assert skipped.summary["merge"]["skipped"] and "use_qalora" in skipped.summary["merge"]["reason"]
    key = lambda spec: MERGE_CACHE.key_for({"base": base, "adapter": Source(path=str(qalora)), "spec": spec})  # noqa: E731
    assert key(Merge(strategy="cpu")) == key(Merge(strategy="streaming")) == key(None)
    assert len({key(Merge()), key(Merge(qlora_merge="dequantized")), key(Merge(on_failure="skip_merge"))}) == 3


def test_streaming_peak_rss_within_largest_shard(tmp_path):
    base = synthetic_model(tmp_path / "base", hidden=512, layers=4, vocab=4096, dtype="bfloat16", shard_mb=8)
    adapter = synthetic_adapter(tmp_path / "adapter", base)
    shards = [f.stat().st_size for f in base.glob("*.safetensors")]
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    stream = run_child("streaming", base, adapter, tmp_path / "out")  # also reports its peak before the merge
    assert len(shards) >= 4 and sum(shards) > 3 * max(shards)
    bound = max(shards) + adapter_bytes + 16 * 2**20
    assert stream["maxrss"] - stream["imports_only"] <= bound, (stream, bound)
    assert stream["delta"] <= bound and stream["delta"] < sum(shards), stream
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
