"""Deployments end to end: a real `prefect server` (SQLite) on loopback, the `quantmill` process work pool,
a worker, `prefect deploy --all` from prefect.yaml, a `quantize` run triggered through the REST API with
its parameters (what the UI's form posts), then the version it registered in the worker's MLflow registry.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (a worker's flow-run child, uvicorn's workers), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture()
def prefect_api(tmp_path):
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (SQLite database there)."""
    port = free_port()
    log = tmp_path / "server.log"
    env = subprocess_env(tmp_path / "server-home", PREFECT_HOME=str(tmp_path / "server-prefect"),
                         PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited with {proc.returncode}: {tail(log)}")
            try:
                if requests.get(f"{api}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            pytest.fail("prefect server did not answer /api/health within 240 s: " + tail(log))
        yield api
    finally:
        stop(proc)


def cli(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a prefect CLI command non-interactively from the repository root; fail with its output."""
    run = subprocess.run([*PREFECT, "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, f"prefect {' '.join(args)}: {run.stdout[-3000:]}{run.stderr[-3000:]}"
    return run


@pytest.mark.slow
def test_deploy_and_trigger_quantize_through_the_api(tmp_path, demo_assets, prefect_api):
    home = tmp_path / "worker-home"  # QUANTMILL_HOME of the worker and of the flow runs it starts
    db = home / "mlflow.db"
    env = subprocess_env(
        home, PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp_path / "client-prefect"),
        PREFECT_LOCAL_STORAGE_PATH=str(home / "prefect" / "results"), PREFECT_CLI_PROMPT="false",
        MLFLOW_TRACKING_URI=f"sqlite:///{db}", QUANTMILL_REPO=str(REPO),
    )

    # One-time setup, as in the README: the pool prefect.yaml names, then every deployment in it.
    cli(["work-pool", "create", "quantmill", "--type", "process"], env)
    deployed = cli(["deploy", "--all"], env, timeout=600)
    for name in ("quantize/quantize", "quantize-profile-file/quantize-nightly", "sweep/sweep"):
        assert f"'{name}' successfully created" in " ".join(deployed.stdout.split()), deployed.stdout[-3000:]

    s = requests.Session()
    deployment = s.get(f"{prefect_api}/deployments/name/quantize/quantize", timeout=30).json()
    assert deployment["work_pool_name"] == "quantmill" and deployment["enforce_parameter_schema"]
    # The parameter schema is what the UI renders as a form: one required `profile` built from the typed model.
    schema = deployment["parameter_openapi_schema"]
    assert schema["required"] == ["profile"] and schema["properties"]["profile"]["$ref"].endswith("/Profile")
    assert {"Profile", "Recipe", "Calibration", "Evaluation", "Registry", "Source"} <= set(schema["definitions"])
    profile_schema = schema["definitions"]["Profile"]
    assert {"model", "calibration", "evaluation", "registry"} <= set(profile_schema["required"])
    assert {"recipes", "storage", "device"} <= set(profile_schema["properties"])
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    nightly = s.get(f"{prefect_api}/deployments/name/quantize-profile-file/quantize-nightly", timeout=30).json()
    assert [x["schedule"].get("cron") for x in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["parameters"] == {"profile_path": "profiles/demo.yaml"}
    assert nightly["global_concurrency_limit"]["limit"] == 1  # one nightly run at a time
    sweep = s.get(f"{prefect_api}/deployments/name/sweep/sweep", timeout=30).json()
    assert sweep["parameter_openapi_schema"]["required"] == ["profile"]
    assert "Sweep" in sweep["parameter_openapi_schema"]["definitions"]

    # A bad form is refused by the server before any run exists (enforce_parameter_schema).
    bad = s.post(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run",
                 json={"parameters": {"profile": {"name": "x"}}}, timeout=30)
    assert bad.status_code == 409, bad.text

    worker_log = tmp_path / "worker.log"
    worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "quantmill", "--name", "e2e-worker"],
                              cwd=tmp_path, env=env, stdout=open(worker_log, "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        name = "deployed-demo"
        profile = {
            "name": "deploy-e2e",
            "model": {"path": str(demo_assets.model_dir)},
            "calibration": {"source": {"path": str(demo_assets.calib_path)}, "num_samples": 8, "seq_len": 128},
            "recipes": [{"method": "bnb-int8"}],
            "evaluation": {"source": {"path": str(demo_assets.eval_path)}, "max_tokens": 2048, "window": 256,
                           "speed": None},
            "registry": {"model_name": name},
        }
        # Exactly what the UI's "Custom run" form posts.
        created = s.post(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run",
                         json={"parameters": {"profile": profile}}, timeout=30)
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]

        deadline = time.time() + 900
        state = None
        while time.time() < deadline:
            run = s.get(f"{prefect_api}/flow_runs/{run_id}", timeout=30).json()
            state = run["state"]
            if state and state["type"] in TERMINAL:
                break
            if worker.poll() is not None:
                pytest.fail(f"worker exited with {worker.returncode}: {tail(worker_log)}")
            time.sleep(3)
        else:
            pytest.fail(f"flow run still {state and state['type']} after 900 s: {tail(worker_log)}")
        assert state["type"] == "COMPLETED", f"{state['type']}: {state.get('message')}\n{tail(worker_log, 8000)}"
    finally:
        stop(worker)

    # The flow run inherited the worker's environment: its registry is the worker's SQLite MLflow.
    assert db.exists(), f"no MLflow database at {db}: {tail(worker_log)}"
    assert (home / "artifacts").is_dir()  # storage.root default ${QUANTMILL_HOME}/artifacts, expanded at run time
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["method"] == "bnb-int8" and champion.tags["gate"] == "passed"
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == [champion.version]
    parent = client.get_run(client.get_run(champion.run_id).data.tags["mlflow.parentRunId"])  # via the variant run
    assert parent.data.tags["prefect.flow_run_id"] == run_id
    assert parent.data.params["profile.registry.model_name"] == name
    assert parent.data.tags["mlflow.runName"] == "deploy-e2e"
