"""Calibration data as practitioners prepare it: packed windows, samples with masks, chat templates, hub datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quantmill.context import StepContext
from quantmill.errors import ProfileError, QuantmillError
from quantmill.profile import Calibration
from quantmill.profile_io import parse_profile
from quantmill.refs import ModelRef
from quantmill.tasks.calibrate import CALIBRATE_CACHE, calibrate

# A ChatML template (as Qwen's), written here so the test knows which tokens every rendered conversation starts with.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def model_ref(path: Path) -> ModelRef:
    return ModelRef(path=str(path), sha256=f"sha-{path.name}", source="demo", summary={"max_position_embeddings": 512})


def paragraphs(demo_assets, n: int) -> list[str]:
    """The first `n` non-empty paragraphs of the demo's calibration text (varied lengths)."""
    return [p.strip() for p in demo_assets.calib_path.read_text(encoding="utf-8").split("\n\n") if p.strip()][:n]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_model(demo_assets, tmp_path_factory) -> Path:
    """The demo model's folder with a chat template in its tokenizer_config.json."""
    out = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(demo_assets.model_dir, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML}))
    return out


@pytest.fixture(scope="module")
def conversations(demo_assets, tmp_path_factory) -> tuple[Path, list[list[dict]]]:
    texts = paragraphs(demo_assets, 24)
    convs = [[{"role": "user", "content": f"Explain: {t[:40]}"}, {"role": "assistant", "content": t}] for t in texts]
    return write_jsonl(tmp_path_factory.mktemp("conv") / "chat.jsonl", [{"messages": c} for c in convs]), convs


def test_chat_template_samples_start_with_template_tokens(chat_model, conversations, tmp_path):
    from transformers import AutoTokenizer

    path, convs = conversations
    spec = Calibration(source={"path": str(path), "messages_field": "messages"}, num_samples=8, seq_len=64)
    assert spec.mode == "samples"  # chat data defaults to one conversation per sample
    ref = calibrate.fn(model_ref(chat_model), spec, ctx=StepContext(store_root=str(tmp_path)))
    data = load_file(ref.path)
    ids, mask = data["input_ids"], data["attention_mask"]
    assert ids.shape[0] == 8 and ids.shape[1] <= 64 and ref.mode == "samples"
    tok = AutoTokenizer.from_pretrained(chat_model)
    start = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    rendered = [tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"][:64] for c in convs]
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert row[: len(start)].tolist() == start  # the template's own tokens first
        assert row[:n].tolist() in rendered and m[:n].all() and not m[n:].any()


def test_missing_chat_template_fails_with_one_line(demo_assets, conversations, tmp_path):
    spec = Calibration(source={"path": str(conversations[0]), "messages_field": "messages"}, num_samples=4, seq_len=64)
    with pytest.raises(QuantmillError) as err:
        calibrate.fn(model_ref(demo_assets.model_dir), spec, ctx=StepContext(store_root=str(tmp_path)))
    msg = str(err.value)
    assert msg.startswith("calibration.source.messages_field: the model's tokenizer has no chat template") and "\n" not in msg
    assert not any((tmp_path / "objects").glob("*/calibration.safetensors"))


@pytest.fixture(scope="module")
def documents(demo_assets, tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", [{"text": t} for t in paragraphs(demo_assets, 40)])


@pytest.mark.slow
def test_samples_mode_rows_masks_and_gptq_runs_on_them(demo_assets, documents, tmp_path):
    from transformers import AutoTokenizer

    from quantmill.methods.registry import QuantizeJob, build_config, get_method

    spec = Calibration(source={"path": str(documents)}, mode="samples", num_samples=12, seq_len=48, seed=3)
    ref = calibrate.fn(model_ref(demo_assets.model_dir), spec, ctx=StepContext(store_root=str(tmp_path / "store")))
    data = load_file(ref.path)
    ids, mask = data["input_ids"], data["attention_mask"]
    tok = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    lengths = {t: min(len(tok(t)["input_ids"]), 48) for t in paragraphs(demo_assets, 40)}
    assert ids.shape == (12, 48) and mask.dtype == torch.long
    assert sorted(mask.sum(1).tolist()) != [48] * 12 and min(mask.sum(1).tolist()) < 48  # short ones kept as they are
    assert all(int(m.sum()) in lengths.values() for m in mask)
    again = calibrate.fn(model_ref(demo_assets.model_dir), spec.model_copy(update={"seed": 4}), ctx=StepContext(store_root=str(tmp_path / "store")))
    assert again.digest != ref.digest  # another seed, other rows

    job = QuantizeJob(demo_assets.model_dir, tmp_path / "gptq", Path(ref.path), "cpu", progress=lambda _m: None)
    (tmp_path / "gptq").mkdir()
    result = get_method("gptq").handler(build_config("gptq", {"bits": 4, "group_size": 32}), job)
    assert len(result.quantized_modules) == 28 and all(e == e for e in result.layer_errors.values())


def test_preparation_changes_digest_and_cache_key(demo_assets, documents, tmp_path):
    model = model_ref(demo_assets.model_dir)
    refs = {}
    for name, source in (("nn", {"path": str(documents)}), ("eos", {"path": str(documents), "join": "eos"})):
        spec = Calibration(source=source, num_samples=8, seq_len=64)
        refs[name] = calibrate.fn(model, spec, ctx=StepContext(store_root=str(tmp_path)))
        assert CALIBRATE_CACHE.key_for({"model": model, "spec": spec}) == refs[name].store_key
    assert refs["nn"].digest != refs["eos"].digest and refs["nn"].store_key != refs["eos"].store_key
    with safe_open(refs["eos"].path, "pt") as f:
        assert f.metadata()["preparation"] == "rows (text) tokenized one by one, each followed by EOS"
    assert refs["nn"].preparation == 'rows (text) joined with "\\n\\n", tokenized once'


def test_hub_dataset_streamed_shuffled_and_cut(demo_assets, documents, tmp_path):
    """A `datasets` source (the packaged json builder over a local file: no network), streamed and shuffled."""
    model = model_ref(demo_assets.model_dir)
    source = {"dataset": "json", "data_files": str(documents), "split": "train", "streaming": True}
    spec = Calibration(source=source, mode="samples", num_samples=5, seq_len=32, seed=1)
    first = load_file(calibrate.fn(model, spec, ctx=StepContext(store_root=str(tmp_path))).path)
    assert first["input_ids"].shape[0] == 5
    again = load_file(calibrate.fn(model, spec, ctx=StepContext(store_root=str(tmp_path / "again"))).path)
    assert torch.equal(first["input_ids"], again["input_ids"])  # the seed fixes the shuffle
    packed = calibrate.fn(model, Calibration(source=source, num_samples=4, seq_len=64, seed=1), ctx=StepContext(store_root=str(tmp_path)))
    assert load_file(packed.path)["input_ids"].shape == (4, 64)
    with pytest.raises(QuantmillError, match=r"calibration\.num_samples: .* 40 non-empty rows, fewer than num_samples = 41"):
        calibrate.fn(model, Calibration(source=source, mode="samples", num_samples=41, seq_len=32), ctx=StepContext(store_root=str(tmp_path)))


@pytest.mark.parametrize("calibration, message", [
    ({"source": {"path": "/c.txt"}, "mode": "samples"}, r"calibration: .*mode 'samples' needs separate documents"),
    ({"source": {"path": "/c.csv", "messages_field": "m"}}, r"calibration\.source: .*messages_field needs .*\.jsonl"),
    ({"source": {"path": "/c.jsonl", "streaming": True}}, r"calibration\.source: .*streaming applies to hub datasets"),
    ({"source": {"path": "/c.jsonl", "join": "tab"}}, r"calibration\.source\.join"),
    ({"source": {"path": "/c.txt"}, "mode": "windows"}, r"calibration\.mode"),
])
def test_profile_errors_name_the_field(calibration, message):
    base = {"model": {"path": "/m"}, "recipes": [{"method": "rtn"}], "registry": {"model_name": "m"},
            "evaluation": {"source": {"path": "/e.txt"}}}
    with pytest.raises(ProfileError, match=message):
        parse_profile({**base, "calibration": calibration})


def test_sensitivity_ignores_the_padding_of_samples(demo_assets, tmp_path):
    """Mixed precision measures on calibration rows: a padded sample scores like the same tokens unpadded."""
    from safetensors.torch import save_file

    from quantmill.quantize.sensitivity import measure_sensitivity

    row = torch.arange(5, 25, dtype=torch.long)
    padded = torch.cat([row, torch.full((12,), 7, dtype=torch.long)])[None]
    save_file({"input_ids": padded, "attention_mask": (torch.arange(32) < 20).long()[None]}, str(tmp_path / "s.safetensors"))
    save_file({"input_ids": row[None].contiguous()}, str(tmp_path / "p.safetensors"))
    params = {"bits": 4, "group_size": 32, "sym": True, "samples": 1}
    got = measure_sensitivity(demo_assets.model_dir, tmp_path / "s.safetensors", params, "cpu", progress=lambda _m: None)
    want = measure_sensitivity(demo_assets.model_dir, tmp_path / "p.safetensors", params, "cpu", progress=lambda _m: None)
    assert got.keys() == want.keys() and len(got) == 28
    assert all(abs(got[k] - want[k]) <= 1e-6 + 1e-4 * want[k] for k in got), {k: (got[k], want[k]) for k in got}
