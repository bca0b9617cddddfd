"""Mixed precision (rtn, gptq): sensitive linears kept in fp16 within a size budget, sensitivity measured once."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from quantmill.context import StepContext
from quantmill.errors import QuantmillError
from quantmill.methods.checks import check_recipe
from quantmill.methods.mixed import budget_bytes, choose_kept
from quantmill.methods.registry import ModelInfo, QuantizeJob, build_config, get_method
from quantmill.quantize import sensitivity as sensitivity_module
from quantmill.quantize.run import run_method
from quantmill.recipes import Recipe
from quantmill.refs import CalibRef, ModelRef
from tests.test_quantize_gptq_family import (
    load_reference,
    max_logit_error,
    reload_in_fresh_process,
    score,
    token_data,
)

BITS = {"bits": 2, "group_size": 32}  # 2-bit: RTN's loss is far above noise, so keeping layers visibly helps
EVAL_WINDOWS = 16  # 2048 tokens


# ---------------------------------------------------------------- options and selection (fast)
def test_options_are_validated_with_field_names():
    for params, field in [({}, "mixed_precision: give exactly one"),
                          ({"max_size_bytes": 10, "max_size_ratio": 0.5}, "mixed_precision: give exactly one"),
                          ({"max_size_ratio": 1.5}, "mixed_precision.max_size_ratio"),
                          ({"max_size_ratio": 0.5, "keep_bits": 8}, "mixed_precision.keep_bits: keep_bits=8"),
                          ({"max_size_ratio": 0.5, "budget": 1}, "mixed_precision.budget: unknown option")]:
        with pytest.raises(QuantmillError, match=field):
            build_config("rtn", {"mixed_precision": params})
    with pytest.raises(QuantmillError, match="mixed_precision: unknown option for method 'awq'"):
        build_config("awq", {"mixed_precision": {"max_size_ratio": 0.5}})
    mixed = build_config("gptq", {**BITS, "mixed_precision": {"max_size_ratio": 0.5}})
    assert mixed.variant_name() == "gptq-w2g32-mixed" and mixed.to_dict()["mixed_precision"]["max_size_ratio"] == 0.5
    # recipes without the option serialise exactly as before (same lineage, same cache keys)
    assert "mixed_precision" not in Recipe(method="rtn", bits=8, group_size=64).params


def test_budget_bounds_name_the_field():
    info = ModelInfo("LlamaForCausalLM", {"a": 256, "b": 256}, linear_out_features={"a": 64, "b": 64},
                     other_tensors={"embed.weight": 1000})
    _, floor, ceiling = budget_bytes(build_config("rtn", {**BITS, "mixed_precision": {"max_size_ratio": 0.9}})
                                     .mixed_precision, info, 2, 32)
    # fp16 everything: 2 x 1000 + 2 x 256 x 64 x 2; 2-bit g32: packed 256x64/4, scales 8x64x2, qzeros 8x64/4,
    # g_idx 256x4 per linear; plus safetensors header entries (a few hundred bytes at most)
    assert 0 < ceiling - (2000 + 2 * 256 * 64 * 2) < 600 and 0 < floor - (2000 + 2 * (4096 + 1024 + 128 + 1024)) < 1500
    for params, field in [({"max_size_bytes": floor - 1}, "mixed_precision.max_size_bytes"),
                          ({"max_size_ratio": 0.05}, "mixed_precision.max_size_ratio"),
                          ({"max_size_bytes": ceiling}, "keeps every linear in fp16")]:
        with pytest.raises(ValueError, match=field) as err:
            build_config("rtn", {**BITS, "mixed_precision": params}).check_model(info)
        assert "\n" not in str(err.value)
    build_config("rtn", {**BITS, "mixed_precision": {"max_size_bytes": floor}}).check_model(info)


def test_greedy_keeps_most_sensitivity_per_byte_and_fills_leftover_room():
    sens = {"big": 10.0, "small": 3.0, "tiny": 1.0, "dull": 0.1}
    cost = {"big": 100, "small": 20, "tiny": 10, "dull": 10}  # per byte: small .15 > tiny .1 = big .1 > dull .01
    assert choose_kept(sens, cost, 30) == ["small", "tiny"]
    assert choose_kept(sens, cost, 125) == ["big", "small"]  # big ties tiny per byte; names break ties
    assert choose_kept(sens, cost, 45) == ["dull", "small", "tiny"]  # big does not fit: the rest still may
    assert choose_kept(sens, cost, 9) == []


def test_impossible_budget_fails_before_work(demo_assets):
    model = ModelRef(path=str(demo_assets.model_dir), sha256="demo", source="demo")
    recipe = Recipe(method="rtn", **BITS, mixed_precision={"max_size_bytes": 1000})
    with pytest.raises(QuantmillError, match=r"^recipes\.3 \(rtn-w2g32-mixed\): mixed_precision\.max_size_bytes: "
                                             r"1,000 bytes is below the [\d,]+ bytes") as err:
        check_recipe(recipe, 3, model, "cpu")
    assert "\n" not in str(err.value)


# ------------------------------------------- end to end on the trained demo Llama and Qwen2 (slow)
@pytest.fixture(scope="module", params=["llama", "qwen2"])
def mixed(request, tmp_path_factory):
    """Plain rtn, two mixed budgets, a least-sensitive control (and gptq on Llama); sensitivity calls counted."""
    assets = request.getfixturevalue("demo_assets" if request.param == "llama" else "qwen2_assets")
    root = tmp_path_factory.mktemp(f"mixed-{request.param}")
    data = token_data(assets, root)
    model = ModelRef(path=str(assets.model_dir), sha256=f"demo-{request.param}", source="demo")
    calib = CalibRef(path=str(data.calib), digest="calib", num_samples=16, seq_len=128, seed=0, source="demo",
                     store_key="calib")
    calls, log, real = [], [], sensitivity_module.measure_sensitivity
    patch = pytest.MonkeyPatch()
    patch.setattr(sensitivity_module, "measure_sensitivity", lambda *a, **k: calls.append(a) or real(*a, **k))

    def run(name: str, method: str, **params) -> SimpleNamespace:
        out = root / name
        out.mkdir()
        recipe = Recipe(method=method, **BITS, **params)
        record = run_method(recipe, model, calib, ctx=StepContext(store_root=str(root / "store")), out=out, log=log.append)
        return SimpleNamespace(path=out, **record)

    runs = {"plain": run("plain", "rtn")}
    plain_bytes = sum(p.stat().st_size for p in runs["plain"].path.glob("*.safetensors"))
    budgets = {"small": int(plain_bytes * 1.08), "big": int(plain_bytes * 1.2)}  # 8% / 20% above plain rtn
    for key, budget in budgets.items():
        runs[key] = run(key, "rtn", mixed_precision={"max_size_bytes": budget})
    if request.param == "llama":
        runs["gptq"] = run("gptq", "gptq", mixed_precision={"max_size_bytes": budgets["big"]})
    patch.undo()
    stored = next((root / "store" / "objects").glob("sensitivity-*"))
    values = json.loads((stored / "sensitivity.json").read_text())
    # control: same budget, least sensitive linears kept (the handler ranks by sensitivity; negate it)
    config = build_config("rtn", {**BITS, "mixed_precision": {"max_size_bytes": budgets["big"]}})
    job = QuantizeJob(assets.model_dir, root / "control", data.calib, "cpu", log.append,
                      sensitivity={n: -v for n, v in values.items()})
    runs["control"] = SimpleNamespace(path=root / "control", **vars(get_method("rtn").handler(config, job)))
    return SimpleNamespace(assets=assets, data=data, runs=runs, budgets=budgets, calls=calls, log=log,
                           store=root / "store", stored=stored, sensitivity=values)


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


@pytest.mark.slow
def test_sensitivity_is_measured_once_and_recorded(mixed):
    assert len(mixed.calls) == 1  # two rtn budgets (+ gptq with the same bits/group/sym on Llama) share it
    assert [p.name for p in (mixed.store / "objects").glob("sensitivity-*")] == [mixed.stored.name]
    assert sum("sensitivity: reusing" in line for line in mixed.log) == (2 if "gptq" in mixed.runs else 1)
    kept_any = False
    for key in ("small", "big", "gptq"):
        if key not in mixed.runs:
            continue
        record = mixed.runs[key].extra["mixed_precision"]
        assert record["sensitivity_key"] == mixed.stored.name and record["sensitivity"] == mixed.sensitivity
        assert set(mixed.runs[key].kept_modules) == set(record["kept"]) | {"lm_head", "model.embed_tokens"}
        assert not set(record["kept"]) & set(mixed.runs[key].quantized_modules)
        assert len(record["kept"]) + len(mixed.runs[key].quantized_modules) == 28
        kept_any = kept_any or bool(record["kept"])
    assert kept_any


@pytest.mark.slow
def test_kept_linears_are_the_most_sensitive_and_fit_the_budget(mixed):
    from quantmill.modelinfo import model_info

    info, sens = model_info(mixed.assets.model_dir), mixed.sensitivity
    shape = {n: (info.linear_in_features[n], info.linear_out_features[n]) for n in sens}
    for key in ("small", "big", "gptq"):
        if key not in mixed.runs:
            continue
        run = mixed.runs[key]
        kept = run.extra["mixed_precision"]["kept"]
        assert kept and weight_bytes(run.path) <= mixed.budgets["big" if key == "gptq" else key], key
        for k in kept:  # among linears of one shape (same bytes saved), only the most sensitive are kept
            assert all(sens[k] >= sens[n] for n in run.quantized_modules if shape[n] == shape[k]), (key, k)
    kept = {k: mixed.runs[k].extra["mixed_precision"]["kept"] for k in ("small", "big")}
    assert len(kept["big"]) > len(kept["small"])


@pytest.mark.slow
def test_keeping_sensitive_layers_beats_plain_rtn_and_the_control(mixed):
    from quantmill.quantize.common import load_fp_model

    windows = mixed.data.windows[:EVAL_WINDOWS]
    fp = load_fp_model(mixed.assets.model_dir, "cpu", torch.float32)
    with torch.no_grad():
        ref = [fp(input_ids=c).logits.float().log_softmax(-1) for c in windows.split(16)]
        ppl = {k: score(load_reference(mixed.assets.model_dir, mixed.runs[k].path), windows, ref)[0]
               for k in ("plain", "small", "big", "control")} | {"fp": score(fp, windows, ref)[0]}
    print({k: round(v, 3) for k, v in ppl.items()})
    gap = ppl["plain"] - ppl["fp"]
    assert ppl["fp"] < ppl["big"] < ppl["small"] < ppl["plain"]
    assert ppl["plain"] - ppl["big"] > 0.4 * gap  # keeping ~20% more bytes closes much of 2-bit RTN's gap
    assert ppl["control"] - ppl["big"] > 0.25 * gap  # the same bytes spent on the least sensitive linears do not
    assert weight_bytes(mixed.runs["control"].path) <= mixed.budgets["big"]


@pytest.mark.slow
def test_mixed_checkpoints_reload_in_fresh_process(mixed, tmp_path):
    keys = [k for k in ("big", "gptq") if k in mixed.runs]
    reloaded = reload_in_fresh_process([mixed.runs[k].path for k in keys], mixed.data.probe, tmp_path)
    for key, (generated, types, logits) in zip(keys, reloaded):
        kept = set(mixed.runs[key].extra["mixed_precision"]["kept"])
        assert generated == 6 and {n for n, t in types.items() if t == "Linear"} == kept, (key, types)
        err, top = max_logit_error(mixed.assets.model_dir, mixed.runs[key].path, mixed.data.probe, logits)
        assert err < 0.02 * top, f"{key}: reloaded logits differ from the dequantized reference ({err:.4f})"
