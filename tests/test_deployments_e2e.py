"""Deployments end to end: a real `prefect server` (SQLite) on loopback, the `quantmill` process work pool,
a worker, `prefect deploy --all` from prefect.yaml, a `quantize` run triggered through the REST API with
its parameters (what the UI's form posts), then the version it registered in the worker's MLflow registry.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import yaml

from tests.conftest import REPO, demo_profile, subprocess_env
from tests.servers import PREFECT, prefect_server, stop, tail

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A Prefect server with its UI, set up once as in the README (the work pool, `prefect deploy --all`) and shared
    by this module's tests: the REST API and the browser read the same deployments. Yields the API URL and the
    state folder `prefect deploy` ran with."""
    root = tmp_path_factory.mktemp("deployed")
    with prefect_server(root, ui=True) as api:
        deploy_all(root, api, root / "deployer-home")
        yield api, root / "deployer-home"


def cli(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a prefect CLI command non-interactively from the repository root; fail with its output."""
    run = subprocess.run([*PREFECT, "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, f"prefect {' '.join(args)}: {run.stdout[-3000:]}{run.stderr[-3000:]}"
    return run


def api_session() -> requests.Session:
    """HTTP to the Prefect API, retrying what the server answers 503 ("Service Unavailable": errors a client may
    retry on, e.g. SQLite busy on a loaded machine) as Prefect's own client does."""
    from urllib3.util.retry import Retry

    s = requests.Session()
    retry = Retry(total=5, status_forcelist=[503], allowed_methods=None, backoff_factor=0.5, raise_on_status=False)
    s.mount("http://", requests.adapters.HTTPAdapter(max_retries=retry))
    return s


def deploy_all(tmp_path: Path, api: str, home: Path, **extra: str) -> dict[str, str]:
    """One-time setup, as in the README: the pool prefect.yaml names, then every deployment in it."""
    env = subprocess_env(
        home, PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "client-prefect"),
        PREFECT_LOCAL_STORAGE_PATH=str(home / "prefect" / "results"), PREFECT_CLI_PROMPT="false",
        QUANTMILL_REPO=str(REPO), **extra,
    )
    cli(["work-pool", "create", "quantmill", "--type", "process"], env)
    deployed = cli(["deploy", "--all"], env, timeout=600)
    for name in ("quantize/quantize", "quantize-profile-file/quantize-nightly", "sweep/sweep"):
        assert f"'{name}' successfully created" in " ".join(deployed.stdout.split()), deployed.stdout[-3000:]
    return env


def bad_profiles(good: dict) -> dict[str, dict]:
    """A method typo, an unknown option (inline and under params), a width the method lacks, no recipes."""
    def with_recipes(*recipes: dict) -> dict:
        return {**good, "recipes": list(recipes)}

    return {
        "method typo": with_recipes({"method": "gtpq"}),
        "unknown option": with_recipes({"method": "rtn", "bitz": 4}),
        "unknown param": with_recipes({"method": "rtn", "params": {"bitz": 4}}),
        "bits the method lacks": with_recipes({"method": "awq", "bits": 8}),
        "no recipes": with_recipes(),
    }


def undescribed(schema: dict) -> list[str]:
    """Properties without a description in every definition and every recipe branch."""
    missing = []
    for def_name, definition in schema["definitions"].items():
        for obj in [definition, *definition.get("anyOf", [])]:
            where = def_name + (f"[{obj['title']}]" if obj is not definition else "")
            missing += [f"{where}.{k}" for k, v in obj.get("properties", {}).items() if not v.get("description")]
    return missing


@pytest.mark.slow
def test_deploy_and_trigger_quantize_through_the_api(tmp_path, demo_assets, deployed):
    from quantmill.methods import known_methods

    prefect_api, deployer_home = deployed  # deployer_home: QUANTMILL_HOME where `prefect deploy` ran
    home = tmp_path / "worker-home"  # QUANTMILL_HOME of the worker and of the flow runs it starts
    db = home / "mlflow.db"
    env = subprocess_env(
        home, PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp_path / "worker-prefect"),
        PREFECT_LOCAL_STORAGE_PATH=str(home / "prefect" / "results"), MLFLOW_TRACKING_URI=f"sqlite:///{db}",
        QUANTMILL_REPO=str(REPO),
    )

    s = api_session()
    deployment = s.get(f"{prefect_api}/deployments/name/quantize/quantize", timeout=30).json()
    assert deployment["work_pool_name"] == "quantmill" and deployment["enforce_parameter_schema"]
    # The parameter schema is what the UI renders as a form: one required `profile` built from the typed model.
    schema = deployment["parameter_openapi_schema"]
    assert schema["required"] == ["profile"] and schema["properties"]["profile"]["$ref"].endswith("/Profile")
    assert {"Profile", "Recipe", "Calibration", "Evaluation", "Registry", "Source"} <= set(schema["definitions"])
    profile_schema = schema["definitions"]["Profile"]
    assert {"model", "calibration", "evaluation", "registry"} <= set(profile_schema["required"])
    assert {"recipes", "storage", "device"} <= set(profile_schema["properties"])
    # Recipes: one branch per registered method (the form's method control), each with its own options.
    branches = {b["properties"]["method"]["const"]: b for b in schema["definitions"]["Recipe"]["anyOf"]}
    assert sorted(branches) == known_methods() and {"gptq", "awq"} <= set(branches)
    assert all(b["additionalProperties"] is False and b["properties"]["method"]["enum"] == [m]
               for m, b in branches.items())
    assert {"bits", "group_size", "sym", "desc_act", "damp_percent", "kernel"} <= set(branches["gptq"]["properties"])
    assert branches["gptq"]["properties"]["bits"]["enum"] == [2, 3, 4, 8]
    assert {"zero_point", "clip_search", "duo_scaling", "backend"} <= set(branches["awq"]["properties"])
    assert undescribed(schema) == []
    # Placeholders stay placeholders: nothing of the deployer's state folder is written into the deployment.
    assert schema["definitions"]["Storage"]["properties"]["root"]["default"] == "${QUANTMILL_HOME}/artifacts"
    assert str(deployer_home) not in json.dumps(deployment)
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    nightly = s.get(f"{prefect_api}/deployments/name/quantize-profile-file/quantize-nightly", timeout=30).json()
    assert [x["schedule"].get("cron") for x in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["parameters"] == {"profile_path": "profiles/demo.yaml"}
    assert nightly["global_concurrency_limit"]["limit"] == 1  # one nightly run at a time
    sweep = s.get(f"{prefect_api}/deployments/name/sweep/sweep", timeout=30).json()
    assert sweep["parameter_openapi_schema"]["required"] == ["profile"]
    assert "Sweep" in sweep["parameter_openapi_schema"]["definitions"]

    name = "deployed-demo"
    profile = demo_profile(
        demo_assets, "deploy-e2e", [{"method": "bnb-int8"}], adapter=None, registry={"model_name": name},
        # The form's default, as the UI posts it: the placeholder, expanded by the flow run on the worker.
        storage={"root": schema["definitions"]["Storage"]["properties"]["root"]["default"]})
    # The form's own check (the UI calls it while editing) and flow-run creation refuse a bad profile before
    # any run exists (enforce_parameter_schema); the demo profile and the profile above pass.
    def form_check(p: dict) -> bool:
        answer = s.post(f"{prefect_api}/ui/schemas/validate", json={"schema": schema, "values": {"profile": p}},
                        timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()["valid"]

    demo = yaml.safe_load((REPO / "profiles" / "demo.yaml").read_text())
    assert form_check(demo) and form_check(profile)
    for why, bad in {"not a profile": {"name": "x"}, **bad_profiles(profile)}.items():
        assert not form_check(bad), why
        refused = s.post(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run",
                         json={"parameters": {"profile": bad}}, timeout=30)
        assert refused.status_code == 409, (why, refused.text)
    assert s.post(f"{prefect_api}/flow_runs/count", json={}, timeout=30).json() == 0

    worker_log = tmp_path / "worker.log"
    worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "quantmill", "--name", "e2e-worker"],
                              cwd=tmp_path, env=env, stdout=open(worker_log, "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
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
    assert (home / "artifacts").is_dir()  # storage.root ${QUANTMILL_HOME}/artifacts, expanded in the worker's run
    assert not (deployer_home / "artifacts").exists()
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


def find_chromium() -> str | None:
    """A Chromium binary (Debian's `chromium`, or one of its usual names)."""
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def chromium(browser: str, url: str, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url`, given 30 s of (virtual) time for the app to fetch and render."""
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=30000", "--window-size=1400,7000", *args, url],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_custom_run_form_in_headless_chromium(tmp_path, deployed):
    """The Custom run page of a real server (default UI): the method control and the chosen method's fields."""
    from quantmill.methods import known_methods

    browser = find_chromium()
    if browser is None:
        pytest.skip("no Chromium found: install Debian's `chromium` (apt-get install -y chromium; .ci/run does)")
    api = deployed[0]
    deployment = requests.get(f"{api}/deployments/name/quantize/quantize", timeout=30).json()
    # The page with one recipe added to the form (what "Add item" under Recipes does): the form's default.
    added = quote(json.dumps({"profile": {"recipes": [{}]}}))
    url = f"{api.removesuffix('/api')}/v2/deployments/deployment/{deployment['id']}/run?parameters={added}"
    shot = tmp_path / "custom-run.png"
    assert chromium(browser, url, f"--screenshot={shot}").returncode == 0 and shot.stat().st_size > 0
    dom = chromium(browser, url, "--dump-dom").stdout
    tabs = re.findall(r'role="tab" aria-selected="(true|false)"[^>]*>([^<]*)</button>', dom)
    methods = [(selected, label) for selected, label in tabs if label in known_methods()]
    # The method control offers every registered method; the form's default (the first) is selected.
    assert [label for _, label in methods] == known_methods() and {"gptq", "awq"} <= set(known_methods()), tabs
    assert [label for selected, label in methods if selected == "true"] == [known_methods()[0]]
    text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())
    labels = re.findall(r"<label[^>]*>([^<]*)</label>", dom)
    # ...and shows that method's own fields, labelled and described (the first method: autoround), no other's.
    assert known_methods()[0] == "autoround"
    assert {"Method", "Bits (Optional)", "Group Size (Optional)", "Sym (Optional)", "Iters (Optional)",
            "Recipes", "Storage (Optional)"} <= set(labels), labels
    assert "Zero Point (Optional)" not in labels and "Backend (Optional)" not in labels, labels
    assert "Iters (Optional) Sign-gradient tuning steps per block" in text and "desc_act" not in text, str(shot)
