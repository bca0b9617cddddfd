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
import yaml

from tests.conftest import subprocess_env
from tests.test_pipeline_e2e import step_states

REPO = Path(__file__).resolve().parents[1]


def write_profile(tmp_path: Path, assets, name: str) -> Path:
    profile = {
        "name": name,
        "model": {"path": str(assets.model_dir)},
        "adapter": {"path": str(assets.adapter_dir)},
        "calibration": {"source": {"path": str(assets.calib_path)}, "num_samples": 8, "seq_len": 128},
        "recipes": [{"method": "bnb-int8"}, {"method": "bnb-nf4"}],
        "evaluation": {"source": {"path": str(assets.eval_path)}, "max_tokens": 2048, "window": 256,
                       "speed": None},  # generation speed is measured elsewhere; it costs ~20 s a run
        "registry": {"model_name": name},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def cli(home: Path, *args: str, **kw) -> subprocess.Popen:
    env = subprocess_env(home)
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, text=True,
                            start_new_session=True, **kw)


def finish(proc: subprocess.Popen) -> str:
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


@pytest.mark.slow
def test_kill_during_quantize_then_rerun(tmp_path, demo_assets):
    name = "crash-test"
    profile = write_profile(tmp_path, demo_assets, name)
    reference = tmp_path / "reference"
    finish(cli(reference, "run", str(profile), stdout=subprocess.PIPE, stderr=subprocess.PIPE))

    home = tmp_path / "home"
    log = tmp_path / "killed.log"
    with open(log, "w") as fh:
        victim = cli(home, "run", str(profile), stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.time() + 900
        while time.time() < deadline and "quantizing with bitsandbytes" not in log.read_text():
            assert victim.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(victim.pid, signal.SIGKILL)  # the whole job: CLI and its ephemeral Prefect server
        victim.wait(30)
    assert registry_state(home, name) == set()

    out = finish(cli(home, "run", str(profile), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    states = dict(step_states(out))
    for step in ("download", "merge", "calibrate"):
        assert states[step] == "Cached", states
    assert registry_state(home, name) == registry_state(reference, name)
    assert len(registry_state(home, name)) == 2
    assert leftovers(home) == []


@pytest.mark.slow
def test_two_concurrent_runs_register_once(tmp_path, demo_assets):
    name = "concurrent-test"
    profile = write_profile(tmp_path, demo_assets, name)
    home = tmp_path / "home"
    # Output goes to files: a run blocked on a full stderr pipe while holding a store lock would stall the other.
    files = [open(tmp_path / f"run{i}.log", "w+") for i in range(2)]
    procs = [cli(home, "run", str(profile), stdout=fh, stderr=subprocess.STDOUT) for fh in files]
    logs = []
    for proc, fh in zip(procs, files):
        proc.wait(timeout=1200)
        fh.seek(0)
        logs.append(fh.read())
        fh.close()
        assert proc.returncode == 0, logs[-1][-5000:]
    # each variant was quantized by one of the two runs; the other waited on the store lock and reused it
    assert sum(log.count("quantizing with bitsandbytes") for log in logs) == 2, logs[0][-3000:]
    state = registry_state(home, name)
    assert {v for v, _, _ in state} == {"bnb-int8", "bnb-nf4"} and len(state) == 2
    assert leftovers(home) == []


@pytest.mark.slow
def test_sigterm_stops_the_run_and_its_prefect_server(tmp_path, demo_assets):
    """Pre-emption sends SIGTERM: the run exits non-zero, leaves no process (Prefect's temporary server) behind."""
    import psutil

    profile = write_profile(tmp_path, demo_assets, "sigterm-test")
    log = tmp_path / "run.log"
    with open(log, "w") as fh:
        proc = cli(tmp_path / "home", "run", str(profile), stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.time() + 900
        while time.time() < deadline and "Task run 'calibrate" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("uvicorn" in " ".join(c.cmdline()) for c in children)  # the temporary server
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 128 + signal.SIGTERM
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [c.cmdline() for c in alive]
    assert leftovers(tmp_path / "home") == []
