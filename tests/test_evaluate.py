"""Evaluation and gates: perplexity against a plain loop, agreement/KL, speed, accuracy, reports in MLflow."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

from quantmill.accuracy import choice_accuracy, lm_eval_scores
from quantmill.context import StepContext
from quantmill.errors import ProfileError, QuantmillError
from quantmill.gates import judge, limits_for
from quantmill.methods import build_config
from quantmill.profile import Evaluation, Gates
from quantmill.profile_io import parse_profile
from quantmill.refs import CheckpointRef, Lineage, ModelRef, Variant
from quantmill.scoring import topk_kl
from quantmill.tasks.evaluate import EVALUATE_CACHE, eval_data, evaluate
from quantmill.windows import load_windows
from tests import fresh
from tests.conftest import REPO

SPEED = {"batch_sizes": [1, 8], "new_tokens": 8, "warmup": 1, "repeats": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning threads are far slower than one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_spec(eval_path: Path, **extra) -> Evaluation:
    """A small evaluation spec on the demo's held-out text."""
    return Evaluation(source={"path": str(eval_path)}, max_tokens=4096, window=256, **extra)


@pytest.fixture(scope="module")
def setup(demo_assets, tmp_path_factory):
    """Windows and the baseline evaluation (with speed) of the demo model, in a private store."""
    store = str(tmp_path_factory.mktemp("store"))
    model = ModelRef(path=str(demo_assets.model_dir), sha256="demo", source="demo",
                     summary={"max_position_embeddings": 512})
    spec = make_spec(demo_assets.eval_path, speed=SPEED)
    data = eval_data.fn(model, spec, ctx=StepContext(store_root=store))
    baseline = evaluate.fn(model, data, ctx=StepContext(store_root=store), spec=spec)
    return {"store": store, "model": model, "spec": spec, "data": data, "baseline": baseline}


def plain_perplexity(model_dir: Path, windows: torch.Tensor, stride: int) -> float:
    """Independent reference: transformers' own loss per window, HF-style masking of already-scored tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i, window in enumerate(windows):
            labels = window.clone()[None]
            if i > 0:
                labels[0, : windows.shape[1] - stride] = -100
            n = int((labels[0, 1:] != -100).sum())
            nll += float(model(input_ids=window[None], labels=labels).loss) * n
            count += n
    return math.exp(nll / count)


@pytest.mark.parametrize("stride", [None, 96])
def test_perplexity_matches_plain_transformers_loop(setup, demo_assets, stride):
    spec = make_spec(demo_assets.eval_path, stride=stride, speed=None)
    data = eval_data.fn(setup["model"], spec, ctx=StepContext(store_root=setup["store"]))
    if stride is None:
        result = setup["baseline"]
    else:
        result = evaluate.fn(setup["model"], data, ctx=StepContext(store_root=setup["store"]), spec=spec)
    windows, _ = load_windows(data.path)
    expected = plain_perplexity(demo_assets.model_dir, windows, stride or windows.shape[1])
    assert abs(result.metrics["perplexity"] / expected - 1) < 1e-3, (result.metrics["perplexity"], expected)
    assert data.tokens == result.metrics["eval_tokens"] == 255 + (windows.shape[0] - 1) * (stride or 255)
    assert result.metrics["perplexity"] < 200, "the demo model should have learned something"


def gptq_repo_perplexity(model_dir: Path, ids: torch.Tensor, seqlen: int) -> float:
    """Independent reference, written the way the GPTQ paper's repository evaluates (no quantmill code): the token
    ids of the whole text, non-overlapping windows of `seqlen`, mean cross-entropy per window x seqlen, exp of the mean."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = ids[None]
    nsamples = ids.shape[1] // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            batch = ids[:, i * seqlen : (i + 1) * seqlen]
            logits = model(batch).logits
            loss = torch.nn.CrossEntropyLoss()(logits[0, :-1].float(), batch[0, 1:])
            nlls.append(loss.float() * seqlen)
    return math.exp(float(torch.stack(nlls).sum() / (nsamples * seqlen)))


def quantmill_baseline(model_dir: Path, source: dict, store: str, window: int, max_tokens: int):
    """quantmill's eval-data and baseline evaluation of `model_dir` on `source` (speed off)."""
    model = ModelRef(path=str(model_dir), sha256="demo", source="demo", summary={"max_position_embeddings": 512})
    spec = Evaluation(source=source, max_tokens=max_tokens, window=window, speed=None)
    data = eval_data.fn(model, spec, ctx=StepContext(store_root=store))
    return data, evaluate.fn(model, data, ctx=StepContext(store_root=store), spec=spec)


@pytest.fixture(scope="module")
def blank_line_text(demo_assets, tmp_path_factory) -> Path:
    """A second held-out text: the demo's calibration text (paragraphs separated by blank lines) as a .txt."""
    text = demo_assets.calib_path.read_text(encoding="utf-8")[:60_000]
    assert text.count("\n\n") > 100
    path = tmp_path_factory.mktemp("blank") / "paragraphs.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("which", ["demo_eval", "blank_lines"])
def test_perplexity_matches_the_gptq_repository_protocol(demo_assets, blank_line_text, tmp_path, which):
    from transformers import AutoTokenizer

    path = demo_assets.eval_path if which == "demo_eval" else blank_line_text
    window, max_tokens = 256, 16384  # the demo profile's evaluation
    data, result = quantmill_baseline(demo_assets.model_dir, {"path": str(path)}, str(tmp_path), window, max_tokens)
    tok = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    ids = tok(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0][:max_tokens]  # the file as it is
    expected = gptq_repo_perplexity(demo_assets.model_dir, ids, window)
    assert abs(result.metrics["perplexity"] / expected - 1) < 1e-3, (result.metrics["perplexity"], expected)
    assert result.metrics["eval_tokens"] == (ids.numel() // window) * (window - 1) == data.tokens
    assert data.preparation == "one document read as is, tokenized once" and result.data == data.description()
    assert result.data["window"] == result.data["stride"] == window


def test_jsonl_joins_rows_with_blank_lines_or_packs_them_with_eos(demo_assets, tmp_path):
    from transformers import AutoTokenizer

    docs = [d for d in demo_assets.eval_path.read_text(encoding="utf-8").split("\n\n")][:400]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    window, max_tokens = 128, 8192

    packed = []  # reference for join: eos: every non-empty document on its own, each followed by EOS
    for d in docs:
        if d.strip():
            packed += tok(d.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    packed = torch.tensor(packed[:max_tokens])
    eos_data, eos_result = quantmill_baseline(demo_assets.model_dir, {"path": str(path), "join": "eos"},
                                              str(tmp_path / "eos"), window, max_tokens)
    expected = gptq_repo_perplexity(demo_assets.model_dir, packed, window)
    assert abs(eos_result.metrics["perplexity"] / expected - 1) < 1e-3, (eos_result.metrics["perplexity"], expected)
    assert eos_data.preparation == "rows (text) tokenized one by one, each followed by EOS"

    joined_data, _ = quantmill_baseline(demo_assets.model_dir, {"path": str(path)}, str(tmp_path / "nn"), window,
                                        max_tokens)
    joined = tok("\n\n".join(docs), return_tensors="pt").input_ids[0][:max_tokens]  # the papers' wikitext-2 join
    windows, _ = load_windows(joined_data.path)
    assert torch.equal(windows.flatten(), joined[: windows.numel()])
    assert joined_data.digest != eos_data.digest and joined_data.store_key != eos_data.store_key
    assert int((windows == tok.eos_token_id).sum()) == 0 < int((load_windows(eos_data.path)[0] == tok.eos_token_id).sum())


def test_baseline_metrics_speed_and_memory(setup):
    m = setup["baseline"].metrics
    assert m["ttft_ms"] > 0 and 0 < m["latency_ms_p50"] <= m["latency_ms_p95"] <= m["latency_ms_p99"]
    assert m["tokens_per_s_b1"] > 0 and m["tokens_per_s_b8"] > 0
    assert m["peak_rss_bytes"] > 0 and m["size_bytes"] > 1e6
    assert "kl_mean" not in m
    art = Path(setup["store"]) / "objects" / setup["baseline"].store_key
    from safetensors.torch import load_file

    ref = load_file(str(art / "reference.safetensors"))
    assert ref["topk_ids"].shape == (m["eval_tokens"], 128) and ref["topk_logprobs"].dtype == torch.float32


def test_baseline_against_itself_has_zero_kl_and_full_agreement(setup):
    spec = setup["spec"].model_copy(update={"speed": None})
    same = evaluate.fn(setup["model"], setup["data"], ctx=StepContext(store_root=setup["store"]), baseline=setup["baseline"], spec=spec)
    assert same.metrics["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert same.metrics["top1_agreement"] == 1.0
    assert same.metrics["perplexity"] == pytest.approx(setup["baseline"].metrics["perplexity"], rel=1e-9)


def noisy_checkpoint(model_dir: Path, out: Path, scale: float) -> Path:
    """The demo model with Gaussian noise (`scale` x each weight's std) on every linear layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn_like(module.weight) * module.weight.std() * scale)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def checkpoint_ref(path: Path, name: str) -> CheckpointRef:
    """A CheckpointRef for a hand-made checkpoint (method rtn int8: 2 % default perplexity gate)."""
    return CheckpointRef(
        name=name, method="rtn", config=build_config("rtn", {"bits": 8, "group_size": 64}).to_dict(), path=str(path),
        sha256=name, size_bytes=sum(p.stat().st_size for p in path.iterdir()), base_sha256="demo", calib_digest=None,
        store_key=name,
    )


@pytest.fixture(scope="module")
def variants(setup, tmp_path_factory):
    """A slightly and a heavily damaged variant, evaluated against the baseline and judged."""
    spec = setup["spec"].model_copy(update={"speed": None, "gates": Gates(max_kl=0.05, min_top1_agreement=0.9)})
    out = {}
    for name, scale in (("light-noise", 0.002), ("heavy-noise", 1.0)):
        path = noisy_checkpoint(Path(setup["model"].path), tmp_path_factory.mktemp(name), scale)
        ckpt = checkpoint_ref(path, name)
        result = evaluate.fn(ckpt, setup["data"], ctx=StepContext(store_root=setup["store"]), baseline=setup["baseline"], spec=spec)
        out[name] = (ckpt, result, judge(ckpt, result, baseline=setup["baseline"], spec=spec))
    return out


def test_damaged_variant_fails_its_gates_with_reasons(variants):
    ckpt, result, verdict = variants["heavy-noise"]
    assert not verdict.passed
    text = "; ".join(verdict.reasons)
    assert "perplexity" in text and "> +2.0%" in text and "KL" in text and "top-1 agreement" in text
    assert result.metrics["kl_mean"] > 0.05 and result.metrics["top1_agreement"] < 0.9
    assert verdict.limits["max_ppl_increase_pct"] == 2.0


def test_lightly_perturbed_variant_passes(variants):
    _, result, verdict = variants["light-noise"]
    assert verdict.passed, verdict.reasons
    assert 0 < result.metrics["kl_mean"] < 0.01 and result.metrics["top1_agreement"] > 0.95


def test_topk_kl_is_exact_with_full_vocab_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    p, q = torch.randn(64, 50).log_softmax(-1), torch.randn(64, 50).log_softmax(-1)
    exact = (p.exp() * (p - q)).sum(-1)
    values, ids = p.topk(50)
    assert torch.allclose(topk_kl(values, ids, q), exact, atol=1e-5)
    values, ids = p.topk(5)
    approx = topk_kl(values, ids, q)
    assert (approx <= exact + 1e-5).all() and approx.mean() > 0.3 * exact.mean()


def test_gate_precedence_and_unmeasured_bounds(setup, variants):
    ckpt, result, _ = variants["light-noise"]
    spec = Evaluation(
        source={"path": setup["spec"].source.path}, gates={"max_ppl_increase_pct": 10, "max_latency_ms_p50": 5},
        method_gates={"rtn": {"max_ppl_increase_pct": 7}, "light-noise": {"max_kl": 0.5}},
    )
    limits = limits_for(ckpt, spec)
    assert limits.max_ppl_increase_pct == 7 and limits.max_kl == 0.5 and limits.max_latency_ms_p50 == 5
    assert limits_for(ckpt.model_copy(update={"name": "x", "method": "rtn"}), Evaluation(source=spec.source)) \
        .max_ppl_increase_pct == 2.0
    verdict = judge(ckpt, result, baseline=setup["baseline"], spec=spec)
    assert not verdict.passed and verdict.reasons == [
        "latency p50 not measured (enable evaluation.speed) but max_latency_ms_p50 is set"
    ]


def test_variant_cache_key_follows_baseline_not_gates(setup):
    base = setup["baseline"]
    other = base.model_copy(update={"metrics": {**base.metrics, "perplexity": 1.0}})
    spec = setup["spec"]
    inputs = {"target": setup["model"], "data": setup["data"], "ctx": StepContext(store_root="x"), "spec": spec}
    key = EVALUATE_CACHE.key_for({**inputs, "baseline": base})
    assert key != EVALUATE_CACHE.key_for({**inputs, "baseline": other})
    gated = spec.model_copy(update={"gates": Gates(max_kl=0.1)})
    assert key == EVALUATE_CACHE.key_for({**inputs, "baseline": base, "spec": gated})
    assert key != EVALUATE_CACHE.key_for({**inputs, "baseline": base, "spec": spec.model_copy(update={"kl_topk": 8})})


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_multiple_choice_accuracy_prefers_real_text(demo_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = " ".join(demo_assets.eval_path.read_text().split())
    rows = []
    for i in range(12):
        chunk = text[3000 * i : 3000 * i + 160].split()
        question, real = " ".join(chunk[:12]), " ".join(chunk[12:18])
        rows.append({"question": question, "choices": f"zq xv qqz jjk wpf vvb|{real}", "answer": 1})
    spec = Evaluation.Accuracy(path=str(write_csv(tmp_path / "mc.csv", rows)))
    model = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    scores = choice_accuracy(model, tokenizer, spec, "cpu")
    assert scores["accuracy_examples"] == 12 and scores["accuracy"] >= 0.9
    labelled = write_csv(tmp_path / "labels.csv", [{"question": r["question"], "answer": "yes"} for r in rows])
    scores = choice_accuracy(model, tokenizer, Evaluation.Accuracy(path=str(labelled), labels=["yes", "no"]), "cpu")
    assert 0.0 <= scores["accuracy"] <= 1.0
    bad = write_csv(tmp_path / "bad.csv", [{"question": "q", "answer": "maybe"}])
    with pytest.raises(QuantmillError, match="evaluation.accuracy.answer_field"):
        choice_accuracy(model, tokenizer, Evaluation.Accuracy(path=str(bad), labels=["yes", "no"]), "cpu")


def test_model_card_says_what_the_perplexity_is_over(setup, variants):
    from quantmill import modelcard

    ckpt, result, _ = variants["light-noise"]
    assert result.data == setup["data"].description() and result.data["preparation"]
    lineage = Lineage(base=setup["model"], model=setup["model"], calib=None, data=setup["data"], baseline=setup["baseline"])
    card = modelcard.render("m", ckpt, result, lineage=lineage)
    assert f"Perplexity: token-level exp(mean NLL) over {setup['data'].windows} windows of 256 tokens" in card
    assert "text: one document read as is, tokenized once." in card


def test_lm_eval_is_skipped_with_a_message_when_unavailable(caplog):
    with caplog.at_level(logging.WARNING, logger="quantmill.evaluate"):
        assert lm_eval_scores(None, None, Evaluation.LmEval(tasks=["hellaswag"]), 1) == {}
    assert "lm_eval tasks ['hellaswag'] skipped" in caplog.text


def test_profile_validation_of_evaluation_fields(demo_assets):
    base = {
        "model": {"path": "/m"}, "calibration": {"source": {"path": "/c.txt"}}, "recipes": [{"method": "rtn"}],
        "registry": {"model_name": "m"},
    }
    src = {"path": str(demo_assets.eval_path)}
    ok = parse_profile({**base, "evaluation": {"source": src, "speed": {"batch_sizes": [8, 1, 8]}}})
    assert ok.evaluation.speed.batch_sizes == [1, 8]
    assert parse_profile({**base, "evaluation": {"source": src, "speed": None}}).evaluation.speed is None
    with pytest.raises(ProfileError, match=r"evaluation\.speed\.bogus: unknown key"):
        parse_profile({**base, "evaluation": {"source": src, "speed": {"bogus": 1}}})
    with pytest.raises(ProfileError, match="stride 300 exceeds window 256"):
        parse_profile({**base, "evaluation": {"source": src, "window": 256, "stride": 300}})
    with pytest.raises(ProfileError, match=r"evaluation\.accuracy\.path: .*use a \.csv"):
        parse_profile({**base, "evaluation": {"source": src, "accuracy": {"path": "/x.txt"}}})


def test_report_is_published_to_mlflow_and_reprinted_by_the_cli(setup, variants, tmp_path, capsys):
    from quantmill import tracking
    from quantmill.flows.pipeline import summary_row
    from quantmill.report import REPORT_JSON, markdown
    from quantmill.tasks.report import publish_report

    rows = [summary_row(Variant(ckpt=ckpt, result=res, verdict=verdict), setup["baseline"])
            for ckpt, res, verdict in variants.values()]
    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id("eval-report-test")).info.run_id
    report = publish_report.fn(rows, baseline=setup["baseline"].metrics, model_name="eval-report-test",
                               evaluation=setup["data"].description(),
                               ctx=StepContext(store_root=setup["store"], device="cpu", run_id=run_id))
    windows = setup["data"].windows
    said = (f"perplexity: token-level exp(mean NLL) over {windows} windows of 256 tokens, stride 256 "
            f"({windows * 255} scored tokens) of {setup['data'].source}; text: one document read as is, tokenized once")
    assert said in markdown(report)

    names = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"report/comparison.json", "report/comparison.md", "report/ppl_vs_size.png"} <= names
    saved = json.loads(Path(client.download_artifacts(run_id, REPORT_JSON, str(tmp_path))).read_text())
    assert saved == report and [r["variant"] for r in saved["rows"]] == ["baseline", "light-noise", "heavy-noise"]
    png = Path(client.download_artifacts(run_id, "report/ppl_vs_size.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get_run(run_id).data.tags["quantmill.gate.heavy-noise"].startswith("FAIL: perplexity")

    env = {**os.environ, "QUANTMILL_HOME": os.environ["QUANTMILL_HOME"]}
    proc = fresh.run_cli("report", run_id, cwd=REPO, env=env, timeout=300)  # a new process (tests/fresh.py)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in saved["rows"]:
        assert row["variant"] in proc.stdout and f"{row['perplexity']:.3f}" in proc.stdout
    assert "FAIL heavy-noise: perplexity" in proc.stdout and "KL" in proc.stdout and "tok/s b8" in proc.stdout

    from quantmill.flows.cli import main

    capsys.readouterr()
    assert main(["report", run_id, "--format", "markdown"]) == 0
    assert capsys.readouterr().out == markdown(report)
    assert main(["report", "no-such-run"]) == 2 and "RUN_ID" in capsys.readouterr().err

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        key = ArtifactFilterKey(any_=["quantmill-eval-report-test"])
        found = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=key))
    assert found and found[0].type == "table"
