"""Pre-emption and concurrency: kill -9 mid-quantize then rerun; two runs of one profile at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests import fresh
from tests.conftest import REPO, demo_profile, subprocess_env, write_profile
from tests.servers import seed_prefect_home
from tests.test_pipeline_e2e import step_states

NAME = "crash-test"


def crash_profile(tmp_path: Path, assets, name: str = NAME) -> Path:
    """Two bitsandbytes variants of the demo model (generation speed is measured elsewhere; it costs ~20 s a run)."""
    return write_profile(tmp_path, demo_profile(assets, name, [{"method": "bnb-int8"}, {"method": "bnb-nf4"}]))


def cli(home: Path, *args: str, log: Path | None = None) -> fresh.Forked:
    """`quantmill ARGS` in a new process of its own session (forked: tests/fresh.py), its output (both streams) in
    `log` if given; runs watched for library log lines pass -v (shown live, not only in the debug log)."""
    output = {"stdout": log, "stderr": subprocess.STDOUT} if log else {}
    return fresh.start_cli(*args, cwd=REPO, env=subprocess_env(home), **output)


def finish(proc: fresh.Forked) -> str:
    out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, (out or "")[-3000:] + (err or "")[-5000:]
    return out


def registry_state(home: Path, name: str) -> set[tuple[str, str, str]]:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    return {(mv.tags["variant"], mv.tags["quantmill.checkpoint_sha256"], mv.tags["perplexity"])
            for mv in client.search_model_versions(f"name='{name}'")}


def leftovers(home: Path) -> list[Path]:
    """Temporary files anywhere in the state folder's store."""
    tmp = home / "artifacts" / "tmp"
    return list(tmp.iterdir()) if tmp.exists() else []


def mlflow_runs(home: Path, name: str) -> list:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    return client.search_runs([client.get_experiment_by_name(name).experiment_id])


def flow_run_states(home: Path, ids: list[str]) -> dict[str, str]:
    """State types of flow runs, read through the Prefect client against the state folder's database."""
    code = ("import json, sys, uuid\n"
            "from quantmill import state\n"
            "state.configure_environment()\n"
            "from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    print(json.dumps({i: c.read_flow_run(uuid.UUID(i)).state.type.value for i in sys.argv[1:]}))\n")
    out = subprocess.run([sys.executable, "-c", code, *ids], cwd=REPO, env=subprocess_env(home), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def run_until(home: Path, profile: Path, log: Path, line: str) -> tuple[fresh.Forked, list]:
    """`quantmill run PROFILE -v` (output in `log`) until `line` shows; the run and the processes it has started by
    then, Prefect's temporary server among them."""
    import psutil

    log.touch()
    proc = cli(home, "run", str(profile), "-v", log=log)
    deadline = time.time() + 900
    while time.time() < deadline and line not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    started = psutil.Process(proc.pid).children(recursive=True)
    assert any("uvicorn" in " ".join(c.cmdline()) for c in started)  # the temporary server
    return proc, started


def alive(procs: list) -> list:
    from quantmill.state import pid_alive

    return [p for p in procs if pid_alive(p.pid)]


@pytest.fixture(scope="module")
def concurrent(tmp_path_factory, demo_assets, warm_store):
    """Two runs of one profile started at once on a new state folder (its store seeded with the shared steps; not
    its Prefect database: both runs' temporary servers create it)."""
    tmp = tmp_path_factory.mktemp("concurrent")
    profile = crash_profile(tmp, demo_assets)
    home = tmp / "home"
    warm_store(home / "artifacts")
    files = [tmp / f"run{i}.log" for i in range(2)]
    procs = [cli(home, "run", str(profile), "-v", log=log) for log in files]
    logs = []
    for proc, log in zip(procs, files):
        proc.wait(timeout=1200)
        logs.append(log.read_text())
        assert proc.returncode == 0, logs[-1][-5000:]
    return home, logs


@pytest.mark.slow
def test_two_concurrent_runs_register_once(concurrent):
    home, logs = concurrent
    # each variant was quantized by one of the two runs; the other waited on the store lock and reused it
    assert sum(log.count("quantizing with bitsandbytes") for log in logs) == 2, logs[0][-3000:]
    state = registry_state(home, NAME)
    assert {v for v, _, _ in state} == {"bnb-int8", "bnb-nf4"} and len(state) == 2
    assert leftovers(home) == []


@pytest.mark.slow
def test_kill_during_quantize_then_rerun(tmp_path, demo_assets, concurrent, warm_store):
    """kill -9 of `quantmill run` alone (not its process group): nothing it started survives, the next run
    sweeps its scratch folder, closes its MLflow run (KILLED) and flow run (Crashed), and registers what an
    undisturbed run registers (the concurrent runs' registry is the reference)."""
    profile = crash_profile(tmp_path, demo_assets)
    reference = concurrent[0]

    home = tmp_path / "home"
    warm_store(home / "artifacts")
    seed_prefect_home(home / "prefect")  # a state folder used before (the concurrent runs start in a new one)
    victim, started = run_until(home, profile, tmp_path / "killed.log", "quantizing with bitsandbytes")
    os.kill(victim.pid, signal.SIGKILL)  # the CLI only: what it started must not outlive it
    victim.wait(30)
    deadline = time.time() + 30  # the watchdog stops the temporary server within seconds
    while alive(started) and time.time() < deadline:
        time.sleep(0.5)
    assert alive(started) == [], [c.cmdline() for c in alive(started)]
    assert registry_state(home, NAME) == set()
    scratch = home / "tmp" / str(victim.pid)
    assert scratch.is_dir()  # the killed run's temporary folder (library offload/scratch) is in the state folder

    out = finish(cli(home, "run", str(profile)))
    states = dict(step_states(out))
    for step in ("download", "merge", "calibrate"):
        assert states[step] == "Cached", states
    assert registry_state(home, NAME) == registry_state(reference, NAME)
    assert len(registry_state(home, NAME)) == 2
    assert leftovers(home) == []
    assert not scratch.exists()
    runs = {r.info.status: r for r in mlflow_runs(home, NAME)}
    assert sorted(runs) == ["FINISHED", "KILLED"], sorted(runs)
    assert "died" in runs["KILLED"].data.tags["quantmill.error"]
    killed_flow = runs["KILLED"].data.tags["prefect.flow_run_id"]
    assert flow_run_states(home, [killed_flow]) == {killed_flow: "CRASHED"}


@pytest.mark.slow
def test_sigterm_stops_the_run_and_its_prefect_server(tmp_path, demo_assets):
    """Pre-emption sends SIGTERM: the run exits non-zero, leaves no process (Prefect's temporary server) behind."""
    import psutil

    profile = crash_profile(tmp_path, demo_assets, "sigterm-test")
    seed_prefect_home(tmp_path / "home" / "prefect")
    proc, children = run_until(tmp_path / "home", profile, tmp_path / "run.log", "Task run 'calibrate")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 128 + signal.SIGTERM
    gone, still = psutil.wait_procs(children, timeout=30)
    assert not still, [c.cmdline() for c in still]
    assert leftovers(tmp_path / "home") == []
    (run,) = mlflow_runs(tmp_path / "home", "sigterm-test")
    assert run.info.status == "KILLED", run.info.status
    assert run.data.tags["quantmill.error"]
