"""Against a real `mlflow server`: run a profile, then load models:/NAME@champion as a consumer would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path):
    """A real MLflow tracking server (SQLite backend, local artifacts) on loopback."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
    yield uri
    proc.terminate()
    proc.wait(30)


@pytest.mark.slow
def test_consumer_loads_champion_from_real_server(tmp_path, demo_assets, mlflow_server):
    name = "served-demo"
    profile = {
        "name": "server-e2e",
        "model": {"path": str(demo_assets.model_dir)},
        "adapter": {"path": str(demo_assets.adapter_dir)},
        "calibration": {"source": {"path": str(demo_assets.calib_path)}, "num_samples": 8, "seq_len": 128},
        "recipes": [{"method": "bnb-int8"}, {"method": "bnb-nf4"}],
        "evaluation": {"source": {"path": str(demo_assets.eval_path)}, "max_tokens": 4096, "window": 256,
                       "speed": None},
        "registry": {"model_name": name},
        "storage": {"root": str(tmp_path / "store")},
    }
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    env = subprocess_env(tmp_path / "home", MLFLOW_TRACKING_URI=mlflow_server)
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert not (tmp_path / "home" / "mlflow.db").exists()  # everything went to the server

    consumer_env = {"PATH": os.environ["PATH"], "MLFLOW_TRACKING_URI": mlflow_server, "HF_HUB_OFFLINE": "1",
                    "HOME": str(tmp_path)}
    consumer = subprocess.run([sys.executable, "-c", CONSUMER.format(name=name), str(tmp_path / "pulled")],
                              env=consumer_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert consumer.returncode == 0, consumer.stderr[-4000:]
    result = json.loads(consumer.stdout.split("RESULT:")[1].splitlines()[0])
    assert result["completion"].strip() and result["class"] == "LlamaForCausalLM", consumer.stdout

    import mlflow

    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)  # this process may have set another
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["method"] == "bnb-nf4"  # smallest size within the gates
    assert champion.tags["gate"] == "passed" and len(champion.tags["quantmill.checkpoint_sha256"]) == 64
    card = next(Path(tmp_path / "pulled").rglob("README.md")).read_text()
    assert "bnb-nf4" in card and str(demo_assets.model_dir) in card and "## Evaluation" in card
    parent = client.get_run(champion.run_id)
    assert parent.data.tags["quantmill.base_sha256"] and parent.data.params["profile.registry.model_name"] == name
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {r.data.tags["mlflow.runName"] for r in children}
    merge_run = next(r for r in children if r.data.tags["mlflow.runName"] == "merge")
    assert merge_run.data.params["adapter_training.method"] == "lora"  # how the adapter was trained, detected
    assert merge_run.data.params["merge.qlora_merge"] == "full_precision" and merge_run.data.params["merge.lora_modules"]
    assert {"download", "merge", "calibrate", "evaluate/baseline", "quantize/bnb-nf4", "evaluate/bnb-nf4"} <= names
