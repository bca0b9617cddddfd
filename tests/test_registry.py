"""Registry contract: idempotent registration, crash-safe retries, champion and candidate aliases."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import mlflow
import pytest

from quantmill import tracking
from quantmill.context import StepContext
from quantmill.hashing import hash_tree
from quantmill.mlmodel import serving_digest
from quantmill.profile import Registry
from quantmill.refs import CheckpointRef, EvalDataRef, EvalRef, Lineage, ModelRef, Verdict
from quantmill.tasks.register import SHA_TAG, promote, register
from tests.conftest import demo_llama

ALIASES = {"int8": "bnb-int8", "nf4": "bnb-nf4"}  # short variant names -> method


def fake_checkpoint(root: Path, name: str, payload: str, size_pad: int = 0, template: Path | None = None) -> CheckpointRef:
    """A small checkpoint folder (a real config and tokenizer, made-up weights) and its reference."""
    template = template or demo_llama().model_dir  # the demo Llama's config and tokenizer (built on a fresh clone)
    d = root / name
    d.mkdir(parents=True)
    config = json.loads((template / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "_name_or_path": str(d)}))  # where it was written
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(template / f, d / f)
    (d / "model.safetensors").write_text(payload + "x" * size_pad)
    return checkpoint_ref(d, name)


def checkpoint_ref(d: Path, name: str) -> CheckpointRef:
    size = sum(p.stat().st_size for p in d.iterdir())
    return CheckpointRef(
        name=name, method=ALIASES.get(name.split("-")[0], name.split("-")[0]), config={"type": "rtn", "version": 1, "bits": 4, "group_size": 32},
        path=str(d), sha256=hash_tree(d), size_bytes=size, base_sha256="b" * 64, calib_digest="c" * 64,
        store_key=f"quantize-{name}",
    )


def evals(ppl: float) -> EvalRef:
    return EvalRef(name="v", method="rtn", path="/x", metrics={"perplexity": ppl, "size_bytes": 100.0},
                   eval_digest="e" * 64, store_key="k")


BASE = ModelRef(path="/base", sha256="b" * 64, source="org/base", revision="abc")
BASELINE = EvalRef(name="baseline", method="none", path="/base", metrics={"perplexity": 10.0, "size_bytes": 1000.0},
                   eval_digest="e" * 64, store_key="kb")
DATA = EvalDataRef(path="/eval", digest="e" * 64, window=8, tokens=70, source="eval.txt", store_key="kd")
LINEAGE = Lineage(base=BASE, model=BASE, calib=None, data=DATA, baseline=BASELINE)
PASS = Verdict(name="v", passed=True)


@pytest.fixture()
def registry() -> Registry:
    return Registry(model_name=f"reg-{uuid.uuid4().hex[:8]}")


@pytest.fixture()
def run_id(registry) -> str:
    client = tracking.client()
    return client.create_run(tracking.experiment_id(registry.model_name)).info.run_id


def do_register(ckpt: CheckpointRef, ppl: float, registry: Registry, run_id: str, passed: bool = True):
    verdict = Verdict(name=ckpt.name, passed=passed, reasons=[] if passed else ["perplexity too high"])
    return register.fn(ckpt, evals(ppl), verdict, lineage=LINEAGE, registry=registry,
                       ctx=StepContext(store_root="unused: register reads no artifact", run_id=run_id))


def test_same_checkpoint_registers_once_with_files_and_card(tmp_path, registry, run_id):
    ckpt = fake_checkpoint(tmp_path, "rtn-a", "weights")
    v1 = do_register(ckpt, 10.1, registry, run_id)
    v2 = do_register(ckpt, 10.1, registry, run_id)
    assert v1 == v2 == "1"
    client = tracking.client()
    [mv] = client.search_model_versions(f"name='{registry.model_name}'")
    assert mv.tags[SHA_TAG] == serving_digest(Path(ckpt.path)) and mv.tags["base_model"] == "org/base"
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{registry.model_name}/1", dst_path=str(tmp_path / "dl")))
    names = {p.name for p in files.iterdir()}
    assert {"README.md", "MLmodel", "config.json", "model.safetensors", "tokenizer.json", "quantmill.json"} <= names
    assert (files / "model.safetensors").read_bytes() == Path(ckpt.path, "model.safetensors").read_bytes()
    assert json.loads((files / "config.json").read_text())["_name_or_path"] == "org/base"  # no machine path
    card = (files / "README.md").read_text()
    assert "org/base" in card and "from_pretrained" in card and "vllm" in card.lower()


def test_failing_variant_is_not_registered(tmp_path, registry, run_id):
    assert do_register(fake_checkpoint(tmp_path, "rtn-bad", "w"), 99.0, registry, run_id, passed=False) is None
    assert tracking.client().search_model_versions(f"name='{registry.model_name}'") == []


def test_failure_inside_register_then_rerun_leaves_one_complete_version(tmp_path, registry, run_id, monkeypatch):
    ckpt = fake_checkpoint(tmp_path, "rtn-crash", "weights")
    real = mlflow.MlflowClient.create_model_version

    def crash(self, *args, **kwargs):
        raise RuntimeError("injected failure after the artifacts were uploaded")

    monkeypatch.setattr(mlflow.MlflowClient, "create_model_version", crash)
    with pytest.raises(RuntimeError, match="injected"):
        do_register(ckpt, 10.1, registry, run_id)
    monkeypatch.setattr(mlflow.MlflowClient, "create_model_version", real)
    assert do_register(ckpt, 10.1, registry, run_id) == "1"
    assert do_register(ckpt, 10.1, registry, run_id) == "1"
    versions = tracking.client().search_model_versions(f"name='{registry.model_name}'")
    assert len(versions) == 1
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{registry.model_name}/1", dst_path=str(tmp_path / "dl")))
    assert serving_digest(files) == versions[0].tags[SHA_TAG] == serving_digest(Path(ckpt.path))


@pytest.mark.parametrize("objective, winner", [("smallest_size", "nf4-small"), ("lowest_perplexity", "int8-best")])
def test_champion_rule(tmp_path, registry, run_id, objective, winner):
    reg = registry.model_copy(update={"champion_objective": objective})
    do_register(fake_checkpoint(tmp_path, "int8-best", "a", size_pad=4000), 10.05, reg, run_id)
    do_register(fake_checkpoint(tmp_path, "nf4-small", "b", size_pad=100), 10.40, reg, run_id)
    do_register(fake_checkpoint(tmp_path, "rtn-mid", "c", size_pad=2000), 10.20, reg, run_id)
    do_register(fake_checkpoint(tmp_path, "rtn-tiny-bad", "d"), 50.0, reg, run_id, passed=False)
    aliases = promote.fn(reg)
    client = tracking.client()
    champ = client.get_model_version_by_alias(reg.model_name, "champion")
    assert champ.tags["variant"] == winner and aliases["champion"] == str(champ.version)
    assert client.get_model_version_by_alias(reg.model_name, "candidate-rtn").tags["variant"] == "rtn-mid"
    assert client.get_model_version_by_alias(reg.model_name, "candidate-bnb-int8").tags["variant"] == "int8-best"

    client.delete_model_version(reg.model_name, champ.version)  # champion never left dangling
    aliases = promote.fn(reg)
    new = client.get_model_version_by_alias(reg.model_name, "champion")
    assert new.version != champ.version and new.tags["gate"] == "passed"
