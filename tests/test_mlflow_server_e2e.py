"""Against a real `mlflow server`: run a profile, then load models:/NAME@champion as a consumer would."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests import fresh
from tests.conftest import REPO, demo_profile, free_port, python_script, write_profile
from tests.servers import served_env

METHODS = ("rtn", "gptq", "awq", "bnb-int8", "bnb-nf4", "bnb-fp4", "dynamic-int8", "fp8")
RECIPES = [{"method": "rtn", "bits": 4, "group_size": 64}, {"method": "gptq", "bits": 4, "group_size": 128},
           {"method": "awq", "bits": 4, "group_size": 128}, {"method": "bnb-int8"}, {"method": "bnb-nf4"},
           {"method": "bnb-fp4"}, {"method": "dynamic-int8"}, {"method": "fp8"}]
NAME = "served-demo"
# Plain MLflow in a fresh process, nothing of quantmill imported: every method as pyfunc and, where its MLmodel
# has the flavor, through mlflow.transformers.
FLAVORS = """
import json, sys, mlflow
out = {}
for method in sys.argv[2].split(","):
    uri, r = f"models:/{sys.argv[1]}@candidate-{method}", {}
    try:
        r["pyfunc"] = mlflow.pyfunc.load_model(uri).predict(["def main"], params={"max_new_tokens": 8})
    except Exception as exc:
        r["pyfunc_error"] = repr(exc)[-2000:]
    info = mlflow.models.get_model_info(uri)
    r["flavors"] = sorted(info.flavors)
    r["signature"] = info.signature.to_dict() if info.signature else None
    if "transformers" in info.flavors:
        try:
            pipe = mlflow.transformers.load_model(uri)
            r["transformers"] = pipe("The for statement", max_new_tokens=8, do_sample=False)[0]["generated_text"]
        except Exception as exc:
            r["transformers_error"] = repr(exc)[-2000:]
    out[method] = r
print("RESULT:" + json.dumps(out))
"""
CONSUMER = """
import json, sys, mlflow
from transformers import AutoModelForCausalLM, AutoTokenizer
path = mlflow.artifacts.download_artifacts("models:/{name}@champion", dst_path=sys.argv[1])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok("The for statement", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=12, do_sample=False)
print("RESULT:" + json.dumps({{"completion": tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True),
                              "class": type(model).__name__}}))
"""


def start_mlflow_server(root: Path) -> tuple[str, subprocess.Popen]:
    """A real MLflow tracking server (SQLite backend, local artifacts) on loopback."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "server-artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
        # MLflow's job runner (huey consumers: ≈ 24 s of CPU over this module, measured 2026-12-02) runs server-side
        # jobs that nothing here asks for
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                return uri, proc
        except requests.RequestException:
            time.sleep(1)
    proc.kill()
    pytest.fail("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])


def server_profile(path: Path, demo_assets, adapter: Path, store: Path, recipes: list[dict]) -> Path:
    """The demo model with `adapter`, every recipe registered (no gate can fail), artifacts in `store`."""
    return write_profile(path, demo_profile(
        demo_assets, "server-e2e", recipes, adapter={"path": str(adapter)}, registry={"model_name": NAME},
        evaluation={"gates": {"max_ppl_increase_pct": 1000}}, storage={"root": str(store)}))


def run_pipeline(root: Path, profile: Path, uri: str) -> subprocess.CompletedProcess:
    env = served_env(root / "home", MLFLOW_TRACKING_URI=uri)
    run = fresh.run_cli("run", str(profile), cwd=REPO, env=env, timeout=2400)  # a new process (tests/fresh.py)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run


def script_dirs() -> list[str]:
    """Where this environment's console scripts are (the interpreter's, and uvicorn's in a layered venv)."""
    from importlib.metadata import distribution

    dirs = [str(Path(sys.executable).parent)]
    for f in distribution("uvicorn").files or []:
        if f.name == "uvicorn" and f.parent.name == "bin":
            dirs.append(str(Path(distribution("uvicorn").locate_file(f)).resolve().parent))
    return dirs


def consumer_env(root: Path, uri: str) -> dict[str, str]:
    """A consumer's environment: the tracking URI, no quantmill state, offline hub."""
    path = os.pathsep.join([*script_dirs(), os.environ["PATH"]])  # as with the virtualenv activated
    return {"PATH": path, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "HOME": str(root)}


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_assets, warm_store):
    """One pipeline run of every method against a real `mlflow server`, shared by this module's tests (its store
    seeded with the shared steps: the merge, calibration and baseline are not what this module tests)."""
    root = tmp_path_factory.mktemp("served")
    uri, proc = start_mlflow_server(root)
    profile = server_profile(root / "profile.yaml", demo_assets, Path(demo_assets.adapter_dir),
                            warm_store(root / "store"), RECIPES)
    run = run_pipeline(root, profile, uri)
    import mlflow

    try:
        yield {"root": root, "uri": uri, "run": run,
               "client": mlflow.MlflowClient(uri, registry_uri=uri)}  # this process may have set another URI
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def consumed(served):
    """What plain MLflow in a fresh process gets from every method's candidate version."""
    out = subprocess.run(python_script(FLAVORS, NAME, ",".join(METHODS)), cwd=served["root"],
                         env=consumer_env(served["root"], served["uri"]), capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.split("RESULT:")[1].splitlines()[0])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_loads_with_plain_mlflow(consumed, method):
    from quantmill.mlmodel import TRANSFORMERS_FLAVOR_REJECTS

    got = consumed[method]
    assert "pyfunc_error" not in got, got.get("pyfunc_error")
    assert len(got["pyfunc"]) == 1 and isinstance(got["pyfunc"][0], str) and got["pyfunc"][0]
    assert json.loads(got["signature"]["inputs"]) == [{"type": "string", "required": True}]
    if method in TRANSFORMERS_FLAVOR_REJECTS:
        assert got["flavors"] == ["python_function"]
    else:
        assert got["flavors"] == ["python_function", "transformers"]
        assert "transformers_error" not in got, got.get("transformers_error")
        assert got["transformers"].startswith("The for statement") and len(got["transformers"]) > len("The for statement")


@pytest.mark.slow
def test_consumer_loads_champion_from_real_server(served):
    root, uri, client = served["root"], served["uri"], served["client"]
    assert not (root / "home" / "mlflow.db").exists()  # everything went to the server
    consumer = subprocess.run(python_script(CONSUMER.format(name=NAME), str(root / "pulled")),
                              env=consumer_env(root, uri), capture_output=True, text=True, timeout=600, cwd=root)
    assert consumer.returncode == 0, consumer.stderr[-4000:]
    result = json.loads(consumer.stdout.split("RESULT:")[1].splitlines()[0])
    assert result["completion"].strip() and result["class"] == "LlamaForCausalLM", consumer.stdout

    versions = client.search_model_versions(f"name='{NAME}'")
    assert sorted(mv.tags["method"] for mv in versions) == sorted(METHODS)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert int(champion.tags["size_bytes"]) == min(int(mv.tags["size_bytes"]) for mv in versions)
    assert champion.tags["gate"] == "passed" and len(champion.tags["quantmill.checkpoint_sha256"]) == 64
    card = next(Path(root / "pulled").rglob("README.md")).read_text()
    assert champion.tags["method"] in card and "## Evaluation" in card
    assert models_dir() not in card  # no machine path in a published file
    variant_run = client.get_run(champion.run_id)
    parent = client.get_run(variant_run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["quantmill.base_sha256"] and parent.data.params["profile.registry.model_name"] == NAME
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {r.data.tags["mlflow.runName"] for r in children}
    merge_run = next(r for r in children if r.data.tags["mlflow.runName"] == "merge")
    assert merge_run.data.params["adapter_training.method"] == "lora"  # how the adapter was trained, detected
    assert merge_run.data.params["merge.qlora_merge"] == "full_precision" and merge_run.data.params["merge.lora_modules"]
    assert {"download", "merge", "calibrate", "evaluate/baseline", "quantize/bnb-nf4", "evaluate/bnb-nf4"} <= names


def models_dir() -> str:
    """The local folder the base model was read from: never in a published file."""
    return str(Path(os.environ.get("QUANTMILL_TEST_MODELS") or REPO / ".quantmill" / "test-models"))


@pytest.mark.slow
def test_versions_are_linked_comparable_and_clean(served):
    root, client = served["root"], served["client"]
    versions = client.search_model_versions(f"name='{NAME}'")
    parents = set()
    for mv in versions:
        run = client.get_run(mv.run_id)  # the variant's child run
        assert run.data.tags["quantmill.variant"] == mv.tags["variant"]
        parents.add(run.data.tags["mlflow.parentRunId"])
        model_id = mv.model_id or mv.source.removeprefix("models:/")
        logged = client.get_logged_model(model_id)
        assert logged.source_run_id == mv.run_id
        metrics = {m.key: m.value for m in logged.metrics}
        assert metrics == run.data.metrics and metrics["perplexity"] == pytest.approx(float(mv.tags["perplexity"]), rel=1e-5)
        assert {"ppl_delta_pct", "kl_mean", "top1_agreement", "size_bytes", "compression", "peak_rss_bytes"} <= set(metrics)
        assert json.loads(logged.params["method_config"]) == json.loads(mv.tags["method_config"])
        for value in mv.tags.values():
            if value.startswith(("{", "[")):
                json.loads(value)
    [parent] = parents
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}' and tags.`quantmill.variant` != ''")
    assert len(children) == len(METHODS)
    assert len({tuple(sorted(r.data.metrics)) for r in children}) == 1  # one set of names: comparable
    assert not any("." in k for k in client.get_run(parent).data.metrics)  # no `variant.metric` keys on the parent
    stored = [p for p in (root / "server-artifacts").rglob("*") if p.is_file()]
    published = [p for p in stored if "/models/" in p.as_posix()]
    assert sum(p.name == "model.safetensors" for p in published) == len(METHODS)  # the upload: one copy each
    for p in published:
        assert stat.S_IMODE(p.stat().st_mode) & 0o444 == 0o444, p
        data = p.read_bytes()
        assert str(root).encode() not in data and models_dir().encode() not in data, p


@pytest.mark.slow
def test_same_weights_from_another_store_and_adapter_location_is_one_version(served, demo_assets):
    root, client = served["root"], served["client"]
    before = {mv.tags["variant"]: mv.version for mv in client.search_model_versions(f"name='{NAME}'")}
    adapter = shutil.copytree(demo_assets.adapter_dir, root / "moved" / "adapter")
    profile = server_profile(root / "moved.yaml", demo_assets, adapter, root / "store2", [RECIPES[0], RECIPES[3]])
    run_pipeline(root, profile, served["uri"])
    after = {mv.tags["variant"]: mv.version for mv in client.search_model_versions(f"name='{NAME}'")}
    assert after == before


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(served):
    port = free_port()
    log = open(served["root"] / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=consumer_env(served["root"], served["uri"]), cwd=served["root"], stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the server and the workers it starts
    )
    try:
        deadline, answer = time.time() + 300, None
        while time.time() < deadline and proc.poll() is None:
            try:
                answer = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": ["def main", "The for"]},
                                       timeout=60)
                break
            except requests.RequestException:
                time.sleep(2)
        assert answer is not None and answer.ok, (served["root"] / "serve.log").read_text()[-3000:]
        predictions = answer.json()["predictions"]
        assert len(predictions) == 2 and all(isinstance(p, str) and p for p in predictions)
    finally:
        with contextlib.suppress(ProcessLookupError):  # by PID: the group this test started (server, workers)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
