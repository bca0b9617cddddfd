"""Tests for quantmill.demo: locally trained demo models, caching, determinism."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantmill.demo import DemoAssets, _publish, build_demo_assets
from quantmill.demo_corpus import demo_text_splits, demo_topic_keys
from quantmill.demo_training import DemoSpec, eval_perplexity
from tests.conftest import cached_model, qwen2_spec

TINY = DemoSpec(steps=3, batch_size=2, lora_steps=2)
MAX_WINDOWS = 24


@pytest.fixture(scope="module")
def llama(demo_assets: DemoAssets) -> DemoAssets:
    """The session's demo Llama build (with adapter): the models the other tests use, built by build_demo_assets."""
    return demo_assets


@pytest.fixture(scope="module")
def qwen2(qwen2_assets: DemoAssets) -> DemoAssets:
    """The session's Qwen2 build, with an adapter added to it (build_demo_assets on an existing build)."""
    assets = cached_model("qwen2", with_adapter=True, spec=qwen2_spec())
    assert assets.model_dir == qwen2_assets.model_dir
    return assets


def _load(assets: DemoAssets):
    """Load model and tokenizer of a build."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    return AutoModelForCausalLM.from_pretrained(assets.model_dir), tok


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_files_exist(name: str, request: pytest.FixtureRequest) -> None:
    assets: DemoAssets = request.getfixturevalue(name)
    for f in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert (assets.model_dir / f).is_file(), f
    assert assets.adapter_dir == assets.root / "adapter"
    for f in ["adapter_config.json", "adapter_model.safetensors"]:
        assert (assets.adapter_dir / f).is_file(), f
    for p in (assets.train_path, assets.calib_path, assets.eval_path):
        assert p.is_file() and p.stat().st_size > 10_000
    assert assets.model_dir.is_absolute() and (assets.root / "DONE").is_file()


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_loads_and_learned(name: str, request: pytest.FixtureRequest) -> None:
    from transformers import AutoModelForCausalLM

    assets: DemoAssets = request.getfixturevalue(name)
    model, tok = _load(assets)
    assert tok.is_fast and None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)
    assert next(model.parameters()).dtype == torch.float32
    text = assets.eval_path.read_text()
    trained = eval_perplexity(model, tok, text, max_windows=MAX_WINDOWS)
    torch.manual_seed(0)
    random = eval_perplexity(AutoModelForCausalLM.from_config(model.config), tok, text, max_windows=MAX_WINDOWS)
    assert trained < 0.5 * random, (trained, random)


def test_eval_disjoint_from_train_and_calib() -> None:
    keys = demo_topic_keys()
    assert keys["eval"] and keys["calib"] and keys["train"]
    assert not set(keys["eval"]) & (set(keys["train"]) | set(keys["calib"]))
    assert set(keys["calib"]) <= set(keys["train"]) and set(keys["adapter"]) <= set(keys["train"])
    assert not set(keys["calib"]) & set(keys["adapter"])
    splits = demo_text_splits()
    from pydoc_data.topics import topics

    for key in keys["eval"]:
        assert topics[key].strip() not in splits["train"] and topics[key].strip() not in splits["calib"]
    total = sum(len(splits[n]) for n in ("train", "eval"))
    assert 0.10 < len(splits["eval"]) / total < 0.20
    assert demo_text_splits() == splits


def test_data_files_match_splits(llama: DemoAssets) -> None:
    splits = demo_text_splits()
    assert llama.train_path.read_text() == splits["train"]
    assert llama.calib_path.read_text() == splits["calib"]
    assert llama.eval_path.read_text() == splits["eval"]


def test_cached_build_is_reused(llama: DemoAssets) -> None:
    weights = llama.model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = build_demo_assets(llama.root.parent, "llama", quiet=True)
    assert time.perf_counter() - start < 5.0
    assert again == llama and weights.stat().st_mtime_ns == mtime
    no_adapter = build_demo_assets(llama.root.parent, "llama", with_adapter=False, quiet=True)
    assert no_adapter.adapter_dir is None and no_adapter.model_dir == llama.model_dir


def test_qwen2_config(qwen2: DemoAssets) -> None:
    cfg = json.loads((qwen2.model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    model, _ = _load(qwen2)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_linear_shapes_divisible_by_64(llama: DemoAssets, qwen2: DemoAssets) -> None:
    for assets in (llama, qwen2):
        model, _ = _load(assets)
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                assert mod.in_features % 64 == 0 and mod.out_features % 64 == 0, name


def test_llama_config(llama: DemoAssets) -> None:
    cfg = json.loads((llama.model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is False
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"] == 4
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (128, 384, 4)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_adapter(name: str, request: pytest.FixtureRequest) -> None:
    from peft import PeftModel

    assets: DemoAssets = request.getfixturevalue(name)
    cfg = json.loads((assets.adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(assets.model_dir)
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    tensors = load_file(assets.adapter_dir / "adapter_model.safetensors")
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    assert len(lora_b) == 4 * 4 and all(t.abs().max() > 1e-4 for t in lora_b)
    model, tok = _load(assets)
    peft_model = PeftModel.from_pretrained(model, assets.adapter_dir)
    ids = tok("def f(x):\n    return x", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = peft_model(ids).logits
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
    assert adapted.shape[-1] == model.config.vocab_size and not torch.allclose(adapted, base)


def test_deterministic_across_roots(tmp_path: Path) -> None:
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    a = build_demo_assets(tmp_path / "a", "qwen2", with_adapter=False, spec=TINY, quiet=True)
    b = build_demo_assets(tmp_path / "b", "qwen2", with_adapter=False, spec=TINY, quiet=True)
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == det
    assert a.root.name == b.root.name and a.adapter_dir is None
    for f in ["model.safetensors", "tokenizer.json"]:
        assert (a.model_dir / f).read_bytes() == (b.model_dir / f).read_bytes(), f
    late = build_demo_assets(tmp_path / "a", "qwen2", with_adapter=True, spec=TINY, quiet=True)
    assert late.adapter_dir is not None and (late.adapter_dir / "adapter_model.safetensors").is_file()
    assert late.model_dir == a.model_dir


def test_publish_race_keeps_first(tmp_path: Path) -> None:
    final = tmp_path / "build"
    for marker in ("first", "second"):
        tmp = tmp_path / f".tmp-{marker}"
        tmp.mkdir()
        (tmp / "DONE").write_text(marker)
        _publish(tmp, final)
        assert not tmp.exists()
    assert (final / "DONE").read_text() == "first"


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo arch"):
        build_demo_assets(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="head_dim"):
        build_demo_assets(tmp_path, "llama", spec=DemoSpec(hidden_size=100))
    assert not any(tmp_path.iterdir())
