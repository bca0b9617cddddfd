"""A registered version is an MLflow model: loaded with plain MLflow (pyfunc, transformers), linked, stored once."""

from __future__ import annotations

import json
import shutil
import stat
import uuid
from pathlib import Path

import mlflow
import pytest

from quantmill import state, tracking
from quantmill.context import StepContext
from quantmill.mlmodel import local_path, serving_digest
from quantmill.profile import Registry
from quantmill.refs import CheckpointRef, EvalDataRef, EvalRef, Lineage, ModelRef, Verdict
from quantmill.tasks.register import LAYOUT_TAG, SHA_TAG, promote, register
from tests.conftest import demo_llama
from tests.test_registry import checkpoint_ref

METRICS = {"perplexity": 10.2, "nll": 2.3, "kl_mean": 0.01, "top1_agreement": 0.97, "latency_ms_p50": 3.0,
           "latency_ms_p95": 4.0, "latency_ms_p99": 5.0, "tokens_per_s_b1": 100.0, "peak_rss_bytes": 1e9,
           "size_bytes": 1000.0}
BASELINE = EvalRef(name="baseline", method="none", path="/base", metrics={"perplexity": 10.0, "size_bytes": 4000.0},
                   eval_digest="e" * 64, store_key="kb")
DATA = EvalDataRef(path="/eval", digest="e" * 64, window=8, tokens=70, source="eval.txt", store_key="kd")


def real_checkpoint(root: Path, name: str = "rtn-real") -> CheckpointRef:
    """The cached demo Llama's files as a variant's checkpoint, written with the store path as `_name_or_path`."""
    src = demo_llama().model_dir
    d = root / "store" / name
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "_name_or_path": str(d)}))
    (d / "model.safetensors").chmod(0o600)  # as the quantize step may leave it
    return checkpoint_ref(d, name).model_copy(update={"calib_digest": None})  # like rtn: no calibration


def do_register(ckpt: CheckpointRef, reg: Registry, run_id: str, source: str = "org/base") -> str:
    base = ModelRef(path="/base", sha256="b" * 64, source=source, revision="abc")
    merged = ModelRef(path=str(state.home() / "merged"), sha256="m" * 64, source=source, adapter_sha256="a" * 64,
                      merged=True)
    result = EvalRef(name=ckpt.name, method=ckpt.method, path=ckpt.path, metrics=METRICS, eval_digest="e" * 64,
                     store_key="k")
    lineage = Lineage(base=base, model=merged, calib=None, data=DATA, baseline=BASELINE)
    return register.fn(ckpt, result, Verdict(name=ckpt.name, passed=True), lineage=lineage, registry=reg,
                       ctx=StepContext(store_root=str(state.home() / "store"), run_id=run_id))


@pytest.fixture()
def registered(tmp_path):
    """One real checkpoint registered under a fresh name, `champion` set."""
    reg = Registry(model_name=f"mm-{uuid.uuid4().hex[:8]}")
    client = tracking.client()
    parent = client.create_run(tracking.experiment_id(reg.model_name)).info.run_id
    ckpt = real_checkpoint(tmp_path)
    version = do_register(ckpt, reg, parent)
    promote.fn(reg)
    return {"reg": reg, "ckpt": ckpt, "parent": parent, "version": version, "client": client}


def test_version_loads_as_pyfunc_and_transformers_with_signature(registered):
    name = registered["reg"].model_name
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(["def main", "The for statement"], params={"max_new_tokens": 6})
    assert len(out) == 2 and all(isinstance(s, str) and s for s in out)
    import pandas as pd

    assert model.predict(pd.DataFrame({"prompt": ["The for statement"]}), params={"max_new_tokens": 6}) == out[1:]
    pipe = mlflow.transformers.load_model(f"models:/{name}@champion")
    generated = pipe("The for statement", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert generated == "The for statement" + out[1]
    info = mlflow.models.get_model_info(f"models:/{name}@champion")
    assert info.signature.inputs.to_dict() == [{"type": "string", "required": True}]
    assert info.signature.outputs.to_dict() == [{"type": "string", "required": True}]
    assert {"python_function", "transformers"} <= set(info.flavors)
    assert info.flavors["python_function"]["loader_module"] == "quantmill_pyfunc"


def test_version_links_run_logged_model_metrics_and_clean_tags(registered):
    client, name = registered["client"], registered["reg"].model_name
    mv = client.get_model_version(name, registered["version"])
    child = client.get_run(mv.run_id)
    assert child.data.tags["mlflow.parentRunId"] == registered["parent"]  # the variant's child run
    assert child.data.tags["quantmill.variant"] == "rtn-real" and child.data.tags["model_version"] == str(mv.version)
    model_id = mv.model_id or mv.source.removeprefix("models:/")  # OSS registries return model_id=None
    assert mv.source == f"models:/{model_id}"
    logged = client.get_logged_model(model_id)
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": name, "version": str(mv.version)}]
    assert logged.source_run_id == mv.run_id and str(logged.status).endswith("READY")
    got = {m.key: m.value for m in logged.metrics}
    assert got["perplexity"] == 10.2 and got["kl_mean"] == 0.01 and got["top1_agreement"] == 0.97
    assert got["ppl_delta_pct"] == pytest.approx(2.0) and got["compression"] == pytest.approx(4000 / registered["ckpt"].size_bytes)
    assert {"latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "tokens_per_s_b1", "peak_rss_bytes", "size_bytes"} <= set(got)
    assert child.data.metrics == got  # the same names on the run, for MLflow's compare view
    assert json.loads(logged.params["method_config"]) == registered["ckpt"].config
    for key, value in mv.tags.items():
        if value.startswith(("[", "{")):
            json.loads(value)  # JSON, never a Python repr
        assert "'" not in value, (key, value)
    assert json.loads(mv.tags["method_config"]) == registered["ckpt"].config
    assert mv.tags["base_sha256"] == "b" * 64 and mv.tags["merged_sha256"] == "m" * 64
    assert mv.tags["adapter_sha256"] == "a" * 64 and mv.tags[LAYOUT_TAG] == "2"
    assert not mv.description.startswith("---") and mv.description.startswith(f"# {name}: rtn-real")
    assert "adapter_sha256" in mv.description and "Calibration data: none" in mv.description


def test_registered_files_are_public_and_stored_once(registered, tmp_path):
    client, name, ckpt = registered["client"], registered["reg"].model_name, registered["ckpt"]
    mv = client.get_model_version(name, registered["version"])
    stored = local_path(client.get_logged_model(mv.source.removeprefix("models:/")).artifact_location)
    assert stored is not None and (stored / "MLmodel").is_file()
    files = [p for p in stored.rglob("*") if p.is_file()]
    home = str(state.home())
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o444 == 0o444, p
        assert home.encode() not in p.read_bytes() and str(tmp_path).encode() not in p.read_bytes(), p
    for f in Path(ckpt.path).iterdir():  # one copy on disk: the store's file and MLflow's are one inode
        if f.name != "config.json":
            assert (stored / f.name).stat().st_ino == f.stat().st_ino, f.name
    sidecar = json.loads((stored / "quantmill.json").read_text())
    assert sidecar["base_sha256"] == "b" * 64 and sidecar["merged_sha256"] == "m" * 64
    downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "dl")))
    assert stat.S_IMODE((downloaded / "model.safetensors").stat().st_mode) & 0o444 == 0o444
    assert serving_digest(downloaded) == mv.tags[SHA_TAG]


def test_same_weights_from_other_store_and_adapter_location_are_one_version(registered, tmp_path):
    client, reg = registered["client"], registered["reg"]
    moved = real_checkpoint(tmp_path / "elsewhere")  # same bytes, another storage.root (another _name_or_path)
    assert moved.sha256 != registered["ckpt"].sha256  # the old whole-folder hash saw two checkpoints
    assert do_register(moved, reg, registered["parent"]) == registered["version"]
    assert len(client.search_model_versions(f"name='{reg.model_name}'")) == 1


def test_version_from_previous_layout_is_recognised(tmp_path):
    reg = Registry(model_name=f"old-{uuid.uuid4().hex[:8]}")
    client = tracking.client()
    exp = tracking.experiment_id(reg.model_name)
    parent = client.create_run(exp).info.run_id
    ckpt = real_checkpoint(tmp_path)
    client.create_registered_model(reg.model_name)  # as the previous code did: a bare folder, whole-folder hash
    client.create_model_version(reg.model_name, source=ckpt.path, run_id=parent,
                                tags={SHA_TAG: ckpt.sha256, "gate": "passed", "method": "rtn"})
    assert do_register(ckpt, reg, parent) == "1"
    assert len(client.search_model_versions(f"name='{reg.model_name}'")) == 1


def test_generate_keeps_a_verified_pulled_copy_in_the_state_folder(registered, tmp_path, monkeypatch, capsys):
    from quantmill.flows.cli import main

    name = registered["reg"].model_name
    mv = registered["client"].get_model_version_by_alias(name, "champion")
    monkeypatch.chdir(tmp_path)  # nothing may appear in the current directory
    assert main(["generate", "--model", f"{name}@champion", "--text", "The for", "--max-new-tokens", "4"]) == 0
    cache = state.home() / "pulled" / mv.tags[SHA_TAG]
    assert (cache / "model.safetensors").is_file() and (state.home() / "locks" / f"pull-{mv.tags[SHA_TAG]}.lock").exists()
    assert not (tmp_path / ".quantmill").exists()
    first = capsys.readouterr().out
    with open(cache / "model.safetensors", "r+b") as fh:  # damage the pulled copy: the next use fetches it again
        fh.seek(200)
        fh.write(b"\0" * 64)
    assert main(["generate", "--model", f"{name}@champion", "--text", "The for", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == first and serving_digest(cache) == mv.tags[SHA_TAG]
    assert main(["pull", f"{name}@champion", str(tmp_path / "copy")]) == 0
    assert serving_digest(tmp_path / "copy") == mv.tags[SHA_TAG]


def test_gguf_version_is_a_pyfunc_model_without_the_transformers_flavor(tmp_path):
    from quantmill.methods.registry import QuantizeJob, build_config, get_method

    src, out = demo_llama().model_dir, tmp_path / "store" / "gguf-q8-0"
    out.mkdir(parents=True)
    get_method("gguf").handler(build_config("gguf", {"quant_type": "Q8_0"}), QuantizeJob(src, out, None, "cpu"))
    ckpt = checkpoint_ref(out, "gguf-q8-0").model_copy(update={"method": "gguf", "calib_digest": None,
                                                               "config": {"type": "gguf", "quant_type": "Q8_0"}})
    reg = Registry(model_name=f"gguf-{uuid.uuid4().hex[:8]}")
    parent = tracking.client().create_run(tracking.experiment_id(reg.model_name)).info.run_id
    version = do_register(ckpt, reg, parent)
    info = mlflow.models.get_model_info(f"models:/{reg.model_name}/{version}")
    assert set(info.flavors) == {"python_function"}
    assert "gguf==" in Path(mlflow.artifacts.download_artifacts(
        f"models:/{reg.model_name}/{version}/requirements.txt", dst_path=str(tmp_path / "req"))).read_text()
    [completion] = mlflow.pyfunc.load_model(f"models:/{reg.model_name}/{version}").predict(
        ["The for statement"], params={"max_new_tokens": 4})
    assert isinstance(completion, str) and completion
